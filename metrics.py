"""Numeric measures shared by the passes (cost reports) and the runtime (eval): plain numpy, no session."""

from __future__ import annotations

import numpy as np


def window_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Summed NLL of `targets` (n,) under `logits` (n, vocab), computed in float64."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=-1))
    return float((log_z - shifted[np.arange(len(targets)), targets]).sum())


def relative_error(reference: np.ndarray, approx: np.ndarray) -> float:
    """||approx - reference|| / ||reference|| (Frobenius), in float64."""
    ref = reference.astype(np.float64)
    return float(np.linalg.norm(approx.astype(np.float64) - ref) / max(np.linalg.norm(ref), 1e-30))


def windows_of(ids: list[int], window: int) -> list[list[int]]:
    """`ids` cut into non-overlapping windows of `window` tokens, without a last window too short to score."""
    return [w for w in (ids[i : i + window] for i in range(0, len(ids), window)) if len(w) >= 2]
