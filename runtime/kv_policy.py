"""KV-cache eviction policies: a budget of cache slots, and which slots to give up when it is full.

- full: no eviction (the cache holds every token; capacity = prompt + new tokens).
- sinks-window (StreamingLLM, arXiv 2309.17453): the first `sinks` tokens and the most recent ones. Positions are
  cache-relative, as in StreamingLLM: keys are stored after rotary, so when `drop` middle tokens leave, the kept
  window's keys are rotated back by `drop` positions (RoPE is a rotation: R(p - d) = R(-d) R(p); each layer by
  the frequencies ModelInfo.key_frequencies gives, so scaled, partial and per-layer RoPE move too) and a new token's
  position is its slot. The model never sees a position past the budget, so generation runs past the context
  length. Eviction frees `evict_every` slots at once (one shift of the window per that many tokens).
- h2o (Heavy-Hitter Oracle, arXiv 2306.14048): per layer and KV head, keep the recent half of the budget and,
  among older tokens, those with the highest accumulated attention (column sums of the post-softmax
  probabilities of every query so far, summed over the query heads of the group).
- veda (voting eviction, arXiv 2507.00797): each new query votes against the slots whose attention is below
  a * mean - b * std of its row; the unreserved slot with the most votes leaves.
h2o and veda keep original positions (H2O's choice): the graph must take positions apart from slots and return
attention probabilities (an artifact built with `--kv-scores`), and a token's position stays below the context
length. Every policy keeps the first `sinks` tokens (VEDA's reserved stage; H2O's accumulated scores keep them
anyway). Heads keep different tokens but the same count, as GroupQueryAttention needs one length per row.

A policy's `make_room(cache, n)` runs before a step of n tokens, `observe(cache, probs, n)` after it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onnxlm.errors import OnnxlmError
from onnxlm.model_info import ModelInfo
from onnxlm.runtime.kv_cache import KVCache

POLICIES = ("full", "sinks-window", "h2o", "veda")


@dataclasses.dataclass(frozen=True)
class KVPolicyConfig:
    name: str = "full"
    budget: int | None = None  # most slots the cache holds (every policy but full)
    sinks: int = 4  # first tokens always kept
    evict_every: int = 16  # sinks-window: slots freed per eviction
    relative_positions: bool | None = None  # default: True for sinks-window, False for h2o and veda
    veda_a: float = 1.0  # VEDA's vote threshold a * mean - b * std of each query's attention row
    veda_b: float = 0.0

    def __post_init__(self):
        if self.name not in POLICIES:
            raise OnnxlmError(f"unknown KV policy '{self.name}': choose one of {', '.join(POLICIES)}")
        if self.name == "full":
            return
        if self.budget is None:
            raise OnnxlmError(f"--kv-policy {self.name} needs --kv-budget N (cache slots)")
        if self.sinks < 0 or self.evict_every < 1:
            raise OnnxlmError(f"--sinks must be >= 0 and evict_every >= 1, got {self.sinks}, {self.evict_every}")
        if self.budget < self.sinks + 2 * self.evict_every:
            raise OnnxlmError(f"--kv-budget {self.budget} is too small: it must hold the {self.sinks} sinks and "
                              f"at least {2 * self.evict_every} more tokens")

    @property
    def relative(self) -> bool:
        return self.name == "sinks-window" if self.relative_positions is None else self.relative_positions


def make_policy(config: KVPolicyConfig, info: ModelInfo) -> Policy:
    cls = {"full": Full, "sinks-window": SinksWindow, "h2o": HeavyHitters, "veda": Voting}[config.name]
    return cls(config, info)


class Policy:
    needs_probs = False

    def __init__(self, config: KVPolicyConfig, info: ModelInfo):
        self.config, self.info = config, info

    def capacity(self, wanted: int) -> int:
        """Slots to allocate for `wanted` tokens."""
        return min(wanted, self.config.budget)

    def chunk(self) -> int:
        """Most tokens per step that still leaves room for the sinks and one eviction."""
        return max(1, self.config.budget - self.config.sinks - self.config.evict_every)

    def make_room(self, cache: KVCache, n: int) -> None:
        raise NotImplementedError

    def observe(self, cache: KVCache, probs: list[np.ndarray] | None, n: int) -> None:
        """Record what the step that wrote the last `n` slots saw (scored policies)."""

    def check_positions(self, model) -> None:
        if self.config.relative and any(self.info.key_frequencies(l) is None for l in range(self.info.num_layers)):
            raise OnnxlmError(f"--kv-policy {self.config.name} moves keys by rotating them, and this artifact does not "
                              f"record its {self.info.architecture} model's RoPE frequencies (it was built before "
                              "they were): rebuild it, or use h2o or veda on a `--kv-scores` artifact")
        if not self.config.relative and not model.interface.has("kv_positions"):
            raise OnnxlmError(f"--kv-policy {self.config.name} keeps original positions: it needs an artifact "
                              "built with `onnxlm optimize ... --kv-scores`")
        if self.needs_probs and not model.interface.has("attention_probs"):
            raise OnnxlmError(f"--kv-policy {self.config.name} scores slots by attention: it needs an artifact "
                              "built with `onnxlm optimize ... --kv-scores`")


class Full(Policy):
    def capacity(self, wanted: int) -> int:
        return wanted

    def chunk(self) -> int:
        return 1 << 30

    def make_room(self, cache: KVCache, n: int) -> None:
        cache.check_room(n)

    def check_positions(self, model) -> None:
        pass


class SinksWindow(Policy):
    def make_room(self, cache: KVCache, n: int) -> None:
        budget, sinks = self.config.budget, self.config.sinks
        need = cache.length + n - budget
        if need <= 0:
            return
        drop = min(max(need, self.config.evict_every), cache.length - sinks)
        if drop < need:
            raise OnnxlmError(f"{n} new tokens do not fit a KV budget of {budget} with {sinks} sinks")
        end = cache.length
        with cache.editing("KV eviction") as arrays:
            for i, a in enumerate(arrays):  # (batch, kv_heads, capacity, head_dim); keys at even indices
                a[:, :, sinks : end - drop] = a[:, :, sinks + drop : end]  # numpy copies overlapping slices safely
                if i % 2 == 0 and self.config.relative:
                    rotate_keys(a[:, :, sinks : end - drop], -drop, self.info, i // 2)
        cache.length -= drop
        if not self.config.relative:
            cache.offset += drop


class _Scored(Policy):
    """Per layer and KV head, a score per slot and the original position of the token in it; eviction picks
    victims per (layer, head) and moves the cache's last slots into their places (slot order does not matter to
    attention in decode: keys carry their rotary position)."""

    needs_probs = True

    def __init__(self, config: KVPolicyConfig, info: ModelInfo):
        super().__init__(config, info)
        shape = (info.num_layers, info.num_kv_heads, config.budget)  # (layers, kv_heads, slots)
        self.scores = np.zeros(shape, np.float64)
        self.positions = np.zeros(shape, np.int64)

    def protected(self, next_position: int) -> np.ndarray:
        """(layers, kv_heads, slots) bool: slots that may not leave."""
        return self.positions < self.config.sinks

    def eviction_key(self, end: int) -> np.ndarray:
        """(layers, kv_heads, end): lower leaves first (ties: the older token)."""
        raise NotImplementedError

    def make_room(self, cache: KVCache, n: int) -> None:
        need = cache.length + n - self.config.budget
        if need <= 0:
            return
        end = cache.length
        keep = self.protected(end + cache.offset)[:, :, :end]  # (layers, kv_heads, end)
        if (~keep).sum(axis=-1).min() < need:
            raise OnnxlmError(f"{n} new tokens do not fit a KV budget of {self.config.budget}")
        key = np.where(keep, np.inf, self.eviction_key(end))
        victims = np.lexsort((self.positions[:, :, :end], key), axis=-1)[..., :need]  # (layers, kv_heads, need)
        with cache.editing("KV eviction") as arrays:
            if need == 1:  # decode: the last slot fills each victim's place, every layer's heads at once
                self._move_last(arrays, victims[..., 0], end - 1)
            else:
                for layer in range(self.info.num_layers):
                    for head in range(self.info.num_kv_heads):
                        self._move(arrays, layer, head, victims[layer, head], end - need)
        cache.length -= need
        cache.offset += need

    def _move_last(self, arrays: list[np.ndarray], victims: np.ndarray, last: int) -> None:
        """victims (layers, kv_heads): copy slot `last` into each (a victim that is `last` copies onto itself)."""
        heads = np.arange(self.info.num_kv_heads)
        for layer in range(self.info.num_layers):
            for a in arrays[2 * layer : 2 * layer + 2]:  # (1, kv_heads, capacity, head_dim)
                a[0, heads, victims[layer]] = a[0, heads, last]
        for state in (self.scores, self.positions):
            state[np.arange(self.info.num_layers)[:, None], heads[None, :], victims] = state[:, :, last]

    def _move(self, arrays: list[np.ndarray], layer: int, head: int, victims: np.ndarray, new_end: int) -> None:
        """Fill the victims' slots below new_end with the surviving slots at or above it."""
        holes = np.sort(victims[victims < new_end])
        tail = np.arange(new_end, new_end + len(victims))
        movers = tail[~np.isin(tail, victims)]
        for a in arrays[2 * layer : 2 * layer + 2]:  # (1, kv_heads, capacity, head_dim)
            a[0, head, holes] = a[0, head, movers]
        for state in (self.scores, self.positions):
            state[layer, head, holes] = state[layer, head, movers]

    def observe(self, cache: KVCache, probs: list[np.ndarray] | None, n: int) -> None:
        end, start = cache.length, cache.length - n
        self.positions[:, :, start:end] = np.arange(start, end) + cache.offset
        self.scores[:, :, start:end] = 0.0
        for layer, p in enumerate(probs):  # (1, num_heads, n, >= end)
            group = p[0, :, :, :end].reshape(self.info.num_kv_heads, -1, n, end)  # (kv_heads, group, n, end)
            self.score(layer, group, start)

    def score(self, layer: int, group: np.ndarray, start: int) -> None:
        raise NotImplementedError


