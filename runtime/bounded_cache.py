"""Decoding and scoring with a KV cache that a policy (kv_policy.py) keeps within a budget of slots.

Every step is: make room for its n tokens (evict), run them, let the policy observe the attention it needs.
Prompts longer than the budget are prefilled in chunks that fit it.
"""

from __future__ import annotations

import numpy as np

from onnxlm.errors import OnnxlmError
from onnxlm.runtime.execution import Executor
from onnxlm.runtime.generate import generate_with
from onnxlm.runtime.kv_cache import KVCache
from onnxlm.runtime.kv_policy import KVPolicyConfig, Policy, make_policy
from onnxlm.runtime.perplexity import perplexity
from onnxlm.runtime.session import DecoderSession

PROBS = "attention_probs"  # the step extension whose outputs scored policies read (runtime/extensions.py)


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


def policy_step(model: DecoderSession, cache: KVCache, policy: Policy, tokens: list[int],
                scoring: bool = False) -> np.ndarray:
    """Run `tokens` under the policy; return their logits (n, vocab) (decode: a view of the cache's buffer)."""
    ids = np.asarray([tokens], np.int64)  # (1, n)
    policy.make_room(cache, len(tokens))
    if policy.needs_probs:
        logits, probs = model.step_reading(ids, cache, PROBS)
        policy.observe(cache, probs, len(tokens))
    else:
        logits = model.step(ids, cache, scoring=scoring)
    return logits[0]


def chunk_size(model: DecoderSession, policy: Policy) -> int:
    """Most tokens per step: what fits the budget, and what the graph's step extensions allow (a --kv-scores
    graph returns attention probabilities, 18 GB of them for a 4,096-token step on SmolLM2)."""
    return min(policy.chunk(), model.max_step_tokens or policy.chunk())


class Bounded(Executor):
    """Steps under a KV policy: the prompt in chunks that fit the budget, then one token at a time. A perplexity
    scores a window's first tokens that fit the budget in one step, then one token per step, each predicted from
    what the policy kept (StreamingLLM's protocol)."""

    def __init__(self, model: DecoderSession, config: KVPolicyConfig):
        super().__init__(model)
        self.config, self.policy, self.max_slots = config, None, 0

    def check(self, prompt_ids, max_new_tokens):
        if not prompt_ids:
            raise OnnxlmError("the prompt is empty")  # no context-length check: sinks-window runs past it

    def new_cache(self, tokens):
        self.policy, cache = start(self.model, self.config, tokens)
        return cache

    def _step(self, tokens: list[int], scoring: bool = False) -> np.ndarray:
        logits = policy_step(self.model, self.cache, self.policy, tokens, scoring)
        self.max_slots = max(self.max_slots, self.cache.length)
        return logits

    def prefill(self, ids, all_logits=False, scoring=False):
        size = chunk_size(self.model, self.policy)
        blocks = [self._step(ids[i : i + size], scoring) for i in range(0, len(ids), size)]  # (n, vocab) each
        return np.concatenate(blocks) if all_logits else blocks[-1][-1]

    def decode(self, token):
        return self._step([token])[-1]

    def first_block(self, n):
        return min(chunk_size(self.model, self.policy), n - 1)

    def report(self):
        return {**super().report(), "kv_policy": self.config.name, "kv_budget": self.config.budget,
                "max_slots": self.max_slots}


def bounded_generate(model: DecoderSession, prompt_ids: list[int], max_new_tokens: int, config: KVPolicyConfig,
                     stop_ids: tuple[int, ...] = (), sampler=None):
    """Greedy or sampled decoding under a KV policy; yields each new token."""
    return generate_with(Bounded(model, config), prompt_ids, max_new_tokens, stop_ids, sampler)


def bounded_perplexity(model: DecoderSession, token_ids: list[int], config: KVPolicyConfig, window: int = 4096,
                       on_window=None) -> dict:
    """PPL under a KV policy; with the full policy this is runtime/perplexity.py's plain score."""
    return perplexity(Bounded(model, config), token_ids, window, on_window)
