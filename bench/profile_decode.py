"""Where a decode step's time goes: ORT's profiler over 128 greedy decode steps after a 32-token prompt, kernel
time per op type (and per node group), side by side for several artifacts.

    python bench/profile_decode.py out/int4-rtn out/int4 --threads 2 [--split-correction]

Kernel time is what ORT's profiler records per node (`*_kernel_time` events); the rest of a step (ORT's
dispatch, onnxlm's Python) is the wall time per step minus their sum. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from onnxlm.runtime.bench import NEW_TOKENS, PROMPT_TOKENS, bench_prompt  # noqa: E402
from onnxlm.runtime.generate import decode_one_token, greedy, prefill  # noqa: E402
from onnxlm.runtime.session import DecoderSession  # noqa: E402
from onnxlm.runtime.tokenizer import TextTokenizer  # noqa: E402

from common import machine  # noqa: E402

# The GGUF-exact pass's node names for Q4_1's offset term (passes/quant/gguf_exact.py), counted apart
CORRECTION = re.compile(r"\.blocks|\.block_sums|\.offset_matmul|\.add_offsets")


def group_of(node: str, op: str, split_correction: bool = False) -> str:
    if not CORRECTION.search(node):
        return op
    return f"Q4_1 offset correction: {op}" if split_correction else "Q4_1 offset correction"


def profile(directory: Path, threads: int | None, steps: int, split_correction: bool = False) -> tuple[dict, float]:
    """(op type or part -> kernel ms per step, wall ms per step)."""
    model = DecoderSession(directory, threads=threads, profile=True)
    tokenizer = TextTokenizer(directory, model.info)
    prompt = bench_prompt(tokenizer, PROMPT_TOKENS)
    cache = model.new_cache(capacity=PROMPT_TOKENS + steps + 1)
    token = greedy(prefill(model, cache, prompt))
    start = time.perf_counter()
    for _ in range(steps):
        token = greedy(decode_one_token(model, cache, token))
    wall = (time.perf_counter() - start) / steps * 1000
    trace_path = Path(model.session.end_profiling())
    trace = json.loads(trace_path.read_text())
    trace_path.unlink()
    runs = sorted(e["ts"] for e in trace if e.get("name") == "model_run")
    cut = runs[1] if len(runs) > 1 else 0  # the first run is the prefill; the rest are the decode steps
    by_group = collections.Counter()
    for event in trace:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time") or event["ts"] < cut:
            continue
        op = event["args"].get("op_name", "?")
        by_group[group_of(event["name"][: -len("_kernel_time")], op, split_correction)] += event["dur"]
    scale = 1 / 1000 / steps
    return {k: v * scale for k, v in by_group.items()}, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=NEW_TOKENS)
    parser.add_argument("--split-correction", action="store_true", help="Q4_1's offset term by op, not as one part")
    args = parser.parse_args()
    results = {d.name: profile(d, args.threads, args.steps, args.split_correction) for d in args.artifacts}
    groups = sorted({g for by_group, _ in results.values() for g in by_group},
                    key=lambda g: -max(r[0].get(g, 0) for r in results.values()))
    names = list(results)
    print(f"Machine: {machine()}. Threads: {args.threads}. {args.steps} decode steps after a {PROMPT_TOKENS}-token "
          "prompt; ORT profiler kernel time, ms per step.\n")
    print("| op (or part) | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for g in groups:
        print(f"| {g} | " + " | ".join(f"{results[n][0].get(g, 0):.3f}" for n in names) + " |")
    print("| kernels, total | " + " | ".join(f"{sum(results[n][0].values()):.3f}" for n in names) + " |")
    print("| wall per step (profiling on) | " + " | ".join(f"{results[n][1]:.3f}" for n in names) + " |")
    print("| outside kernels | " + " | ".join(f"{results[n][1] - sum(results[n][0].values()):.3f}" for n in names)
          + " |")


if __name__ == "__main__":
    main()
