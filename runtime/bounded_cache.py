"""Decoding and scoring with a KV cache that a policy (kv_policy.py) keeps within a budget of slots.

Every step is: make room for its n tokens (evict), run them, let the policy observe the attention it needs.
Prompts longer than the budget are prefilled in chunks that fit it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator

import numpy as np

from onnxlm.errors import OnnxlmError
from onnxlm.metrics import window_nll
from onnxlm.runtime.generate import decode_loop
from onnxlm.runtime.kv_cache import KVCache
from onnxlm.runtime.kv_policy import KVPolicyConfig, Policy, make_policy
from onnxlm.runtime.perplexity import scoring_windows
from onnxlm.runtime.sampling import Sampler
from onnxlm.runtime.session import PROBS_CHUNK, DecoderSession


def start(model: DecoderSession, config: KVPolicyConfig, tokens: int) -> tuple[Policy, KVCache]:
    """A policy for `model` and an empty cache sized for `tokens` tokens under it."""
    if not model.shared_kv:
        raise OnnxlmError("KV policies need a GroupQueryAttention graph (any recipe but fp32-plain)")
    policy = make_policy(config, model.info)
    policy.check_positions(model)
    if not config.relative and tokens > model.info.context_length:
        raise OnnxlmError(f"{tokens} tokens exceed the context length {model.info.context_length}: policy "
                          f"{config.name} keeps original positions (only sinks-window runs past it)")
    return policy, model.new_cache(capacity=policy.capacity(tokens))


def policy_step(model: DecoderSession, cache: KVCache, policy: Policy, tokens: list[int]) -> np.ndarray:
    """Run `tokens` under the policy; return their logits (n, vocab) (decode: a view of the cache's buffer)."""
    ids = np.asarray([tokens], np.int64)  # (1, n)
    policy.make_room(cache, len(tokens))
    if policy.needs_probs:
        logits, probs = model.step_probs(ids, cache)
        policy.observe(cache, probs, len(tokens))
    else:
        logits = model.step(ids, cache)
    return logits[0]


def chunk_size(model: DecoderSession, policy: Policy) -> int:
    """Most tokens per step: what fits the budget, and on a --kv-scores graph few enough that the attention
    probabilities stay small (a 4,096-token step would return 18 GB of them on SmolLM2)."""
    return min(policy.chunk(), PROBS_CHUNK) if model.probs_names else policy.chunk()


def bounded_prefill(model: DecoderSession, cache: KVCache, policy: Policy, prompt_ids: list[int]) -> np.ndarray:
    """The prompt in chunks that fit the budget; the logits of its last position, (vocab,)."""
    size = chunk_size(model, policy)
    for i in range(0, len(prompt_ids), size):
        logits = policy_step(model, cache, policy, prompt_ids[i : i + size])
    return logits[-1]


def bounded_generate(model: DecoderSession, prompt_ids: list[int], max_new_tokens: int, config: KVPolicyConfig,
                     stop_ids: tuple[int, ...] = (), sampler: Sampler | None = None) -> Iterator[int]:
    """Greedy or sampled decoding under a KV policy; yields each new token."""
    if not prompt_ids:
        raise OnnxlmError("the prompt is empty")
    policy, cache = start(model, config, len(prompt_ids) + max_new_tokens)
    logits = bounded_prefill(model, cache, policy, prompt_ids)
    yield from decode_loop(logits, prompt_ids, max_new_tokens, stop_ids, sampler or Sampler(),
                           lambda token: policy_step(model, cache, policy, [token])[-1])


def bounded_perplexity(model: DecoderSession, token_ids: list[int], config: KVPolicyConfig, window: int = 4096,
                       on_window: Callable[[int, int], None] | None = None) -> dict:
    """PPL under a KV policy (StreamingLLM's protocol): each window of `window` tokens from an empty cache; the
    first tokens that fit the budget in one step, then one token per step, each predicted from what the policy
    kept. With the full policy this is runtime/perplexity.py's score."""
    windows = scoring_windows(token_ids, window)
    begin = time.perf_counter()
    nll, scored, slots = 0.0, 0, 0
    for i, ids in enumerate(windows):
        policy, cache = start(model, config, len(ids))
        done = 0
        while done < len(ids) - 1:
            n = min(chunk_size(model, policy), len(ids) - 1) if done == 0 else 1
            logits = policy_step(model, cache, policy, ids[done : done + n])  # (n, vocab)
            nll += window_nll(logits, np.asarray(ids[done + 1 : done + n + 1]))
            scored += n
            done += n
            slots = max(slots, cache.length)
        if on_window:
            on_window(i + 1, len(windows))
    return {"ppl": math.exp(nll / scored), "nll": nll / scored, "tokens": len(token_ids), "scored_tokens": scored,
            "windows": len(windows), "window": window, "kv_policy": config.name, "kv_budget": config.budget,
            "max_slots": slots, "seconds": time.perf_counter() - begin}
