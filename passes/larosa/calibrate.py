"""La RoSA calibration: per layer, the eigenbasis of the uncentered second moment of the attention-block input.

H_l = sum_t x_t^T x_t over the calibration tokens, accumulated in float64, x_t the attention input after the
input RMSNorm (gamma included, as the released code takes it; rotate.py scales the moment of the gamma-free norm
output by gamma on both sides); Q_l = eigenvectors of H_l + 0.01 * mean(diag H_l) * I, columns by descending
eigenvalue (the released code's `eigh`, damping as there). Activations come from ONNX Runtime on the graph
itself: the norm outputs are made extra graph outputs for one save.
"""

from __future__ import annotations

import numpy as np

from onnxlm.errors import OnnxlmError
from onnxlm.passes.base import PassContext

WINDOW = 512


def second_moments(model, values: list, ctx: PassContext, tokens: int) -> tuple[list[np.ndarray], int]:
    """H per value (d, d) float64 over the first `tokens` calibration tokens, in windows of 512 from an empty
    cache; and the count of tokens used."""
    import onnx_ir as ir

    from onnxlm.passes.evaluate import feeds_for, open_session, windows_of

    ids = ctx.calibration_ids[:tokens]
    if len(ids) < 16:
        raise OnnxlmError("La RoSA calibration needs calibration text: fewer than 16 calibration tokens")
    graph = model.graph
    kept = len(graph.outputs)
    graph.outputs.extend(values)
    try:
        ctx.scratch.mkdir(parents=True, exist_ok=True)
        path = ctx.scratch / "larosa_calibration.onnx"
        ir.save(model, path, external_data="larosa_calibration.onnx.data")
    finally:
        del graph.outputs[kept:]
    session = open_session(path)
    names = [v.name for v in values]
    moments = [np.zeros((v.shape[-1],) * 2) for v in values]  # (d, d) each
    count = 0
    for window in windows_of(ids, WINDOW):
        tokens_arr = np.asarray([window], np.int64)
        for h, x in zip(moments, session.run(names, feeds_for(session, ctx.info, tokens_arr, 0, None,
                                                                      interface=ctx.interface))):
            x = x.reshape(-1, x.shape[-1]).astype(np.float64)  # (seq, d)
            h += x.T @ x
        count += len(window)
    return moments, count


def rotation(moment: np.ndarray, damping: float) -> tuple[np.ndarray, np.ndarray]:
    """(Q, eigenvalues): Q's columns are the eigenvectors of the damped moment, largest eigenvalue first."""
    damped = moment + damping * np.mean(np.diag(moment)) * np.eye(len(moment))
    eigenvalues, vectors = np.linalg.eigh(damped)
    return vectors[:, ::-1].copy(), eigenvalues[::-1].copy()
