"""Run a recipe's passes over a graph, instrumented the way MLIR's pass manager is.

After every pass: the onnx checker and an ONNX Runtime session must accept the graph, and the logits on a fixed
probe input are computed. A lossless pass must keep them within atol + rtol * max|logit| of the graph before it,
or the pipeline stops with an error and nothing is written.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from onnxlm.errors import OnnxlmError
from onnxlm.model_info import ModelInfo
from onnxlm.passes.base import PassContext, PassReport
from onnxlm.passes.recipe import Recipe

PROBE_PAST, PROBE_SEQ = 3, 4

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


def probe_logits(session, info: ModelInfo) -> np.ndarray:
    """Logits of random tokens in two steps: a prefill of 3 tokens from an empty cache, then 4 more tokens on
    the cache it produced. Both the no-past and the with-past paths are exercised, on realistic K/V values."""
    rng = np.random.default_rng(0)
    names = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    past = {n: np.zeros((1, info.num_kv_heads, 0, info.head_dim), np.float32)  # (batch, kv_heads, 0, head_dim)
            for n in names if n.startswith("past_key_values.")}
    start = 0
    for seq in (PROBE_PAST, PROBE_SEQ):
        feeds = {"input_ids": rng.integers(0, info.vocab_size, (1, seq), dtype=np.int64), **past}
        if "attention_mask" in names:
            feeds["attention_mask"] = np.ones((1, start + seq), np.int64)
        if "position_ids" in names:
            feeds["position_ids"] = np.arange(start, start + seq, dtype=np.int64)[None]
        unknown = set(names) - set(feeds)
        if unknown:
            raise OnnxlmError(f"the graph has inputs the probe does not know: {sorted(unknown)}")
        result = dict(zip(outputs, session.run(outputs, feeds)))
        past = {n: result[n.replace("past_key_values.", "present.")] for n in past}
        start += seq
    return result["logits"]  # (1, PROBE_SEQ, vocab)


def check_graph(model, info: ModelInfo, scratch: Path) -> np.ndarray:
    """Save, run the onnx checker, create an ORT session, and return the probe logits (1, seq, vocab)."""
    import onnx_ir as ir
    import onnxruntime as ort

    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / "check.onnx"
    ir.save(model, path, external_data="check.onnx.data")
    try:
        onnx_check(path)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # intermediate graphs may carry dead initializers; that is not news
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return probe_logits(session, info)
    except OnnxlmError:
        raise
    except Exception as exc:
        raise OnnxlmError(f"the graph fails its check: {str(exc).splitlines()[0]}") from None


def run_pipeline(
    model, recipe: Recipe, ctx: PassContext, on_pass: Callable[[str], None] | None = None
) -> list[PassReport]:
    """Apply the recipe's passes to `model` in place and return one report per pass."""
    reference = check_graph(model, ctx.info, ctx.scratch)
    reports = []
    for p in recipe.passes:
        if on_pass:
            on_pass(p.name)
        nodes_before = len(model.graph)
        start = time.perf_counter()
        modified, matched, notes = p.run(model, ctx)
        seconds = time.perf_counter() - start
        logits = check_graph(model, ctx.info, ctx.scratch)
        check = {}
        if p.lossless:
            diff = float(np.abs(logits - reference).max())
            bound = p.atol + p.rtol * float(np.abs(reference).max())
            check = {"max_abs_logit_diff": diff, "tolerance": bound}
            if not diff <= bound:
                raise OnnxlmError(
                    f"pass '{p.name}' should be lossless but moved the logits by {diff:.3g} (> {bound:.3g})"
                )
        if not modified:
            notes = [*notes, "matched nothing: the graph is unchanged"]
        reference = logits
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
    return reports
