"""Side-by-side benchmark: onnxlm fp32 artifact vs transformers fp32 (torch, sdpa) on SmolLM2-135M.

Both run in this one process, round-robin (onnxlm run i, transformers run i, ...), with the same thread count,
the same prompt tokens and the same definitions (onnxlm/runtime/bench.py). Medians of --runs.
Writes the table into docs/benchmarks.md between the markers of the `foundation` section.

    python bench/bench_foundation.py [--artifact out/fp32] [--runs 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import onnxlm  # noqa: E402
from onnxlm.runtime.bench import NEW_TOKENS, PREFILL_TOKENS, PROMPT_TOKENS, bench_prompt, time_generation, time_prefill  # noqa: E402
from onnxlm.runtime.decoding import executor_for  # noqa: E402

from common import GPL3, ROOT, dir_size, machine, publish  # noqa: E402


class TimingStreamer:
    """transformers streamer that records when each new token arrives."""

    def __init__(self):
        self.times, self.prompt_seen = [], False

    def put(self, value):
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self):
        pass


def hf_generation(model, prompt: list[int]) -> tuple[float, float]:
    import torch

    streamer = TimingStreamer()
    ids = torch.tensor([prompt])
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS,
                       min_new_tokens=NEW_TOKENS, pad_token_id=0, streamer=streamer)
    t = streamer.times
    return t[0] - start, (len(t) - 1) / (t[-1] - t[0])


def hf_prefill(model, prompt: list[int]) -> float:
    import torch

    start = time.perf_counter()
    with torch.no_grad():
        model(torch.tensor([prompt]), use_cache=True)
    return time.perf_counter() - start


def hf_perplexity(model, ids: list[int], window: int) -> float:
    import torch

    from onnxlm.metrics import perplexity, windows_of

    def window_logits(chunk):
        with torch.no_grad():
            yield model(torch.tensor([chunk])).logits[0].double().numpy()  # (window, vocab)

    return perplexity(windows_of(ids, window), window_logits)["ppl"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, default=ROOT / "out" / "fp32-plain")
    parser.add_argument("--recipe", default="fp32-plain")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ppl-tokens", type=int, default=4096)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if not (args.artifact / "manifest.json").is_file():
        print(f"building {args.artifact} ...", flush=True)
        onnxlm.optimize("smollm2-135m", recipe=args.recipe, output=args.artifact)
    art = onnxlm.load(args.artifact, threads=args.threads)
    from onnxlm.frontend import load_source

    hf = load_source("smollm2-135m").torch_model  # the same dequantized GGUF weights, fp32
    hf.config._attn_implementation = "sdpa"

    short = bench_prompt(art.tokenizer, PROMPT_TOKENS)
    long = bench_prompt(art.tokenizer, PREFILL_TOKENS)
    executor = executor_for(art.session)
    time_generation(executor, short, 4), hf_generation(hf, short)  # warm-up both
    rows = {"onnxlm": {"ttft": [], "decode": [], "prefill": []}, "transformers": {"ttft": [], "decode": [], "prefill": []}}
    for i in range(args.runs):  # round-robin, so drift on a shared machine hits both sides alike
        t, d = time_generation(executor, short, NEW_TOKENS)
        rows["onnxlm"]["ttft"].append(t), rows["onnxlm"]["decode"].append(d)
        rows["onnxlm"]["prefill"].append(time_prefill(executor, long))
        t, d = hf_generation(hf, short)
        rows["transformers"]["ttft"].append(t), rows["transformers"]["decode"].append(d)
        rows["transformers"]["prefill"].append(hf_prefill(hf, long))
        print(f"run {i + 1}/{args.runs}: onnxlm {rows['onnxlm']['decode'][-1]:.1f} tok/s, "
              f"transformers {rows['transformers']['decode'][-1]:.1f} tok/s", flush=True)
    med = {k: {m: statistics.median(v) for m, v in r.items()} for k, r in rows.items()}

    ppl_ours = art.perplexity(GPL3, max_tokens=args.ppl_tokens, window=512)
    ids = art.tokenizer.encode(GPL3.read_text(), add_bos=False)[: args.ppl_tokens]
    ppl_hf = hf_perplexity(hf, ids, 512)
    sizes = {"onnxlm": dir_size(args.artifact), "transformers": sum(p.numel() * 4 for p in hf.parameters())}
    ppl = {"onnxlm": ppl_ours["ppl"], "transformers": ppl_hf}

    ratio = med["onnxlm"]["decode"] / med["transformers"]["decode"]
    lines = [
        f"Machine: {machine()}. Threads: {args.threads}. Medians of {args.runs} round-robin runs in one process.",
        f"onnxruntime {onnxlm.artifact.package_versions().get('onnxruntime')}, torch {torch.__version__}, "
        f"transformers {onnxlm.artifact.package_versions().get('transformers')}.",
        "",
        "| system | decode tok/s | TTFT (32-token prompt) | prefill 512 tokens | PPL (GPL-3, 4096 tok, 512 windows) | size |",
        "|---|---|---|---|---|---|",
    ]
    for name, label in (("transformers", "transformers fp32 (`generate`, sdpa)"), ("onnxlm", f"onnxlm `{args.recipe}` artifact")):
        m = med[name]
        lines.append(f"| {label} | {m['decode']:.1f} | {m['ttft'] * 1000:.0f} ms | {m['prefill']:.2f} s | "
                     f"{ppl[name]:.4f} | {sizes[name] / 1e6:.0f} MB |")
    lines += [
        "",
        f"Decode speed-up: **{ratio:.2f}x** transformers. PPL difference: "
        f"{abs(ppl['onnxlm'] / ppl['transformers'] - 1) * 100:.4f}% "
        f"(tokenizer: the GGUF's `smollm` pre-tokenizer, {len(ids)} tokens scored in windows).",
    ]
    publish("foundation", lines,
            f"python bench/bench_foundation.py --recipe {args.recipe} --runs {args.runs} --threads {args.threads}")


if __name__ == "__main__":
    main()
