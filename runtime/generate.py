"""Decoding loops, one function per phase (gpt-fast style): prefill, decode_one_token, generate_tokens."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from onnxlm.errors import OnnxlmError
from onnxlm.runtime.kv_cache import KVCache
from onnxlm.runtime.session import DecoderSession


def prefill(model: DecoderSession, cache: KVCache, prompt_ids: list[int]) -> np.ndarray:
    """Run the whole prompt; return the logits of its last position, (vocab,)."""
    logits = model.step(np.asarray([prompt_ids], np.int64), cache)  # (1, prompt, vocab)
    return logits[0, -1]


def decode_one_token(model: DecoderSession, cache: KVCache, token: int) -> np.ndarray:
    """Run one token; return its logits, (vocab,): a view of the cache's buffer, valid until its next step."""
    logits = model.step(np.asarray([[token]], np.int64), cache)  # (1, 1, vocab)
    return logits[0, -1]


def greedy(logits: np.ndarray) -> int:
    return int(np.argmax(logits))


def generate_tokens(
    model: DecoderSession,
    prompt_ids: list[int],
    max_new_tokens: int,
    stop_ids: tuple[int, ...] = (),
) -> Iterator[int]:
    """Greedy decoding. Yields each new token as soon as it is chosen; stops after a stop token."""
    if not prompt_ids:
        raise OnnxlmError("the prompt is empty")
    if len(prompt_ids) + max_new_tokens > model.info.context_length:
        raise OnnxlmError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"context length {model.info.context_length}"
        )
    cache = model.new_cache(capacity=len(prompt_ids) + max_new_tokens)
    logits = prefill(model, cache, prompt_ids)
    for i in range(max_new_tokens):
        token = greedy(logits)
        yield token
        if token in stop_ids or i + 1 == max_new_tokens:
            return
        logits = decode_one_token(model, cache, token)
