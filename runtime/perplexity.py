"""Perplexity over non-overlapping windows, each scored from an empty cache, no special tokens added.

A window of W tokens scores W-1 predictions; PPL = exp(mean negative log-likelihood over all windows).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np

from onnxlm.errors import OnnxlmError
from onnxlm.metrics import window_nll
from onnxlm.runtime.session import DecoderSession


def perplexity(
    model: DecoderSession,
    token_ids: list[int],
    window: int = 512,
    on_window: Callable[[int, int], None] | None = None,
) -> dict:
    if window < 2:
        raise OnnxlmError(f"--window must be at least 2, got {window}")
    windows = [token_ids[i : i + window] for i in range(0, len(token_ids), window)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise OnnxlmError("the text has fewer than 2 tokens: nothing to score")
    start = time.perf_counter()
    total_nll, scored = 0.0, 0
    for i, ids in enumerate(windows):
        logits = model.step(np.asarray([ids], np.int64), model.new_cache(capacity=len(ids)))[0]  # (window, vocab)
        total_nll += window_nll(logits[:-1], np.asarray(ids[1:]))
        scored += len(ids) - 1
        if on_window:
            on_window(i + 1, len(windows))
    return {
        "ppl": math.exp(total_nll / scored),
        "nll": total_nll / scored,
        "tokens": len(token_ids),
        "scored_tokens": scored,
        "windows": len(windows),
        "window": window,
        "seconds": time.perf_counter() - start,
    }
