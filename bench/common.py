"""Helpers shared by the bench scripts: machine description, docs section writing, genai timing."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "docs" / "benchmarks.md"
GPL3 = Path("/usr/share/common-licenses/GPL-3")


def machine() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    flags = fields.get("Flags", "")
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    if "avx512_vnni" in flags or "avx_vnni" in flags:
        isa += " + VNNI"
    return (f"{fields.get('Model name', '?').strip()}, {os.cpu_count()} logical CPUs ({isa}), "
            f"{platform.python_implementation()} {platform.python_version()}")


def write_section(name: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace the text between `<!-- name:start -->` and `<!-- name:end -->` in docs/benchmarks.md."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    head, rest = path.read_text().split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{body}\n{end}{tail}")


def publish(section: str, lines: list[str], command: str) -> None:
    """Print a result table and write it, with the command that made it, into docs/benchmarks.md."""
    table = "\n".join([*lines, "", f"Command: `{command}`"])
    print(table)
    write_section(section, table)


def round_robin(systems: dict, runs: int) -> dict[str, list[tuple]]:
    """One warm-up call each, then `runs` rounds calling every system in turn; name -> the tuple each call
    returned (e.g. (ttft s, decode tok/s, prefill s)), one per round. Each round starts one system later than
    the one before, so no system always runs right after the same neighbour (whose idle ORT workers may still
    be spinning on the cores)."""
    for run in systems.values():
        run()
    results = {name: [] for name in systems}
    names = list(systems)
    for i in range(runs):
        for name in names[i % len(names):] + names[: i % len(names)]:
            results[name].append(systems[name]())
        print(f"run {i + 1}/{runs}: " + ", ".join(f"{r[-1][1]:.1f}" for r in results.values()), flush=True)
    return results


def medians(results: dict[str, list[tuple]]) -> dict[str, list[float]]:
    import statistics

    return {name: [statistics.median(x[k] for x in r) for k in range(len(r[0]))] for name, r in results.items()}


def median_ratio(results: dict[str, list[tuple]], name, baseline, field: int = 1) -> float:
    """The median over rounds of name's field / baseline's field in the same round: robust to the machine's
    speed drifting between rounds, which a ratio of medians is not."""
    import statistics

    return statistics.median(a[field] / b[field] for a, b in zip(results[name], results[baseline]))


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())


def genai_model(directory: Path, threads: int):
    """An onnxruntime-genai model with the given intra-op threads."""
    import json

    import onnxruntime_genai as og

    config = og.Config(str(directory))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return og.Model(config)


def genai_generation(model, prompt: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
    """(ttft s, decode tok/s, tokens) with the definitions of onnxlm/runtime/bench.py."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, min_length=len(prompt) + new_tokens)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(prompt)  # the prompt's forward pass
    times = []
    while not generator.is_done():
        generator.generate_next_token()  # call 1 picks from the prompt's logits; each later call runs one step
        times.append(time.perf_counter())
    tokens = [int(t) for t in generator.get_sequence(0)][len(prompt):]
    return times[0] - start, (len(times) - 1) / (times[-1] - times[0]), tokens


def genai_prefill(model, prompt: list[int]) -> float:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 1)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(prompt)
    return time.perf_counter() - start


def onnxlm_timing(art, short: list[int], long: list[int]) -> tuple[float, float, float]:
    """(TTFT s, decode tok/s, prefill s) of an onnxlm artifact, as `onnxlm bench` defines them."""
    from onnxlm.runtime.bench import NEW_TOKENS, time_generation, time_prefill
    from onnxlm.runtime.decoding import executor_for

    executor = executor_for(art.session)
    ttft, decode = time_generation(executor, short, NEW_TOKENS)
    return ttft, decode, time_prefill(executor, long)


def genai_timing(model, short: list[int], long: list[int]) -> tuple[float, float, float]:
    """The same three numbers for an onnxruntime-genai model."""
    from onnxlm.runtime.bench import NEW_TOKENS

    ttft, decode, _ = genai_generation(model, short, NEW_TOKENS)
    return ttft, decode, genai_prefill(model, long)


def llama_cpp_model(gguf: Path, threads: int, logits_all: bool = False):
    """llama.cpp (llama-cpp-python) on a GGUF file, or None when llama_cpp is not installed. Build it natively
    (about 20 minutes on 2 cores; CI does not):
        CMAKE_ARGS="-DGGML_NATIVE=ON" pip install --no-binary llama-cpp-python llama-cpp-python==0.3.36
    Defaults otherwise, as a user runs it (f16 KV cache)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    return Llama(model_path=str(gguf), n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=threads,
                 n_threads_batch=threads, logits_all=logits_all, verbose=False)


def llama_cpp_timing(llm, short: list[int], long: list[int]) -> tuple[float, float, float]:
    """(TTFT s, decode tok/s, prefill s) with the definitions of onnxlm/runtime/bench.py: greedy, 128 new
    tokens after `short`, EOS ignored; one forward pass over `long` from an empty cache."""
    from onnxlm.runtime.bench import NEW_TOKENS

    llm.reset()
    start = time.perf_counter()
    times = []
    for _ in llm.generate(short, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        times.append(time.perf_counter())
        if len(times) == NEW_TOKENS:
            break
    llm.reset()
    begin = time.perf_counter()
    llm.eval(long)
    prefill = time.perf_counter() - begin
    llm.reset()
    return times[0] - start, (len(times) - 1) / (times[-1] - times[0]), prefill


def llama_cpp_perplexity(llm, token_ids: list[int], window: int = 512) -> float:
    """PPL of the same token ids and windows as onnxlm's eval (non-overlapping, each from an empty cache), scored
    from llama.cpp's logits for every position (a model made with logits_all=True)."""
    import numpy as np

    from onnxlm.metrics import perplexity, windows_of

    def window_logits(ids):
        llm.reset()
        llm.eval(ids)
        yield np.asarray(llm.scores[: len(ids)], np.float32)  # (window, vocab)

    ppl = perplexity(windows_of(token_ids, window), window_logits)["ppl"]
    llm.reset()
    return ppl
