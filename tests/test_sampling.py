"""Sampling warps against transformers' own logits processors, the speculative acceptance rule's distribution,
and stop strings: no model needed, seconds."""

import numpy as np
import pytest

from onnxlm.errors import OnnxlmError
from onnxlm.runtime.sampling import Sampler, SamplingConfig, draw, warp
from onnxlm.runtime.speculative import Draft, PromptLookup, accept_sampled
from onnxlm.runtime.tokenizer import cut_at_stop_strings


def hf_probs(logits: np.ndarray, context: list[int], config: SamplingConfig) -> np.ndarray:
    """The same warps through transformers' processors, in transformers' order."""
    import torch
    from transformers.generation import logits_process as lp

    processors = lp.LogitsProcessorList()
    if config.repetition_penalty != 1.0:
        processors.append(lp.RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    processors.append(lp.TemperatureLogitsWarper(config.temperature))
    if config.top_k:
        processors.append(lp.TopKLogitsWarper(config.top_k))
    if config.top_p < 1.0:
        processors.append(lp.TopPLogitsWarper(config.top_p))
    if config.min_p:
        processors.append(lp.MinPLogitsWarper(config.min_p))
    scores = processors(torch.tensor([context]), torch.tensor(logits[None], dtype=torch.float32))
    return torch.softmax(scores.double(), dim=-1)[0].numpy()


@pytest.mark.parametrize("config", [
    SamplingConfig(temperature=0.7),
    SamplingConfig(top_k=5),
    SamplingConfig(top_p=0.8),
    SamplingConfig(min_p=0.1, temperature=1.5),
    SamplingConfig(repetition_penalty=1.3, top_k=20, top_p=0.9, temperature=0.8),
])
def test_warps_match_transformers(config):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal(64) * 3).astype(np.float32)
    context = [3, 3, 10, 40, 63]
    ours, theirs = warp(logits, config, context), hf_probs(logits, context, config)
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    assert (ours > 0).sum() < 64 or config.top_k == 0  # the filters removed something where they apply


def test_seed_makes_sampling_reproducible():
    logits = np.random.default_rng(1).standard_normal(100).astype(np.float32)

    def draws(seed):
        sampler = Sampler(SamplingConfig(seed=seed))
        return [sampler(logits, []) for _ in range(20)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_bad_sampling_options_are_user_errors():
    for bad in (dict(temperature=0), dict(top_p=0), dict(top_k=-1), dict(min_p=1.0), dict(repetition_penalty=0)):
        with pytest.raises(OnnxlmError):
            SamplingConfig(**bad)


def test_draw_follows_the_distribution():
    probs = np.array([0.5, 0.0, 0.3, 0.2])
    rng = np.random.default_rng(0)
    counts = np.bincount([draw(probs, rng) for _ in range(20000)], minlength=4)
    assert counts[1] == 0
    np.testing.assert_allclose(counts / counts.sum(), probs, atol=0.015)


def chi2_critical(dof: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z = 3.09: 0.999)."""
    return dof * (1 - 2 / (9 * dof) + z * np.sqrt(2 / (9 * dof))) ** 3


def chi2(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    keep = probs > 0
    expected = probs[keep] * counts.sum()
    return float(((counts[keep] - expected) ** 2 / expected).sum()), int(keep.sum()) - 1


@pytest.mark.parametrize("deterministic", [False, True])
def test_acceptance_rule_keeps_the_target_distribution(deterministic):
    """Draw x ~ q, verify against p with Leviathan's rule: the emitted first token must be distributed as p."""
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(12) * 0.7)
    q = rng.dirichlet(np.ones(12) * 0.7)
    bonus = rng.dirichlet(np.ones(12))
    counts = np.zeros(12)
    for _ in range(30000):
        if deterministic:  # prompt lookup: the draft is a fixed token, q is one-hot
            draft = Draft([3])
        else:
            token = draw(q, rng)
            draft = Draft([token], q[None])
        k, replacement = accept_sampled(draft, np.stack([p, bonus]), rng)
        counts[draft.tokens[0] if k == 1 else replacement] += 1
    stat, dof = chi2(counts, p)
    assert stat < chi2_critical(dof), (stat, dof)
    # And the test can fail: the draft's own distribution is far from p.
    if not deterministic:
        assert chi2(counts, q)[0] > chi2_critical(dof)


def test_prompt_lookup_drafts_the_earliest_continuation():
    lookup, greedy = PromptLookup(max_ngram=3), Sampler()
    context = [5, 6, 7, 8, 9, 1, 5, 6, 7, 2, 3, 5, 6, 7]
    assert lookup.propose(context, 4, greedy).tokens == [8, 9, 1, 5]  # "5 6 7" first seen at 0, continued by 8..
    assert lookup.propose([1, 2, 3, 4], 4, greedy).tokens == []  # no repeat: no draft
    assert lookup.propose([4, 1, 2, 4], 3, greedy).tokens == [1, 2, 4]  # falls back to the 1-gram "4"


def test_stop_strings_cut_the_stream_across_pieces():
    pieces = ["Hello wo", "rld. E", "ND here", " more"]
    assert "".join(cut_at_stop_strings(iter(pieces), ["END"])) == "Hello world. "
    assert "".join(cut_at_stop_strings(iter(pieces), [])) == "Hello world. END here more"
    assert "".join(cut_at_stop_strings(iter(pieces), ["nowhere"])) == "Hello world. END here more"
    consumed = []

    def produce():
        for p in pieces:
            consumed.append(p)
            yield p

    list(cut_at_stop_strings(produce(), ["wor"]))
    assert consumed == pieces[:2]  # generation stops at the piece that completes the stop string
