"""Speculative decoding (Leviathan et al., arXiv 2211.17192): a cheap drafter proposes tokens, the target checks
them all in one forward pass, and the accept/reject rule keeps the output distributed exactly as the target's.

Drafters (one interface, `propose(context, n, sampler) -> Draft`):
- `PromptLookup`: n-gram matches in the context (Saxena's prompt lookup decoding); no model, deterministic.
- `ModelDrafter`: another artifact with the same tokenizer (an int4 or layer-removed variant, or the artifact's
  own `draft/`, which is self-speculation); it keeps its own KV cache and rolls it back after each verification.

Cache discipline: the target's cache holds the context minus its last token. A verification step feeds
[last, x_1..x_n] and yields the target's logits p_1..p_{n+1}; after accepting k drafts the cache is truncated to
the context plus x_1..x_k, and the token chosen from p_{k+1} becomes the new `last`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

from onnxlm.errors import OnnxlmError
from onnxlm.runtime.execution import check_lengths
from onnxlm.runtime.sampling import Sampler, draw
from onnxlm.runtime.session import DecoderSession


@dataclasses.dataclass
class Draft:
    tokens: list[int]
    probs: np.ndarray | None = None  # (n, vocab): the q_i each token was drawn from; None: deterministic draft


@dataclasses.dataclass
class SpeculativeStats:
    target_calls: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "acceptance_rate": self.acceptance_rate,
                "tokens_per_target_call": self.emitted / max(self.target_calls, 1)}


class PromptLookup:
    """Draft the continuation of the earliest earlier occurrence of the context's last n-gram (n = max..min)."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise OnnxlmError(f"prompt lookup needs 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, context: Sequence[int], n: int, sampler: Sampler) -> Draft:
        ids = np.asarray(context, np.int64)
        for size in range(min(self.max_ngram, len(ids) - 1), self.min_ngram - 1, -1):
            pattern = ids[-size:]
            windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], size)  # (len - size, size)
            starts = np.flatnonzero((windows == pattern).all(axis=1)) + size
            if starts.size:
                start = int(starts[0])
                return Draft(ids[start : start + n].tolist())
        return Draft([])


class ModelDrafter:
    """A second decoder drafts token by token with the target's sampling settings, keeping its own cache."""

    def __init__(self, model: DecoderSession, capacity: int):
        self.model = model
        self.cache = model.new_cache(capacity=capacity)
        self.fed: list[int] = []  # the tokens whose K/V the draft cache holds, in order

    def _catch_up(self, context: Sequence[int]) -> np.ndarray:
        """Roll the cache back to its common prefix with `context`, feed the rest, return the last logits."""
        common = 0
        for a, b in zip(self.fed, context):
            if a != b:
                break
            common += 1
        common = min(common, len(context) - 1)  # feed at least one token to get logits
        self.cache.truncate(common)
        new = list(context[common:])
        logits = self.model.step(np.asarray([new], np.int64), self.cache, last_only=True)[0, -1]  # (vocab,)
        self.fed = list(context)
        return logits

    def propose(self, context: Sequence[int], n: int, sampler: Sampler) -> Draft:
        logits = self._catch_up(context)
        tokens, probs, ctx = [], [], list(context)
        for i in range(n):
            q = sampler.probs(logits, ctx)  # (vocab,)
            token = int(np.argmax(q)) if sampler.greedy else draw(q, sampler.rng)
            tokens.append(token)
            probs.append(q)
            ctx.append(token)
            if i + 1 < n:
                logits = self.model.step(np.asarray([[token]], np.int64), self.cache)[0, -1]
                self.fed.append(token)
        return Draft(tokens, np.stack(probs) if probs else None)


def accept_greedy(draft: list[int], target_logits: np.ndarray) -> tuple[int, int]:
    """Greedy verification: the longest prefix that matches the target's argmax, then the target's own token.
    target_logits: (n + 1, vocab). Returns (accepted count k, token from row k)."""
    best = np.argmax(target_logits, axis=-1)  # (n + 1,)
    k = 0
    while k < len(draft) and draft[k] == best[k]:
        k += 1
    return k, int(best[k])


def accept_sampled(draft: Draft, target_probs: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    """Leviathan's rule. target_probs: (n + 1, vocab), each row warped exactly like the draft's q.

    Accept x_i with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection draw from the residual
    norm(max(0, p_i - q_i)); if all n are accepted, draw a bonus token from p_{n+1}. The output is distributed as p.
    A deterministic draft has one-hot q: accept with probability p_i(x_i), residual = p_i without x_i.
    """
    for i, token in enumerate(draft.tokens):
        p = target_probs[i]
        if draft.probs is None:
            q = np.zeros_like(p)
            q[token] = 1.0
        else:
            q = draft.probs[i]
        if rng.random() < min(1.0, p[token] / q[token]):  # q[token] > 0: the token was drawn from q
            continue
        residual = np.maximum(p - q, 0.0)
        if residual.sum() <= 0.0:  # p == q: rejection has probability 0, kept for float safety
            residual = p
        return i, draw(residual / residual.sum(), rng)
    return len(draft.tokens), draw(target_probs[len(draft.tokens)], rng)


def adapt_draft_length(n: int, drafted: int, accepted: int, max_draft: int) -> int:
    """transformers' assisted-generation heuristic: +2 after a fully accepted draft, -1 otherwise."""
    if drafted == 0:
        return n
    return min(n + 2, max_draft) if accepted == drafted else max(n - 1, 1)


def speculative_generate(
    target: DecoderSession,
    drafter,
    prompt_ids: list[int],
    max_new_tokens: int,
    stop_ids: tuple[int, ...] = (),
    sampler: Sampler | None = None,
    max_draft: int = 8,
    stats: SpeculativeStats | None = None,
) -> Iterator[int]:
    """Yield tokens as they are accepted. Greedy output is identical to the target's greedy decoding."""
    check_lengths(target, prompt_ids, max_new_tokens)
    if max_draft < 1:
        raise OnnxlmError(f"max_draft must be at least 1, got {max_draft}")
    sampler = sampler or Sampler()
    stats = stats if stats is not None else SpeculativeStats()
    context = list(prompt_ids)
    cache = target.new_cache(capacity=len(prompt_ids) + max_new_tokens)
    if len(prompt_ids) > 1:
        target.step(np.asarray([prompt_ids[:-1]], np.int64), cache, last_only=True)  # the cache: context minus `last`
    n, emitted = min(4, max_draft), 0
    while emitted < max_new_tokens:
        room = max_new_tokens - emitted - 1  # the step always adds one target token after the drafts
        draft = drafter.propose(context, min(n, room), sampler) if room > 0 else Draft([])
        fed = [context[-1], *draft.tokens]
        logits = target.step(np.asarray([fed], np.int64), cache)[0]  # (n + 1, vocab)
        stats.target_calls += 1
        if sampler.greedy:
            k, token = accept_greedy(draft.tokens, logits)
        else:
            probs = np.stack([sampler.probs(logits[i], context + draft.tokens[:i]) for i in range(len(fed))])
            k, token = accept_sampled(draft, probs, sampler.rng)
        stats.drafted += len(draft.tokens)
        stats.accepted += k
        cache.truncate(len(context) + k)  # keep last + x_1..x_k; `token` is the next step's `last`
        n = adapt_draft_length(n, len(draft.tokens), k, max_draft)
        for t in [*draft.tokens[:k], token]:
            context.append(t)
            emitted += 1
            stats.emitted += 1
            yield t
            if t in stop_ids or emitted == max_new_tokens:
                return
