"""The decode loop every single-sequence strategy shares, gpt-fast style: prefill, then choose a token and step.

How a step runs (the full cache, a KV policy, early exit) is the executor's (execution.py); how the next token is
chosen is the sampler's (sampling.py). Beam search lives in beam.py, speculative decoding in speculative.py,
multi-request batching in scheduler.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from onnxlm.runtime.execution import Executor, Plain
from onnxlm.runtime.kv_cache import KVCache
from onnxlm.runtime.sampling import Sampler
from onnxlm.runtime.session import DecoderSession


def prefill(model: DecoderSession, cache: KVCache, prompt_ids: list[int]) -> np.ndarray:
    """Run the whole prompt; return the logits of its last position, (vocab,)."""
    return model.step(np.asarray([prompt_ids], np.int64), cache, last_only=True)[0, -1]  # (1, 1, vocab) -> (vocab,)


def decode_one_token(model: DecoderSession, cache: KVCache, token: int) -> np.ndarray:
    """Run one token; return its logits, (vocab,): a view of the cache's buffer, valid until its next step."""
    return model.step(np.asarray([[token]], np.int64), cache)[0, -1]  # (1, 1, vocab) -> (vocab,)


def greedy(logits: np.ndarray) -> int:
    return int(np.argmax(logits))


def generate_tokens(model: DecoderSession, prompt_ids: list[int], max_new_tokens: int,
                    stop_ids: tuple[int, ...] = (), sampler: Sampler | None = None, chunk_size: int | None = None,
                    **cache_options) -> Iterator[int]:
    """`generate_with` on the full cache (execution.Plain), the prompt in chunks of `chunk_size` if given;
    `cache_options` go to the step extensions (halt_threshold: QuickSilver token halting)."""
    return generate_with(Plain(model, chunk_size, **cache_options), prompt_ids, max_new_tokens, stop_ids, sampler)


def generate_with(executor: Executor, prompt_ids: list[int], max_new_tokens: int, stop_ids: tuple[int, ...] = (),
                  sampler: Sampler | None = None) -> Iterator[int]:
    """Greedy or sampled decoding on `executor`. Yields each new token as soon as it is chosen; stops after a
    stop token."""
    executor.check(prompt_ids, max_new_tokens)
    executor.begin(len(prompt_ids) + max_new_tokens)
    logits = executor.prefill(prompt_ids)
    sampler = sampler or Sampler()
    # greedy on a device: each step's argmax is taken there, and only the token crosses to the host
    step_greedy = getattr(executor, "decode_greedy", None) if sampler.greedy else None
    yield from decode_loop(logits, prompt_ids, max_new_tokens, stop_ids, sampler, executor.decode, step_greedy)


def decode_loop(logits: np.ndarray, prompt_ids: list[int], max_new_tokens: int, stop_ids: tuple[int, ...],
                choose: Sampler, step: Callable[[int], np.ndarray],
                step_greedy: Callable[[int], int] | None = None) -> Iterator[int]:
    """From the prompt's last logits (vocab,): choose a token, yield it, `step` it for the next logits, until a
    stop token or max_new_tokens. `step_greedy(token)`, when given, steps and chooses in one (greedy)."""
    context = list(prompt_ids)
    token = choose(logits, context)
    for i in range(max_new_tokens):
        context.append(token)
        yield token
        if token in stop_ids or i + 1 == max_new_tokens:
            return
        token = step_greedy(token) if step_greedy else choose(step(token), context)
