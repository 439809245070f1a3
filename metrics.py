"""Numeric measures shared by the passes (cost reports) and the runtime (eval): plain numpy, no session."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

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


def perplexity(windows: list[list[int]], window_logits: Callable[[list[int]], Iterable[np.ndarray]],
               on_window: Callable[[int, int], None] | None = None) -> dict:
    """The one perplexity loop, shared by the pass manager's cost reports, the passes that measure, and `eval`.

    Each window is scored from an empty cache: `window_logits(ids)` yields blocks of logits (n, vocab), in
    order, whose rows predict ids[1], ids[2], ... (a block may carry one row too many, the last position's
    prediction past the window, which is dropped). How a block is computed (one prefill, a bounded cache, token
    by token with early exit) is the caller's; the scoring is here. PPL = exp(mean NLL over every prediction)."""
    start = time.perf_counter()
    nll, scored = 0.0, 0
    for i, ids in enumerate(windows):
        done = 0
        for logits in window_logits(ids):
            targets = np.asarray(ids[done + 1 : done + 1 + len(logits)])
            nll += window_nll(logits[: len(targets)], targets)
            done += len(targets)
        if done != len(ids) - 1:
            raise ValueError(f"a window of {len(ids)} tokens got {done} predictions, not {len(ids) - 1}")
        scored += done
        if on_window:
            on_window(i + 1, len(windows))
    return {"ppl": math.exp(nll / scored), "nll": nll / scored, "scored_tokens": scored, "windows": len(windows),
            "seconds": time.perf_counter() - start}