class HeavyHitters(_Scored):
    def __init__(self, config: KVPolicyConfig, info: ModelInfo):
        super().__init__(config, info)
        self.recent = (config.budget - config.sinks) // 2  # H2O's split: half recent, half heavy hitters

    def chunk(self) -> int:
        return max(1, self.config.budget - self.config.sinks - self.recent - 1)  # the heavy half can make room

    def protected(self, next_position: int) -> np.ndarray:
        return super().protected(next_position) | (self.positions >= next_position - self.recent)

    def eviction_key(self, end: int) -> np.ndarray:
        return self.scores[:, :, :end]  # the lowest accumulated attention leaves

    def score(self, layer, group, start):
        self.scores[layer, :, : group.shape[-1]] += group.sum(axis=(1, 2))  # accumulated attention per slot


class Voting(_Scored):
    def eviction_key(self, end: int) -> np.ndarray:
        return -self.scores[:, :, :end]  # the most votes leave

    def score(self, layer, group, start):
        rows = group.mean(axis=1)  # (kv_heads, n, end): the group's attention of each new query
        n, end = rows.shape[1:]
        valid = np.arange(end)[None, :] <= start + np.arange(n)[:, None]  # (n, end): causal
        count = valid.sum(axis=1)  # (n,)
        mean = (rows * valid).sum(axis=-1) / count  # (kv_heads, n)
        std = np.sqrt(np.maximum((rows**2 * valid).sum(axis=-1) / count - mean**2, 0.0))
        threshold = self.config.veda_a * mean - self.config.veda_b * std
        votes = (rows < threshold[..., None]) & valid  # (kv_heads, n, end)
        self.scores[layer, :, :end] += votes.sum(axis=1)


def rotate_keys(keys: np.ndarray, delta: int, info: ModelInfo, layer: int = 0) -> None:
    """Move layer `layer`'s keys, stored after its (rotate-half) RoPE, by `delta` positions, in place:
    k <- R(delta) k, with the frequencies the model's description records (scaled, partial, per-layer, or none).

    keys: (..., head_dim)."""
    inv_freq = np.asarray(info.key_frequencies(layer), np.float64)  # (rotary_dim / 2,)
    half = len(inv_freq)
    if not half:  # a layer without RoPE (NoPE): its keys carry no position
        return
    cos, sin = np.cos(delta * inv_freq).astype(np.float32), np.sin(delta * inv_freq).astype(np.float32)
    first, second = keys[..., :half].copy(), keys[..., half : 2 * half].copy()
    keys[..., :half] = first * cos - second * sin
    keys[..., half : 2 * half] = second * cos + first * sin
