"""Decoding loops, one function per phase (gpt-fast style): prefill, decode_one_token, generate_tokens.

Beam search lives in beam.py, speculative decoding in speculative.py, multi-request batching in scheduler.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

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
        logits = model.step(np.asarray([prompt_ids[start : start + step]], np.int64), cache, last_only=True)  # (1, 1, vocab)
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
    halt_threshold: float | None = None,
) -> Iterator[int]:
    """Greedy or sampled decoding. Yields each new token as soon as it is chosen; stops after a stop token.
    `halt_threshold`: QuickSilver token halting on a quicksilver graph."""
    check_lengths(model, prompt_ids, max_new_tokens)
    choose = sampler or Sampler()
    cache = model.new_cache(capacity=len(prompt_ids) + max_new_tokens, halt_threshold=halt_threshold)
    logits = prefill(model, cache, prompt_ids, chunk_size)
    yield from decode_loop(logits, prompt_ids, max_new_tokens, stop_ids, choose,
                           lambda token: decode_one_token(model, cache, token))


def decode_loop(logits: np.ndarray, prompt_ids: list[int], max_new_tokens: int, stop_ids: tuple[int, ...],
                choose: Sampler, step: Callable[[int], np.ndarray]) -> Iterator[int]:
    """From the prompt's last logits (vocab,): choose a token, yield it, `step` it for the next logits, until a
    stop token or max_new_tokens. The loop every single-sequence decoder shares."""
    context = list(prompt_ids)
    for i in range(max_new_tokens):
        token = choose(logits, context)
        context.append(token)
        yield token
        if token in stop_ids or i + 1 == max_new_tokens:
            return
        logits = step(token)
