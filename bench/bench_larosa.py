"""La RoSA on SmolLM2-135M: the rotation's lossless check, PPL with top-k sparsity at s = 0.25 and 0.40 against
dense, weight bytes read per decode token, and decode tok/s of fp32 / larosa-rotate / larosa-s25 / larosa-s40, all
from one run (round-robin, medians).

Needs out/fp32 and out/larosa-{rotate,s25,s40}:
    for r in larosa-rotate larosa-s25 larosa-s40; do onnxlm optimize smollm2-135m -o out/$r --recipe $r; done
    python bench/bench_larosa.py --runs 5 --threads 2 [--dry-run] [--report FILE]
PPL of the sparse artifacts is scored with `sparsify_all_positions=true` (every position on the sparse path, which
is what decoding token by token gives, since top-k is per token). Writes the `larosa` section of
docs/benchmarks.md unless --dry-run; --report also writes the table to FILE.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402

import onnxlm  # noqa: E402
from onnxlm.passes.evaluate import feeds_for, open_session, session_perplexity  # noqa: E402
from onnxlm.passes.larosa.sparsify import SWITCH  # noqa: E402
from onnxlm.runtime.bench import PREFILL_TOKENS, PROMPT_TOKENS, bench_prompt  # noqa: E402

from common import GPL3, ROOT, machine, median_ratio, medians, onnxlm_timing, publish, round_robin  # noqa: E402

SYSTEMS = {"fp32": "fp32", "larosa-rotate": "larosa-rotate", "larosa-s25": "larosa-s25", "larosa-s40": "larosa-s40"}
PAPER = "the paper: +0.17 PPL at 40% on Llama-2-7B (WikiText-2)"


def report_of(art, name: str) -> dict:
    return next((p["check"] for p in art.manifest["passes"] if p["name"] == name), {})


def max_logit_diff(a: Path, b: Path, info, ids: list[int], steps: int = 8) -> float:
    """Max |logit difference| of two graphs: a prefill of ids[:-steps] from an empty cache, then `steps` decode
    steps on the cache it made."""
    results = []
    for path in (a, b):
        session = open_session(path / "model.onnx")
        outputs = [o.name for o in session.get_outputs()]
        start = len(ids) - steps
        result = dict(zip(outputs, session.run(outputs, feeds_for(session, info, np.asarray([ids[:start]]), 0, None))))
        logits = [result["logits"][0]]  # (start, vocab), then (1, vocab) per step
        for t in range(start, len(ids)):
            past = {n.replace("present.", "past_key_values."): v for n, v in result.items() if n.startswith("present.")}
            result = dict(zip(outputs, session.run(outputs, feeds_for(session, info, np.asarray([[ids[t]]]), t, past))))
            logits.append(result["logits"][0])
        results.append(np.concatenate(logits))
    return float(np.abs(results[0] - results[1]).max())


def unrotated_topk(fp32: Path, info, ids: list[int], sparsity: float) -> tuple[float, dict]:
    """(PPL, bytes) of plain magnitude top-k (TEAL-style, no rotation) on the fp32 graph: the baseline that the
    rotation has to beat. Built in memory from out/fp32 with the same pass."""
    import tempfile

    import onnx_ir as ir

    from onnxlm.passes.base import PassContext
    from onnxlm.passes.larosa.sparsify import TopkSparsify

    model = ir.load(fp32 / "model.onnx")
    with tempfile.TemporaryDirectory() as scratch:
        ctx = PassContext(info=info, source={}, scratch=Path(scratch))
        TopkSparsify(sparsity=sparsity).run(model, ctx)
        ir.save(model, Path(scratch) / "m.onnx", external_data="m.onnx.data")
        session = open_session(Path(scratch) / "m.onnx")
        ppl = session_perplexity(session, info, ids, 512, {SWITCH: np.array(True)})
    return ppl, ctx.metrics["weight_bytes_per_token"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ppl-tokens", type=int, default=4096)
    parser.add_argument("--dry-run", action="store_true", help="print the table, do not touch docs/")
    parser.add_argument("--report", type=Path, help="also write the table to this file")
    args = parser.parse_args()

    dirs = {name: ROOT / "out" / d for name, d in SYSTEMS.items()}
    missing = [str(p) for p in dirs.values() if not (p / "model.onnx").is_file()]
    if missing:
        sys.exit(f"missing artifacts: {', '.join(missing)} (see this script's docstring)")
    arts = {name: onnxlm.load(d, threads=args.threads) for name, d in dirs.items()}
    info = arts["fp32"].info
    gpl = arts["fp32"].tokenizer.encode(GPL3.read_text(), add_bos=False)[:args.ppl_tokens]

    # 1. lossless: the rotated graph against fp32 (a 512-token prefill and 8 decode steps, GPL-3 text)
    diff = max_logit_diff(dirs["fp32"], dirs["larosa-rotate"], info, gpl[:520])
    manager_check = report_of(arts["larosa-rotate"], "rotate_residual")
    # 2. PPL (GPL-3, windows of 512); sparse artifacts with every position on the sparse path
    rows = {}
    for name, d in dirs.items():
        session = open_session(d / "model.onnx", args.threads)
        sparse = SWITCH in {i.name for i in session.get_overridable_initializers()}
        extra = {SWITCH: np.array(True)} if sparse else None
        topk = report_of(arts[name], "topk_sparsify")
        bytes_ = topk.get("weight_bytes_per_token", {})
        rows[name] = {"ppl": session_perplexity(session, info, gpl, 512, extra), "bytes": bytes_,
                      "calibration": (topk.get("ppl_before"), topk.get("ppl_after"))}
        del session
    base_bytes = rows["larosa-s25"]["bytes"]
    dense_rotated, dense_plain = base_bytes["dense"], base_bytes["dense_without_adapters"]
    bytes_per_token = {"fp32": dense_plain, "larosa-rotate": dense_rotated,
                       "larosa-s25": rows["larosa-s25"]["bytes"]["sparse"],
                       "larosa-s40": rows["larosa-s40"]["bytes"]["sparse"]}
    baselines = {s: unrotated_topk(dirs["fp32"], info, gpl, s) for s in (0.25, 0.40)}
    # 3. decode tok/s, round-robin
    short = bench_prompt(arts["fp32"].tokenizer, PROMPT_TOKENS)
    long = bench_prompt(arts["fp32"].tokenizer, PREFILL_TOKENS)
    runs = round_robin({n: (lambda a=a: onnxlm_timing(a, short, long)) for n, a in arts.items()}, args.runs)
    speeds = medians(runs)

    dense_ppl = rows["fp32"]["ppl"]
    lines = [
        f"Machine: {machine()}; {args.threads} threads; decode = 128 new tokens after a 32-token prompt, prefill = "
        f"512 tokens, medians of {args.runs} round-robin runs (speed-up: median of per-round ratios). PPL on GPL-3, "
        f"first {len(gpl)} tokens, windows of 512; the sparse artifacts are scored with `{SWITCH}=true` (top-k on "
        "every position, which equals decoding token by token). Bytes: float weight bytes one decode token reads "
        "(sparse: only the weight rows of the kept activations; the d x d adapters and the untied LM head dense).",
        "",
        f"Lossless check of `rotate_residual`: max |logit - fp32 logit| = {diff:.2e} over a 512-token prefill and 8 "
        f"decode steps (the pass's own check in the manager, random tokens: "
        f"{manager_check.get('max_abs_logit_diff', float('nan')):.2e} <= "
        f"{manager_check.get('tolerance', float('nan')):.2e}).",
        "",
        "| artifact | PPL | dPPL vs fp32 | weight MB / token | vs fp32 | decode tok/s | speed-up | prefill 512 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in arts:
        ppl, mb = rows[name]["ppl"], bytes_per_token[name] / 1e6
        lines.append(f"| `{name}` | {ppl:.3f} | {ppl - dense_ppl:+.3f} | {mb:.1f} | {mb * 1e6 / dense_plain:.2f}x | "
                     f"{speeds[name][1]:.1f} | {median_ratio(runs, name, 'fp32'):.2f}x | {speeds[name][2] * 1e3:.0f} |")
    for sparsity, (ppl, b) in baselines.items():
        lines.append(f"| `fp32` + `topk_sparsify` {sparsity:.2f}, no rotation | {ppl:.3f} | {ppl - dense_ppl:+.3f} | "
                     f"{b['sparse'] / 1e6:.1f} | {b['sparse'] / dense_plain:.2f}x | - | - | - |")
    lines += ["", f"For reference, {PAPER}. La RoSA ships as an accuracy mode: ONNX Runtime has no sparse-input "
              "GEMV (a Gather of the kept weight rows measured ~1.9x slower than the dense MatMul), so the sparse "
              "artifacts compute the dense MatMuls after the top-k masks and cannot be faster; the bytes column is "
              "what a row-skipping kernel would read."]
    command = f"python bench/bench_larosa.py --runs {args.runs} --threads {args.threads}"
    table = "\n".join([*lines, "", f"Command: `{command}`"])
    if args.report:
        args.report.write_text(table + "\n")
    if args.dry_run:
        print(table)
        return
    try:
        publish("larosa", lines, command)
    except (OSError, ValueError) as exc:  # no `larosa` section in docs/benchmarks.md yet
        print(f"not written to docs/benchmarks.md ({exc}); add <!-- larosa:start --> / <!-- larosa:end -->")


if __name__ == "__main__":
    main()
