"""Perplexity over non-overlapping windows, each scored from an empty cache, no special tokens added.

A window of W tokens scores W-1 predictions; PPL = exp(mean negative log-likelihood over all windows). The loop
is metrics.perplexity, the one the passes' cost reports use too; here an executor (execution.py) computes each
window's logits: its first block of tokens in one prefill, the rest one decode step at a time. On the full cache
that is the whole window in one prefill, with `scoring` on: on a La RoSA graph the per-token top-k, which the
graph applies in decode only, then runs on every position (top-k is per token, so this is the PPL that decoding
the text token by token gives).
"""

from __future__ import annotations

from collections.abc import Callable

from onnxlm.errors import OnnxlmError
from onnxlm.metrics import perplexity as score_windows
from onnxlm.metrics import windows_of
from onnxlm.runtime.execution import Executor, Plain


def scoring_windows(token_ids: list[int], window: int) -> list[list[int]]:
    """The windows every runtime PPL scores, each from an empty cache; an error if there is nothing to score."""
    if window < 2:
        raise OnnxlmError(f"--window must be at least 2, got {window}")
    windows = windows_of(token_ids, window)
    if not windows:
        raise OnnxlmError("the text has fewer than 2 tokens: nothing to score")
    return windows


def perplexity(executor: Executor, token_ids: list[int], window: int = 512,
               on_window: Callable[[int, int], None] | None = None) -> dict:
    """PPL of `token_ids` on `executor`, with what it measured on the way (executor.report)."""

    def window_logits(ids: list[int]):
        executor.begin(len(ids))
        first = executor.first_block(len(ids))
        yield executor.prefill(ids[:first], all_logits=True, scoring=True)  # (first, vocab)
        for token in ids[first : len(ids) - 1]:
            yield executor.decode(token)[None]  # (1, vocab)

    result = score_windows(scoring_windows(token_ids, window), window_logits, on_window)
    return {**result, "tokens": len(token_ids), "window": window, **executor.report()}


def plain_perplexity(model, token_ids: list[int], window: int = 512, on_window=None, **cache_options) -> dict:
    """`perplexity` on the full cache; `cache_options` go to the step extensions (halt_threshold)."""
    return perplexity(Plain(model, **cache_options), token_ids, window, on_window)
