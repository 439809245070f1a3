"""KV-cache policies on SmolLM2-135M: PPL on a long text at equal budgets, memory over 8,000+ generated tokens, and
decode speed at long context.

Needs out/fp32 and out/fp32-kv (h2o and veda read attention probabilities):
    onnxlm optimize smollm2-135m -o out/fp32-kv --kv-scores
    python bench/bench_kv.py --part ppl              # section kv-ppl (about 25 minutes)
    python bench/bench_kv.py --part memory           # section kv-memory (about 10 minutes)
    python bench/bench_kv.py --part speed --runs 3   # section kv-speed
QuickSilver halting (section kv-halting) needs out/quicksilver and out/quicksilver-propagate (skip_kv false):
    onnxlm optimize smollm2-135m -o out/quicksilver --recipe quicksilver
    python -c "import onnxlm; onnxlm.optimize('smollm2-135m', recipe='quicksilver', output='out/quicksilver-propagate',
               overrides={'quicksilver_halting': {'skip_kv': False}})"
    python bench/bench_kv.py --part halting --thresholds 0.02 0.05 0.1 0.15
The text is the GPL-3 licence shipped with the OS (7.6k tokens): real English prose, not in any test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402

import onnxlm  # noqa: E402
from onnxlm.metrics import perplexity, windows_of  # noqa: E402
from onnxlm.runtime.bench import bench_prompt, time_generation  # noqa: E402
from onnxlm.runtime.decoding import executor_for  # noqa: E402
from onnxlm.runtime.bounded_cache import bounded_perplexity, policy_step, start  # noqa: E402
from onnxlm.runtime.kv_policy import KVPolicyConfig  # noqa: E402

from common import GPL3, ROOT, machine, median_ratio, medians, publish, round_robin  # noqa: E402

FP32, SCORES = ROOT / "out" / "fp32", ROOT / "out" / "fp32-kv"
WINDOW, BUDGETS = 4096, (256, 512)


def text_ids(art) -> list[int]:
    return art.tokenizer.encode(GPL3.read_text(), add_bos=False)


def ppl_part(threads: int) -> None:
    plain, scores = onnxlm.load(FP32, threads=threads), onnxlm.load(SCORES, threads=threads)
    ids = text_ids(plain)[:WINDOW]
    rows = [("full", None, "-", KVPolicyConfig())]
    for budget in BUDGETS:
        rows += [("sinks-window", budget, "cache-relative (re-rotated)", KVPolicyConfig("sinks-window", budget)),
                 ("sinks-window", budget, "original", KVPolicyConfig("sinks-window", budget, relative_positions=False)),
                 ("window only (0 sinks)", budget, "cache-relative", KVPolicyConfig("sinks-window", budget, sinks=0)),
                 ("h2o", budget, "original", KVPolicyConfig("h2o", budget)),
                 ("veda", budget, "original", KVPolicyConfig("veda", budget))]
    lines = [f"Machine: {machine()}, {threads} threads. Text: the first {len(ids)} tokens of the GPL-3 licence, one "
             f"window from an empty cache, scored one token per step from what the policy kept (the full row: one "
             "forward pass). 4 sinks unless said. Rows with original positions run on the --kv-scores graph, the others "
             "on fp32.", "",
             "| policy | KV budget (slots) | positions | PPL | vs full | seconds |", "|---|---|---|---|---|---|"]
    full = None
    for name, budget, positions, config in rows:
        art = scores if config.name in ("h2o", "veda") or not config.relative else plain
        result = bounded_perplexity(art.session, ids, config, window=WINDOW)
        full = full or result["ppl"]
        lines.append(f"| {name} | {budget or len(ids)} | {positions} | {result['ppl']:.3f} | "
                     f"{result['ppl'] / full - 1:+.1%} | {result['seconds']:.0f} |")
        print(lines[-1], flush=True)
    publish("kv-ppl", lines, "python bench/bench_kv.py --part ppl")


def memory_worker(policy: str, budget: int | None, new_tokens: int, every: int) -> None:
    """Generate `new_tokens` greedily under the policy; print one JSON line per `every` tokens: KV bytes in use
    and the process's RSS (this runs in its own process, so RSS is its own)."""
    art = onnxlm.load(FP32, threads=2)
    config = KVPolicyConfig(policy, budget)
    prompt = bench_prompt(art.tokenizer, 32)
    pol, cache = start(art.session, config, len(prompt) + new_tokens)
    slot_bytes = 2 * art.info.num_layers * art.info.num_kv_heads * art.info.head_dim * 4
    logits = policy_step(art.session, cache, pol, prompt)
    begin = time.perf_counter()
    for i in range(1, new_tokens + 1):
        logits = policy_step(art.session, cache, pol, [int(np.argmax(logits[-1]))])
        if i % every == 0:
            rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            print(json.dumps({"tokens": len(prompt) + i, "kv_bytes": cache.length * slot_bytes, "rss": rss,
                              "tok_s": i / (time.perf_counter() - begin)}), flush=True)


