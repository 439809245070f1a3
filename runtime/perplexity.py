"""Perplexity over non-overlapping windows, each scored from an empty cache, no special tokens added.

A window of W tokens scores W-1 predictions; PPL = exp(mean negative log-likelihood over all windows).
On a La RoSA graph the per-token top-k, which the graph applies in decode only, runs on every position: top-k is
per token, so this is the PPL that decoding the text token by token would give.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np

from onnxlm.errors import OnnxlmError
from onnxlm.metrics import window_nll, windows_of
from onnxlm.runtime.session import DecoderSession


def scoring_windows(token_ids: list[int], window: int) -> list[list[int]]:
    """The windows every runtime PPL scores, each from an empty cache; an error if there is nothing to score."""
    if window < 2:
        raise OnnxlmError(f"--window must be at least 2, got {window}")
    windows = windows_of(token_ids, window)
    if not windows:
        raise OnnxlmError("the text has fewer than 2 tokens: nothing to score")
    return windows


def perplexity(
    model: DecoderSession,
    token_ids: list[int],
    window: int = 512,
    on_window: Callable[[int, int], None] | None = None,
    halt_threshold: float | None = None,
) -> dict:
    """PPL of `token_ids`; `halt_threshold` runs QuickSilver token halting (quicksilver graphs), and the result
    then says which fraction of the token-layers halting skipped."""
    windows = scoring_windows(token_ids, window)
    start = time.perf_counter()
    total_nll, scored, skipped, run = 0.0, 0, 0, 0
    for i, ids in enumerate(windows):
        cache = model.new_cache(capacity=len(ids), halt_threshold=halt_threshold)
        cache.sparse_all_positions = True  # La RoSA: score what decoding computes (per-token top-k everywhere)
        logits = model.step(np.asarray([ids], np.int64), cache)[0]  # (window, vocab)
        skipped, run = skipped + cache.layers_skipped, run + cache.layers_run
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
        **({"halt_threshold": halt_threshold, "layers_skipped": skipped / run} if model.halting else {}),
    }
