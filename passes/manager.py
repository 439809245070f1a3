"""Run a recipe's passes over a graph, instrumented the way MLIR's pass manager is.

After every pass: the onnx checker and an ONNX Runtime session must accept the graph, and the logits on a fixed
probe input are computed. A lossless pass must keep them within atol + rtol * max|logit| of the graph before it,
or the pipeline stops with an error and nothing is written (on a graph whose MatMulNBits round their activations
to int8, a pass that misses the bound is checked again with float activations on both sides, and the report
keeps both numbers). A lossy pass reports its cost instead: the PPL on
the calibration text before and after it, plus what the pass measured itself (weight error, sizes).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from onnxlm.errors import OnnxlmError, first_line
from onnxlm.passes.base import PassContext, PassReport
from onnxlm.passes.evaluate import open_session, probe_logits, session_perplexity
from onnxlm.passes.recipe import Recipe

# ORT contrib ops that live in the default ONNX domain; the onnx checker has no schema for them, so a graph with
# them is checked by ORT session creation alone.
ORT_OPS_IN_ONNX_DOMAIN = {"SimplifiedLayerNormalization"}


def onnx_check(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        if not any(f"No Op registered for {op} " in str(exc) for op in ORT_OPS_IN_ONNX_DOMAIN):
            raise


def check_graph(model, ctx: PassContext, text_ids: list[int] | None = None) -> tuple[np.ndarray, float | None]:
    """Save, run the onnx checker, create an ORT session on the probe backend; return the probe logits
    (1, seq, vocab) and, when `text_ids` are given, the PPL on them."""
    import onnx_ir as ir

    ctx.scratch.mkdir(parents=True, exist_ok=True)
    path = ctx.scratch / "check.onnx"
    ir.save(model, path, external_data="check.onnx.data")
    try:
        onnx_check(path)
        session = open_session(path, backend=ctx.probe)
        ppl = session_perplexity(session, ctx.info, text_ids, interface=ctx.interface) if text_ids else None
        return probe_logits(session, ctx.info, ctx.interface), ppl
    except OnnxlmError:
        raise
    except Exception as exc:
        raise OnnxlmError(f"the graph fails its check: {first_line(exc)}") from None


def int8_activations(model) -> bool:
    """Whether some MatMulNBits quantizes its activations to int8 per block (accuracy_level > 0)."""
    return any(n.op_type == "MatMulNBits" and n.attributes.get_int("accuracy_level", 0) for n in model.graph)


def float_activation_logits(model, ctx: PassContext) -> np.ndarray:
    """The probe logits of a copy of `model` whose MatMulNBits keep float activations (accuracy_level 0): the
    same weights, without the per-block int8 rounding of the activations."""
    import onnx_ir as ir

    copy = model.clone()
    for node in copy.graph:
        if node.op_type == "MatMulNBits":
            node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", 0)
    return check_graph(copy, ctx)[0]


def run_pipeline(
    model, recipe: Recipe, ctx: PassContext, on_pass: Callable[[str], None] | None = None,
    after_pass: Callable[[int, list[PassReport]], None] | None = None,
) -> list[PassReport]:
    """Apply the recipe's passes to `model` in place and return one report per pass. `after_pass(i, reports)`
    runs once the first i passes are done and checked (the graph cache snapshots there).

    When the recipe has a lossy pass, every graph is also scored on the calibration text, so that each lossy
    pass reports its cost as the PPL before and after it. A pass may re-encode the calibration text (trim_vocab):
    each graph is scored on the ids as they are after it."""
    scored = any(not p.lossless for p in recipe.passes)
    reference, ppl = check_graph(model, ctx, ctx.calibration_ids if scored else None)
    reports = []
    for p in recipe.passes:
        if on_pass:
            on_pass(p.name)
        nodes_before = len(model.graph)
        before = model.clone() if p.lossless and int8_activations(model) else None
        ctx.metrics = {}
        start = time.perf_counter()
        modified, matched, notes = p.run(model, ctx)
        seconds = time.perf_counter() - start
        if modified:
            ctx.interface.add(p.ports(ctx.info), p.features())
        logits, ppl_after = check_graph(model, ctx, ctx.calibration_ids if scored else None)
        # the probe's logit drift (None when the pass changed the vocabulary: trim_vocab)
        diff = float(np.abs(logits - reference).max()) if logits.shape == reference.shape else None
        if not p.lossless:  # its cost: the PPL and the probe's logit drift
            check = {"ppl_before": ppl, "ppl_after": ppl_after, "ppl_tokens": len(ctx.calibration_ids),
                     "max_abs_logit_diff": diff, **ctx.metrics}
        else:
            bound = p.atol + p.rtol * float(np.abs(reference).max())
            check = {"max_abs_logit_diff": diff, "tolerance": bound, **ctx.metrics}  # and what the pass checked
            if not diff <= bound and before is not None:
                # int8 activations round per block: a last-bit change upstream (another attention kernel path)
                # flips a rounding and moves the logits by a quantization step. The pass is checked on the same
                # weights with float activations instead; both numbers are recorded.
                exact_before = float_activation_logits(before, ctx)
                diff = float(np.abs(float_activation_logits(model, ctx) - exact_before).max())
                bound = p.atol + p.rtol * float(np.abs(exact_before).max())
                check = {**check, "max_abs_logit_diff": diff, "tolerance": bound,
                         "int8_activation_diff": check["max_abs_logit_diff"]}
            if not diff <= bound:
                raise OnnxlmError(
                    f"pass '{p.name}' should be lossless but moved the logits by {diff:.3g} (> {bound:.3g})"
                )
        if not modified:
            notes = [*notes, "matched nothing: the graph is unchanged"]
        reference, ppl = logits, ppl_after
        reports.append(
            PassReport(
                name=p.name,
                options=p.to_dict(),
                modified=modified,
                matched=matched,
                nodes_before=nodes_before,
                nodes_after=len(model.graph),
                seconds=round(seconds, 3),
                check=check,
                notes=notes,
            )
        )
        if after_pass:
            after_pass(len(reports), reports)
    return reports