def memory_part(new_tokens: int, every: int) -> None:
    runs = {"full": ("full", None, min(new_tokens, 8192 - 40)), "sinks-window 512": ("sinks-window", 512, new_tokens)}
    series = {}
    for label, (policy, budget, n) in runs.items():
        cmd = [sys.executable, __file__, "--memory-worker", policy, str(budget or 0), str(n), str(every)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        series[label] = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        print(label, series[label][-1], flush=True)
    marks = sorted({p["tokens"] for s in series.values() for p in s})
    lines = [f"Machine: {machine()}, 2 threads. fp32 artifact, greedy from a 32-token prompt, one process per "
             "policy; KV bytes = slots in use x 46 KB; RSS of the process. The full cache stops at the context "
             "length (8,192 tokens); sinks + window (4 sinks, budget 512) goes on past it.", "",
             "| tokens | " + " | ".join(f"{k} KV MB | {k} RSS MB" for k in series) + " |",
             "|---" * (1 + 2 * len(series)) + "|"]
    for mark in marks:
        cells = []
        for s in series.values():
            point = next((p for p in s if p["tokens"] == mark), None)
            cells += [f"{point['kv_bytes'] / 1e6:.1f}", f"{point['rss'] / 1e6:.0f}"] if point else ["-", "-"]
        lines.append(f"| {mark} | " + " | ".join(cells) + " |")
    publish("kv-memory", lines, f"python bench/bench_kv.py --part memory --new-tokens {new_tokens}")


def speed_part(runs: int, threads: int, context: int) -> None:
    plain, scores = onnxlm.load(FP32, threads=threads), onnxlm.load(SCORES, threads=threads)
    prompt = text_ids(plain)[:context]
    systems = {
        "full (fp32)": (plain, KVPolicyConfig()),
        "sinks-window 512 (fp32)": (plain, KVPolicyConfig("sinks-window", 512)),
        "h2o 512 (--kv-scores graph)": (scores, KVPolicyConfig("h2o", 512)),
        "veda 512 (--kv-scores graph)": (scores, KVPolicyConfig("veda", 512)),
    }
    calls = {name: (lambda art=art, kv=kv: time_generation(executor_for(art.session, kv), prompt, 128))
             for name, (art, kv) in systems.items()}
    results = round_robin(calls, runs)
    med = medians(results)
    lines = [f"Machine: {machine()}, {threads} threads. A {context}-token prompt (GPL-3 text), then 128 greedy "
             f"tokens; medians of {runs} round-robin runs; ratios are medians of per-round ratios.", "",
             "| system | prompt s | decode tok/s | vs full (fp32) |", "|---|---|---|---|"]
    for name in systems:
        lines.append(f"| {name} | {med[name][0]:.2f} | {med[name][1]:.1f} | "
                     f"{median_ratio(results, name, 'full (fp32)'):.2f}x |")
    publish("kv-speed", lines, f"python bench/bench_kv.py --part speed --runs {runs} --context {context}")


QUICKSILVER = {"skip K/V (QuickSilver)": ROOT / "out" / "quicksilver",
               "propagate K/V (CALM)": ROOT / "out" / "quicksilver-propagate"}
HALT_WINDOW = 512


def layer_params(directory: Path, info) -> int:
    """Weights per decoder layer: the graph's 2-D initializers without the vocabulary-sized ones, / layers."""
    import onnx

    graph = onnx.load(str(directory / "model.onnx"), load_external_data=False).graph
    sizes = [int(np.prod(t.dims)) for t in graph.initializer if len(t.dims) == 2 and info.vocab_size not in t.dims]
    return sum(sizes) // info.num_layers


def halting_flops(halted: np.ndarray, info, params: int) -> tuple[float, float]:
    """FLOPs of one window that halting skips, and the window's dense FLOPs. halted: (layers, seq) bool. A
    token-layer costs 2 x params (the linears) + 4 x position x heads x head_dim (scores and weighted sum); the
    head costs 2 x hidden x vocab per token. Attention that other tokens skip over masked keys is not counted."""
    layers, seq = halted.shape
    per_layer = 2 * params + 4 * (np.arange(seq) + 1) * info.num_heads * info.head_dim  # (seq,)
    skipped = float((halted * per_layer[None, :]).sum())
    total = float(layers * per_layer.sum() + seq * 2 * info.hidden_size * info.vocab_size)
    return skipped, total


def halting_part(thresholds: list[float], threads: int, runs: int) -> None:
    lines = [f"Machine: {machine()}, {threads} threads. PPL on the first {WINDOW} tokens of the GPL-3 text in windows "
             f"of {HALT_WINDOW} (each from an empty cache; the graph halts tokens in prefill exactly as in decode); "
             "FLOPs counted from the graph's `halted` output (min_layer 4, the first token never halts); decode "
             f"tok/s: 32-token prompt, 128 tokens, median of {runs}.", "",
             "| K/V of halted tokens | threshold | PPL | token-layers skipped | decoder FLOPs saved | all FLOPs saved "
             "| decode tok/s |", "|---|---|---|---|---|---|---|"]
    for label, directory in QUICKSILVER.items():
        art = onnxlm.load(directory, threads=threads)
        ids = text_ids(art)[:WINDOW]
        params = layer_params(directory, art.info)
        short = bench_prompt(art.tokenizer, 32)
        for tau in [0.0, *thresholds]:
            counts = {"skipped": 0.0, "total": 0.0, "layer_total": 0.0, "halted": 0}

            def window_logits(window, tau=tau, counts=counts):
                cache = art.session.new_cache(capacity=len(window), halt_threshold=tau)
                yield art.session.step(np.asarray([window], np.int64), cache)[0]  # (window, vocab)
                halted = cache.state["token_halting"].halted[0, :, : len(window)]  # (layers, window)
                s, t = halting_flops(halted, art.info, params)
                counts["skipped"] += s
                counts["total"] += t
                counts["layer_total"] += t - len(window) * 2 * art.info.hidden_size * art.info.vocab_size
                counts["halted"] += int(halted.sum())

            ppl = perplexity(windows_of(ids, HALT_WINDOW), window_logits)["ppl"]
            skipped, total, layer_total, halted_sum = (counts[k] for k in ("skipped", "total", "layer_total",
                                                                           "halted"))
            speed = sorted(time_generation(executor_for(art.session, halt_threshold=tau), short, 128)[1]
                           for _ in range(runs))
            lines.append(f"| {label} | {tau} | {ppl:.3f} | "
                         f"{halted_sum / (art.info.num_layers * len(ids)):.1%} | {skipped / layer_total:.1%} | "
                         f"{skipped / total:.1%} | {speed[len(speed) // 2]:.1f} |")
            print(lines[-1], flush=True)
    publish("kv-halting", lines, f"python bench/bench_kv.py --part halting --thresholds "
                                 f"{' '.join(map(str, thresholds))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("ppl", "memory", "speed", "halting"))
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.15])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=8500)
    parser.add_argument("--every", type=int, default=1024)
    parser.add_argument("--memory-worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        policy, budget, n, every = args.memory_worker
        memory_worker(policy, int(budget) or None, int(n), int(every))
    elif args.part == "ppl":
        ppl_part(args.threads)
    elif args.part == "memory":
        memory_part(args.new_tokens, args.every)
    elif args.part == "speed":
        speed_part(args.runs, args.threads, args.context)
    elif args.part == "halting":
        halting_part(args.thresholds, args.threads, args.runs)
    else:
        parser.error("give --part ppl, memory, speed or halting")


if __name__ == "__main__":
    main()
