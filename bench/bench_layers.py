"""Static layer removal on SmolLM2-135M: PPL against layers removed (PNG), and for the built artifacts PPL, greedy
agreement with the full model over 256 tokens, and decode tok/s, all in one run (round-robin, medians).

Needs out/fp32 and out/remove-{2,4,6}:
    for n in 2 4 6; do onnxlm optimize smollm2-135m -o out/remove-$n --remove-layers $n; done
    python bench/bench_layers.py --runs 5 --threads 2
Writes the `layers` section of docs/benchmarks.md and docs/layers-ppl-vs-removed.png (needs matplotlib).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import onnxlm  # noqa: E402
from onnxlm.runtime.bench import NEW_TOKENS, PROMPT_TOKENS, bench_prompt, time_generation  # noqa: E402

from common import GPL3, ROOT, machine, publish, round_robin  # noqa: E402

REMOVED = (2, 4, 6)


def ppl_curve(ranking: list[int], ids: list[int], most: int) -> list[float]:
    """GPL-3 PPL with the first k layers of `ranking` skipped, k = 0..most, on the probe graph of remove_layers."""
    from onnxlm.frontend import load_source
    from onnxlm.frontend.export import export_decoder
    from onnxlm.passes.base import PassContext
    from onnxlm.passes.cleanup import Cleanup
    from onnxlm.passes.layers.remove_layers import LayerProbe

    source = load_source("smollm2-135m")
    model = export_decoder(source.torch_model, source.info)
    with tempfile.TemporaryDirectory() as scratch:
        ctx = PassContext(info=source.info, source={}, scratch=Path(scratch))
        Cleanup().run(model, ctx)
        probe = LayerProbe(model, ctx, ids)
        return [probe.ppl(ranking[:k]) for k in range(most + 1)]


def agreement(full: list[int], other: list[int]) -> float:
    return sum(a == b for a, b in zip(full, other)) / len(full)


def plot(curve: list[float], points: dict[int, tuple[float, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(range(len(curve)), curve, "o-", label="PPL (probe, GPL-3)")
    ax.set_yscale("log")
    ax.set_xlabel("layers removed (least important first)")
    ax.set_ylabel("perplexity, GPL-3 4096 tokens")
    for n, (ppl, tok_s) in points.items():
        ax.annotate(f"{tok_s:.0f} tok/s", (n, ppl), textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--curve-layers", type=int, default=12)
    args = parser.parse_args()

    arts = {0: onnxlm.load(ROOT / "out" / "fp32", threads=args.threads)}
    arts.update({n: onnxlm.load(ROOT / "out" / f"remove-{n}", threads=args.threads) for n in REMOVED})
    report = next(p for p in arts[6].manifest["passes"] if p["name"] == "remove_layers")["check"]
    alone = report["ppl_without_layer"]
    ranking = sorted(range(len(alone)), key=lambda layer: alone[layer])
    tokenizer = arts[0].tokenizer
    gpl = tokenizer.encode(GPL3.read_text(), add_bos=False)[:4096]

    prompt = arts[0].prompt_ids("Write a short story about a cat who wants to learn to fly.")
    full_tokens = list(arts[0].generate_ids(prompt, 256, ignore_eos=True))
    rows = {}
    for n, art in arts.items():
        tokens = list(art.generate_ids(prompt, 256, ignore_eos=True))
        removed = [] if n == 0 else next(p for p in art.manifest["passes"]
                                         if p["name"] == "remove_layers")["check"]["removed_layers"]
        rows[n] = {"ppl": art.perplexity(text=GPL3.read_text(), max_tokens=4096)["ppl"],
                   "agree": agreement(full_tokens, tokens), "removed": removed}
    short = bench_prompt(tokenizer, PROMPT_TOKENS)
    speeds = round_robin({n: (lambda a=a: time_generation(a.session, short, NEW_TOKENS)) for n, a in arts.items()},
                         args.runs)
    curve = ppl_curve(ranking, gpl, args.curve_layers)
    plot(curve, {n: (rows[n]["ppl"], speeds[n][1]) for n in arts}, ROOT / "docs" / "layers-ppl-vs-removed.png")

    lines = [f"Machine: {machine()}; {args.threads} threads; decode = 128 new tokens after a 32-token prompt, median "
             f"of {args.runs} round-robin runs; PPL on GPL-3, first 4096 tokens, windows of 512; agreement = "
             "share of 256 greedy tokens (chat prompt, EOS ignored) equal to the full model's, position by position.",
             "", "| model | layers removed (by PPL without the layer, on the calibration text) | PPL | greedy "
             "agreement | decode tok/s | speed-up |", "|---|---|---|---|---|---|"]
    for n in arts:
        r = rows[n]
        name = "full (`fp32`)" if n == 0 else f"`--remove-layers {n}`"
        lines.append(f"| {name} | {r['removed'] or '-'} | {r['ppl']:.3f} | {r['agree']:.0%} | {speeds[n][1]:.1f} | "
                     f"{speeds[n][1] / speeds[0][1]:.2f}x |")
    lines += ["", f"PPL as layers are removed in rank order {ranking[:args.curve_layers]} (probe graph, GPL-3): "
              + ", ".join(f"{k}: {p:.2f}" for k, p in enumerate(curve)) + ".",
              "", "![PPL against layers removed](layers-ppl-vs-removed.png)"]
    publish("layers", lines, f"python bench/bench_layers.py --runs {args.runs} --threads {args.threads}")


if __name__ == "__main__":
    main()
