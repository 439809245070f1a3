"""The executor of a static artifact (the `static_kv` pass): its prefill.onnx and decode.onnx on a C-slot cache.

The layout is static_layout.py's: both graphs read the same C-slot buffers (bound once per cache by IO binding),
take an attention mask that marks the filled slots and the real new tokens, and return the new tokens' K/V, which
`static_layout.static_step` copies into the next slots. A prompt runs in chunks of P tokens (the last one padded;
a chunk of one token runs on decode.onnx), a generated token on decode.onnx.

When the C slots are full the run stops with one line, unless it runs under the sinks-window KV policy
(kv_policy.py, budget <= C): the first `sinks` tokens stay, the oldest others leave in blocks, the kept keys are
rotated back, and a token's position is its slot, so generation runs past C. The other policies read attention
probabilities that the static graphs do not return, and are refused.
"""

from __future__ import annotations

import numpy as np

from onnxlm.errors import OnnxlmError
from onnxlm.runtime.execution import Executor
from onnxlm.runtime.extensions import ort_value
from onnxlm.runtime.kv_cache import KVCache
from onnxlm.runtime.kv_policy import KVPolicyConfig, make_policy
from onnxlm.runtime.session import Binding, DecoderSession
from onnxlm.static_layout import DECODE_FILE, PREFILL_FILE, StaticFeeds, StaticShape, static_step


def is_static(model: DecoderSession) -> bool:
    return "static" in model.manifest


class Static(Executor):
    """Greedy and sampled decoding and perplexity on a static artifact's graph pair."""

    def __init__(self, model: DecoderSession, kv_policy: KVPolicyConfig | None = None):
        super().__init__(model)
        self.shape = StaticShape.from_dict(model.manifest["static"])
        c, p = self.shape.context_length, self.shape.prefill_chunk
        self.config = kv_policy if kv_policy is not None and kv_policy.name != "full" else None
        self.policy = None
        if self.config is not None:
            if self.config.name != "sinks-window":
                raise OnnxlmError(f"a static artifact runs the full cache or --kv-policy sinks-window, not "
                                  f"{self.config.name} (its graphs return no attention probabilities)")
            if self.config.budget > c:
                raise OnnxlmError(f"--kv-budget {self.config.budget} exceeds the static cache's {c} slots")
            self.policy = make_policy(self.config, model.info)
        files = {p: PREFILL_FILE, 1: DECODE_FILE}
        self.sessions = {size: model.backend.session(model.directory / name, model.settings)
                         for size, name in files.items()}
        self.feeds = {size: StaticFeeds(c, size) for size in self.sessions}
        self.present_names = [n.replace("past_key_values.", "present.") for n in model.kv_input_names]
        self.bindings: dict[int, tuple] = {}
        self.max_slots = 0

    @property
    def slots(self) -> int:
        return self.shape.context_length

    def check(self, prompt_ids, max_new_tokens):
        if not prompt_ids:
            raise OnnxlmError("the prompt is empty")
        if max_new_tokens < 1:
            raise OnnxlmError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        self._check_fits(len(prompt_ids) + max_new_tokens)

    def _check_fits(self, tokens: int) -> None:
        if self.policy is None and tokens > self.slots:
            raise OnnxlmError(f"{tokens} tokens exceed the static KV cache's {self.slots} slots (the artifact's "
                              f"context_length): build it with a larger --context-length, or run with "
                              f"--kv-policy sinks-window --kv-budget N")

    def new_cache(self, tokens):
        self._check_fits(tokens)
        info = self.model.info
        cache = KVCache.empty(self.model.kv_input_names, 1, info.num_kv_heads, info.head_dim, self.slots)
        self.bindings = {size: self._bind(size, cache) for size in self.sessions}
        return cache

    def _bind(self, size: int, cache: KVCache) -> tuple:
        """The IO binding of the graph for `size` new tokens: its inputs and the cache's buffers, bound once;
        ORT writes the logits and the new K/V into arrays allocated here."""
        info = self.model.info
        binding = Binding(self.sessions[size])
        for name, array in self.feeds[size].as_dict().items():
            binding.bind_input(name, array)  # aliases the array: StaticFeeds.set rewrites it in place
        for name, value in zip(self.model.kv_input_names, cache.values):
            binding.io.bind_ortvalue_input(name, value)
        logits = np.empty((1, size, info.vocab_size), np.float32)  # (1, S, vocab)
        presents = [np.empty((1, info.num_kv_heads, size, info.head_dim), np.float32) for _ in self.present_names]
        binding.bind_output("logits", ort_value(logits))
        for name, array in zip(self.present_names, presents):
            binding.bind_output(name, ort_value(array))
        return binding, logits, presents

    def _run(self, size: int):
        binding, logits, presents = self.bindings[size]
        self.sessions[size].run_with_iobinding(binding.io)
        return logits, presents

    def _step(self, tokens: list[int]) -> np.ndarray:
        """n <= P tokens: make room (sinks-window) or check it, run, store their K/V; their logits (n, vocab)."""
        cache, n = self.cache, len(tokens)
        if self.policy is not None:
            self.policy.make_room(cache, n)
        elif cache.length + n > self.slots:
            raise OnnxlmError(f"the static KV cache is full: {cache.length} + {n} tokens exceed its {self.slots} "
                              f"slots (run with --kv-policy sinks-window to keep going)")
        logits = static_step(self._run, self.feeds, cache.arrays, tokens, cache.length,
                             cache.length + cache.offset, self.shape.prefill_chunk)
        cache.advance(None, n)
        self.max_slots = max(self.max_slots, cache.length)
        return logits

    def chunk(self) -> int:
        p = self.shape.prefill_chunk
        return p if self.policy is None else min(p, self.policy.chunk())

    def prefill(self, ids, all_logits=False, scoring=False):
        size = self.chunk()
        blocks = []
        for i in range(0, len(ids), size):
            logits = self._step(ids[i : i + size])  # a view of the graph's logits buffer, which the next step reuses
            blocks.append(logits.copy() if all_logits else logits)
        return np.concatenate(blocks) if all_logits else blocks[-1][-1]

    def decode(self, token):
        return self._step([token])[-1]  # a view of the decode graph's logits buffer, valid until its next step

    def max_tokens(self) -> int:
        return self.slots

    def first_block(self, n):
        return n if self.policy is None else min(self.chunk(), n - 1)

    def report(self):
        extra = {} if self.config is None else {"kv_policy": self.config.name, "kv_budget": self.config.budget}
        return {**super().report(), **extra, "static_slots": self.slots,
                "prefill_chunk": self.shape.prefill_chunk, "max_slots": self.max_slots}
