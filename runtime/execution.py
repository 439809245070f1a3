"""How a step is executed, apart from how the next token is chosen (decoding.py, sampling.py).

An executor runs one sequence against its own cache:
- `begin(tokens)` makes a cache for `tokens` positions (before any clock starts);
- `prefill(ids)` runs a prompt and returns its last logits (vocab,), or every row (n, vocab) with all_logits;
- `decode(token)` runs one token and returns its logits (vocab,);
- `first_block(n)`: how many leading tokens of an n-token window one prefill scores; the rest are scored one
  decode step at a time (perplexity.py);
- `report()`: what the run measured beyond the logits (halting, eviction, exits), summed over its caches.

Four executors: `Plain` (the full cache, with the step extensions' cache options such as halt_threshold, and
Sarathi-style chunked prefill), `bounded_cache.Bounded` (a KV policy keeps the cache within a budget),
`early_exit.EarlyExit` and `static.Static` (a static artifact's prefill/decode graphs on a C-slot cache). Greedy, sampled decoding and perplexity run on any of them; decoding.executor_for
picks one.
"""

from __future__ import annotations

import numpy as np

from onnxlm.errors import OnnxlmError
from onnxlm.runtime.session import DecoderSession


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


class Executor:
    def __init__(self, model: DecoderSession, **options):
        self.model, self.options = model, options  # options: the cache options of the session's extensions
        self.cache = None
        self.totals: dict[str, int] = {}

    def check(self, prompt_ids: list[int], max_new_tokens: int) -> None:
        check_lengths(self.model, prompt_ids, max_new_tokens)

    def begin(self, tokens: int) -> None:
        self._fold()
        self.cache = self.new_cache(tokens)

    def new_cache(self, tokens: int):
        return self.model.new_cache(capacity=tokens, **self.options)

    def prefill(self, ids: list[int], all_logits: bool = False, scoring: bool = False) -> np.ndarray:
        raise NotImplementedError

    def decode(self, token: int) -> np.ndarray:
        raise NotImplementedError

    def first_block(self, n: int) -> int:
        return n

    def max_tokens(self) -> int:
        """Most positions one sequence may hold on the full cache: the model's context length."""
        return self.model.info.context_length

    def _fold(self) -> None:
        """Add the last cache's counts to the run's totals."""
        if self.cache is not None:
            for key, value in self.model.stats(self.cache).items():
                self.totals[key] = self.totals.get(key, 0) + value

    def report(self) -> dict:
        self._fold()
        self.cache = None
        return self.model.report(self.totals, self.options)


class Plain(Executor):
    """Every token kept; the prompt in one step, or in chunks of `chunk_size` tokens (Sarathi-Serve's chunked
    prefill: bounded time and activation memory per call). With a `prefix_cache` (prefix_cache.PrefixCache) a
    generation's prompt starts from its longest cached prefix and leaves its own blocks for the next one: several
    questions over one context prefill the context once."""

    def __init__(self, model: DecoderSession, chunk_size: int | None = None, prefix_cache=None, **options):
        super().__init__(model, **options)
        self.chunk_size, self.prefix_cache = chunk_size, prefix_cache

    def prefill(self, ids, all_logits=False, scoring=False):
        # not while scoring (every row is wanted), and not on graphs whose extensions keep per-token state
        reuse = self.prefix_cache is not None and not all_logits and self.cache.shared and self.model.hot
        start = self.prefix_cache.restore(ids, self.cache) if reuse else 0
        size = self.chunk_size or len(ids)
        blocks = [self.model.step(np.asarray([ids[i : i + size]], np.int64), self.cache, last_only=not all_logits,
                                  scoring=scoring)[0] for i in range(start, len(ids), size)]  # (n or 1, vocab) each
        if reuse:
            self.prefix_cache.store(ids, self.cache)
        return np.concatenate(blocks) if all_logits else blocks[-1][-1]

    def decode(self, token):
        return self.model.step(np.asarray([[token]], np.int64), self.cache)[0, -1]  # a view of the cache's buffer

    def decode_greedy(self, token: int) -> int:
        """Run one token; return the next greedy token (on a device, chosen there: session.decode_greedy)."""
        return int(self.model.decode_greedy(np.asarray([[token]], np.int64), self.cache)[0])
