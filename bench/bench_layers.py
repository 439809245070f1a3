"""Static layer removal on SmolLM2-135M: PPL against layers removed (PNG), and for the built artifacts PPL, greedy
agreement with the full model over 256 tokens, and decode tok/s, all in one run (round-robin, medians).

Needs out/fp32, out/remove-{2,4,6} and out/early-exit:
    for n in 2 4 6; do onnxlm optimize smollm2-135m -o out/remove-$n --remove-layers $n; done
    onnxlm optimize smollm2-135m -o out/early-exit --recipe early-exit
    python bench/bench_layers.py --runs 5 --threads 2 --exit-thresholds 0.1 0.2
Writes the `layers` section of docs/benchmarks.md and docs/layers-ppl-vs-removed.png (needs matplotlib).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402

import onnxlm  # noqa: E402
from onnxlm.metrics import window_nll  # noqa: E402
from onnxlm.runtime.bench import NEW_TOKENS, PROMPT_TOKENS, bench_prompt, time_generation  # noqa: E402
from onnxlm.runtime.decoding import executor_for  # noqa: E402
from onnxlm.runtime.decoding import Decoding  # noqa: E402

from common import GPL3, ROOT, machine, median_ratio, medians, publish, round_robin  # noqa: E402

REMOVED = (2, 4, 6)
FIRST_EXIT = 20  # the last third of SmolLM2's 30 layers; exits at 15 measured PPL above 1e8 (see docs)
THRESHOLDS = (0.95, 0.98, 0.99, 0.995, 0.998)


def probe_measures(ranking: list[int], ids: list[int], most: int, thresholds) -> tuple[list[float], list[tuple]]:
    """On the probe graph of remove_layers, over `ids`: the PPL with the first k layers of `ranking` skipped
    (k = 0..most), and the early-exit bound (`exit_bound`) at each threshold."""
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
        curve = [probe.ppl(ranking[:k]) for k in range(most + 1)]
        hidden = [np.stack([x[0] for x in outs]).astype(np.float64) for outs in probe.run(probe.hidden_names, [])]
        targets = [np.asarray(w[1:]) for w in probe.windows]
        torch_model = source.torch_model
        final_norm = torch_model.model.norm.weight.detach().double().numpy()
        head = torch_model.lm_head.weight.detach().double().numpy()
        eps = torch_model.config.rms_norm_eps
        bound = exit_bound(hidden, targets, final_norm, head, eps, FIRST_EXIT, thresholds)
        return curve, bound


def exit_bound(hidden_windows, targets, final_norm, head, eps, first_exit: int, thresholds) -> list[tuple]:
    """An optimistic bound for dynamic early exit with a hidden-state convergence signal: token t leaves at the
    first layer E >= first_exit where cos(h_{E-1}, h_E) >= T, and is scored with the final norm and LM head on
    h_E; every token keeps full-depth K/V (a real early exit must fill or recompute them, and can only do
    worse). Returns (T, mean layers computed, PPL) per threshold."""
    rows = []
    for threshold in thresholds:
        nll, count, depth = 0.0, 0, 0
        for hidden, target in zip(hidden_windows, targets):  # hidden (layers + 1, seq, d); target (seq - 1,)
            unit = hidden / np.linalg.norm(hidden, axis=-1, keepdims=True)
            cos = (unit[:-1] * unit[1:]).sum(-1)  # (layers, seq): cos of layer l's input and output
            layers = hidden.shape[0] - 1
            done = cos[first_exit - 1:] >= threshold  # (layers - first_exit + 1, seq): may exit after layer E
            exit_at = np.where(done.any(0), first_exit + done.argmax(0), layers)  # (seq,)
            h = hidden[exit_at, np.arange(hidden.shape[1])][:-1]  # (seq - 1, d)
            normed = h / np.sqrt((h * h).mean(-1, keepdims=True) + eps) * final_norm
            nll += window_nll(normed @ head.T, target)  # logits (seq - 1, vocab)
            count += len(target)
            depth += exit_at[:-1].sum()
        rows.append((threshold, depth / count, math.exp(nll / count)))
    return rows


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
    parser.add_argument("--exit-thresholds", type=float, nargs=2, default=[0.1, 0.2])
    args = parser.parse_args()

    arts = {0: onnxlm.load(ROOT / "out" / "fp32", threads=args.threads)}
    arts.update({n: onnxlm.load(ROOT / "out" / f"remove-{n}", threads=args.threads) for n in REMOVED})
    exiting = onnxlm.load(ROOT / "out" / "early-exit", threads=args.threads, spinning=False)  # takes turns with exits/
    report = next(p for p in arts[6].manifest["passes"] if p["name"] == "remove_layers")["check"]
    alone = report["ppl_without_layer"]
    ranking = sorted(range(len(alone)), key=lambda layer: alone[layer])
    tokenizer = arts[0].tokenizer
    gpl = tokenizer.encode(GPL3.read_text(), add_bos=False)[:4096]

    prompt = arts[0].prompt_ids("Write a short story about a cat who wants to learn to fly.")
    full_tokens = list(arts[0].generate_ids(prompt, 256, ignore_eos=True, decoding=Decoding()))  # greedy
    rows = {}
    for n, art in arts.items():
        tokens = list(art.generate_ids(prompt, 256, ignore_eos=True, decoding=Decoding()))
        removed = [] if n == 0 else next(p for p in art.manifest["passes"]
                                         if p["name"] == "remove_layers")["check"]["removed_layers"]
        rows[n] = {"ppl": art.perplexity(text=GPL3.read_text(), max_tokens=4096)["ppl"],
                   "agree": agreement(full_tokens, tokens), "removed": removed}
    for t in args.exit_thresholds:
        tokens = list(exiting.generate_ids(prompt, 256, ignore_eos=True, decoding=Decoding(exit_threshold=t)))
        scored = exiting.perplexity(text=GPL3.read_text(), max_tokens=4096, exit_threshold=t)
        rows[f"exit {t}"] = {"ppl": scored["ppl"], "agree": agreement(full_tokens, tokens),
                             "exit_rate": scored["exit_rate"], "layer": scored["exit_layer"]}
        print(f"exit {t}", rows[f"exit {t}"], flush=True)
    short = bench_prompt(tokenizer, PROMPT_TOKENS)
    timed = {n: (lambda a=a: time_generation(executor_for(a.session), short, NEW_TOKENS)) for n, a in arts.items()}
    timed.update({f"exit {t}": (lambda t=t: time_generation(
        executor_for(exiting.session, exit_threshold=t, exits=exiting.exit_segments()), short, NEW_TOKENS))
                  for t in args.exit_thresholds})
    runs = round_robin(timed, args.runs)
    speeds = medians(runs)
    curve, bound = probe_measures(ranking, gpl, args.curve_layers, THRESHOLDS)
    plot(curve, {n: (rows[n]["ppl"], speeds[n][1]) for n in arts}, ROOT / "docs" / "layers-ppl-vs-removed.png")

    lines = [f"Machine: {machine()}; {args.threads} threads; decode = 128 new tokens after a 32-token prompt, median "
             f"of {args.runs} round-robin runs (speed-up: median of per-round ratios); PPL on GPL-3, first 4096 tokens, windows of 512; agreement = "
             "share of 256 greedy tokens (chat prompt, EOS ignored) equal to the full model's, position by position.",
             "", "| model | layers removed (by PPL without the layer, on the calibration text) | PPL | greedy "
             "agreement | decode tok/s | speed-up |", "|---|---|---|---|---|---|"]
    for n in arts:
        r = rows[n]
        name = "full (`fp32`)" if n == 0 else f"`--remove-layers {n}`"
        lines.append(f"| {name} | {r['removed'] or '-'} | {r['ppl']:.3f} | {r['agree']:.0%} | {speeds[n][1]:.1f} | "
                     f"{median_ratio(runs, n, 0):.2f}x |")
    for t in args.exit_thresholds:
        r, name = rows[f"exit {t}"], f"exit {t}"
        lines.append(f"| early exit (`--exit-threshold {t}`) | none; {r['exit_rate']:.0%} of decode steps stop after "
                     f"layer {r['layer'] - 1} | {r['ppl']:.3f} | {r['agree']:.0%} | {speeds[name][1]:.1f} | "
                     f"{median_ratio(runs, name, 0):.2f}x |")
    lines += ["", f"PPL as layers are removed in rank order {ranking[:args.curve_layers]} (probe graph, GPL-3): "
              + ", ".join(f"{k}: {p:.2f}" for k, p in enumerate(curve)) + ".",
              "", "![PPL against layers removed](layers-ppl-vs-removed.png)", "",
              "Early exit, optimistic bound (not the runtime feature): each token leaves at the first layer "
              f"E >= {FIRST_EXIT} whose input and output have cosine >= T, scored with the final norm and LM head on "
              "that hidden state, while every token keeps full-depth K/V (probe graph, GPL-3 4096 tokens). Static removal at "
              "the same average depth, from the curve above (interpolated):", "",
              "| threshold T | mean layers computed | PPL (bound) | static removal PPL at that depth |",
              "|---|---|---|---|"]
    layers = arts[0].info.num_layers
    for threshold, depth, ppl in bound:
        removed = layers - depth
        static = float(np.interp(removed, range(len(curve)), curve)) if removed <= len(curve) - 1 else float("nan")
        lines.append(f"| {threshold} | {depth:.2f} | {ppl:.2f} | {static:.2f} |")
    publish("layers", lines, f"python bench/bench_layers.py --runs {args.runs} --threads {args.threads} "
                             f"--exit-thresholds {' '.join(map(str, args.exit_thresholds))}")


if __name__ == "__main__":
    main()
