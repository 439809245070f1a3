"""Choosing the next token: greedy, or sampling from warped logits.

The warps and their order follow transformers' `generate` (so that settings mean the same thing there and here):
repetition penalty (CTRL, arXiv 1909.05858), then temperature, top-k, top-p (nucleus) and min-p. The random
generator is explicit: a `Sampler` owns one, seeded from its config, so a seed makes a run reproducible.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from onnxlm.errors import OnnxlmError


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    min_p: float = 0.0  # 0.0: off
    repetition_penalty: float = 1.0  # 1.0: off
    seed: int | None = None

    def __post_init__(self):
        checks = [
            (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p < 1, f"min_p must be in [0, 1), got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (self.seed is None or 0 <= self.seed < 2**64, f"seed must be in [0, 2**64), got {self.seed}"),
        ]
        for ok, message in checks:
            if not ok:
                raise OnnxlmError(message)


def penalize_repetition(logits: np.ndarray, context: Sequence[int], penalty: float) -> np.ndarray:
    """CTRL's penalty on every token already in the context: positive logits divided, negative multiplied."""
    if penalty == 1.0 or not len(context):
        return logits
    seen = np.unique(np.asarray(context, np.int64))
    out = logits.copy()
    picked = out[seen]
    out[seen] = np.where(picked < 0, picked * penalty, picked / penalty)
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - np.max(logits)
    e = np.exp(z)
    return e / e.sum()


def warp(logits: np.ndarray, config: SamplingConfig, context: Sequence[int]) -> np.ndarray:
    """The distribution to sample from: (vocab,) float64 probabilities, zero outside the kept set."""
    logits = penalize_repetition(np.asarray(logits, np.float32), context, config.repetition_penalty)
    logits = logits.astype(np.float64) / config.temperature
    if 0 < config.top_k < logits.size:
        kth = np.partition(logits, -config.top_k)[-config.top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = softmax(logits)
    if config.top_p < 1.0:
        # The smallest set of most likely tokens whose mass reaches top_p (the most likely token always stays).
        order = np.argsort(-probs, kind="stable")
        mass_before = np.cumsum(probs[order]) - probs[order]
        probs[order[mass_before >= config.top_p]] = 0.0
    if config.min_p > 0.0:
        probs[probs < config.min_p * probs.max()] = 0.0
    return probs / probs.sum()


def draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """One token from a probability vector (by inverse CDF, O(vocab))."""
    cdf = np.cumsum(probs)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), probs.size - 1))


class Sampler:
    """Greedy when `config` is None; else draws from `warp`ed logits with its own seeded generator."""

    def __init__(self, config: SamplingConfig | None = None):
        self.config = config
        self.rng = np.random.default_rng(None if config is None else config.seed)

    @property
    def greedy(self) -> bool:
        return self.config is None

    def probs(self, logits: np.ndarray, context: Sequence[int]) -> np.ndarray:
        """The distribution the next token is drawn from; one-hot on the argmax for greedy."""
        if self.greedy:
            one_hot = np.zeros(logits.shape[-1])
            one_hot[int(np.argmax(logits))] = 1.0
            return one_hot
        return warp(logits, self.config, context)

    def __call__(self, logits: np.ndarray, context: Sequence[int]) -> int:
        if self.greedy:
            return int(np.argmax(logits))
        return draw(self.probs(logits, context), self.rng)
