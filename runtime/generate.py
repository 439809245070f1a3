"""Decoding loops, one function per phase (gpt-fast style): prefill, decode_one_token, generate_tokens.

Beam search lives in beam.py, speculative decoding in speculative.py, multi-request batching in scheduler.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from onnxlm.errors import OnnxlmError
from onnxlm.runtime.kv_cache import KVCache
from onnxlm.runtime.sampling import Sampler
from onnxlm.runtime.session import DecoderSession


def prefill(model: DecoderSession, cache: KVCache, prompt_ids: list[int], chunk_size: int | None = None) -> np.ndarray:
    """Run the whole prompt, in chunks of `chunk_size` tokens if given (Sarathi-Serve's chunked prefill: bounded
    time and activation memory per call); return the logits of its last position, (vocab,)."""
    step = chunk_size or len(prompt_ids)
    for start in range(0, len(prompt_ids), step):
        logits = model.step(np.asarray([prompt_ids[start : start + step]], np.int64), cache)  # (1, chunk, vocab)
    return logits[0, -1]


def decode_one_token(model: DecoderSession, cache: KVCache, token: int) -> np.ndarray:
    """Run one token; return its logits, (vocab,): a view of the cache's buffer, valid until its next step."""
    logits = model.step(np.asarray([[token]], np.int64), cache)  # (1, 1, vocab)
    return logits[0, -1]


def greedy(logits: np.ndarray) -> int:
    return int(np.argmax(logits))


def check_lengths(model: DecoderSession, prompt_ids: list[int], max_new_tokens: int) -> None:
    if not prompt_ids:
        raise OnnxlmError("the prompt is empty")
    if max_new_tokens < 1:
        raise OnnxlmError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if len(prompt_ids) + max_new_tokens > model.info.context_length:
        raise OnnxlmError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"context length {model.info.context_length}"
        )


def generate_tokens(
    model: DecoderSession,
    prompt_ids: list[int],
    max_new_tokens: int,
    stop_ids: tuple[int, ...] = (),
    sampler: Sampler | None = None,
    chunk_size: int | None = None,
) -> Iterator[int]:
    """Greedy or sampled decoding. Yields each new token as soon as it is chosen; stops after a stop token."""
    check_lengths(model, prompt_ids, max_new_tokens)
    choose = sampler or Sampler()
    context = list(prompt_ids)
    cache = model.new_cache(capacity=len(prompt_ids) + max_new_tokens)
    logits = prefill(model, cache, prompt_ids, chunk_size)
    for i in range(max_new_tokens):
        token = choose(logits, context)
        context.append(token)
        yield token
        if token in stop_ids or i + 1 == max_new_tokens:
            return
        logits = decode_one_token(model, cache, token)
