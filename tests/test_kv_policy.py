"""KV-cache policies on the tiny model: the expose_attention graph, key re-rotation against ORT's own RoPE, which
tokens each policy keeps, bounded memory past the context length, and the CLI surface."""

import json

import numpy as np
import pytest

from cli_helpers import run_cli
from onnxlm.errors import OnnxlmError
from onnxlm.runtime.bounded_cache import bounded_generate, bounded_perplexity, policy_step, start
from onnxlm.runtime.generate import generate_tokens
from onnxlm.runtime.kv_cache import KVCache
from onnxlm.runtime.kv_policy import HeavyHitters, KVPolicyConfig, Voting, rotate_keys
from onnxlm.runtime.session import DecoderSession

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


@pytest.fixture(scope="module")
def scores_artifact(tiny_hf_dir, tmp_path_factory):
    import onnxlm

    return onnxlm.optimize(str(tiny_hf_dir), recipe="fp32", output=tmp_path_factory.mktemp("kv") / "fp32-kv",
                           kv_scores=True)


def text_ids(art, n):
    ids = art.tokenizer.encode(TEXT)
    return (ids * (n // len(ids) + 1))[:n]


def layer0(model: DecoderSession, ids: list[int], start_position: int = 0):
    """Layer 0's keys and values (kv_heads, n, head_dim) of `ids` run at positions start_position.. from an
    empty cache; layer 0's K/V depend on the token and its position only."""
    cache = model.new_cache(capacity=len(ids))
    cache.offset = start_position
    model.step(np.asarray([ids], np.int64), cache)
    return cache.arrays[0][0, :, : len(ids)].copy(), cache.arrays[1][0, :, : len(ids)].copy()


def test_expose_attention_is_lossless_and_returns_probabilities(scores_artifact):
    report = next(r for r in scores_artifact.manifest["passes"] if r["name"] == "expose_attention")
    assert report["check"]["max_abs_logit_diff"] <= report["check"]["tolerance"]
    assert report["matched"] == {"gqa": 2, "probs_outputs": 2}
    model = scores_artifact.session
    cache = model.new_cache(capacity=16)
    ids = text_ids(scores_artifact, 6)
    _, probs = model.step_reading(np.asarray([ids], np.int64), cache, "attention_probs")
    assert len(probs) == 2
    rows = probs[0][0, :, :, :6]  # (heads, 6, 6)
    np.testing.assert_allclose(rows.sum(-1), 1.0, atol=1e-5)
    assert np.all(np.triu(rows, 1) == 0)  # causal


def test_long_steps_on_the_scores_graph_run_in_chunks(tiny_artifact, scores_artifact, monkeypatch):
    monkeypatch.setattr(scores_artifact.session, "max_step_tokens", 16)  # a 40-token step becomes 16 + 16 + 8
    ids = np.asarray([text_ids(tiny_artifact, 40)], np.int64)
    chunked_cache = scores_artifact.session.new_cache(capacity=40)
    chunked = scores_artifact.session.step(ids, chunked_cache)
    whole = tiny_artifact.session.step(ids, tiny_artifact.session.new_cache(capacity=40))
    assert chunked.shape == whole.shape and chunked_cache.length == 40
    np.testing.assert_allclose(chunked, whole, atol=1e-4)


def test_rotate_keys_matches_the_graphs_rope(scores_artifact):
    model = scores_artifact.session
    ids = text_ids(scores_artifact, 8)
    k0, v0 = layer0(model, ids, 0)
    k9, v9 = layer0(model, ids, 9)
    assert np.abs(k9 - k0).max() > 0.1  # the position moved the keys...
    moved = k0.copy()
    rotate_keys(moved, 9, model.info)
    np.testing.assert_allclose(moved, k9, atol=1e-4)  # ...by exactly RoPE's rotation
    np.testing.assert_allclose(v0, v9, atol=1e-6)


def test_sinks_window_keeps_sinks_and_recent_tokens_at_cache_positions(tiny_artifact):
    model = tiny_artifact.session
    ids = text_ids(tiny_artifact, 120)
    config = KVPolicyConfig("sinks-window", budget=40, sinks=4, evict_every=8)
    policy, cache = start(model, config, len(ids))
    policy_step(model, cache, policy, ids[:30])
    for token in ids[30:]:
        policy_step(model, cache, policy, [token])
        assert cache.length <= 40
    kept = ids[:4] + ids[len(ids) - (cache.length - 4):]
    keys, values = layer0(model, kept)  # the kept tokens at slots 0..length-1: cache-relative positions
    np.testing.assert_allclose(cache.arrays[0][0, :, : cache.length], keys, atol=1e-4)
    np.testing.assert_allclose(cache.arrays[1][0, :, : cache.length], values, atol=1e-5)


def test_policies_with_room_for_everything_equal_the_full_cache(tiny_artifact, scores_artifact):
    ids = text_ids(tiny_artifact, 60)
    full = list(generate_tokens(tiny_artifact.session, ids, 20))
    reference = bounded_perplexity(tiny_artifact.session, ids, KVPolicyConfig(), window=60)["ppl"]
    for name, art in (("sinks-window", tiny_artifact), ("h2o", scores_artifact), ("veda", scores_artifact)):
        config = KVPolicyConfig(name, budget=96)
        assert list(bounded_generate(art.session, ids, 20, config)) == full, name
        assert bounded_perplexity(art.session, ids, config, window=60)["ppl"] == pytest.approx(reference, rel=1e-4)


def test_sinks_window_runs_past_the_context_length_in_constant_memory(tiny_artifact, scores_artifact):
    model = tiny_artifact.session  # context length 1024
    config = KVPolicyConfig("sinks-window", budget=64)
    policy, cache = start(model, config, 1200)
    buffers = [a.ctypes.data for a in cache.arrays]
    logits = policy_step(model, cache, policy, text_ids(tiny_artifact, 10))
    for _ in range(1100):
        logits = policy_step(model, cache, policy, [int(np.argmax(logits[-1]))])
        assert cache.length <= 64
    assert np.isfinite(logits).all() and cache.capacity == 64 and cache.offset == 0
    assert [a.ctypes.data for a in cache.arrays] == buffers  # the same 64-slot buffers throughout
    assert len(list(bounded_generate(model, text_ids(tiny_artifact, 10), 1100, config))) == 1100
    with pytest.raises(OnnxlmError, match="context length"):  # original positions stop at the context length
        start(scores_artifact.session, KVPolicyConfig("sinks-window", budget=64, relative_positions=False), 1200)


def test_h2o_and_veda_keep_sinks_and_evict_by_score(tiny_artifact, scores_artifact):
    model = scores_artifact.session
    ids = text_ids(scores_artifact, 100)
    for name in ("h2o", "veda"):
        config = KVPolicyConfig(name, budget=40, sinks=4)
        policy, cache = start(model, config, len(ids))
        policy_step(model, cache, policy, ids[:30])
        for token in ids[30:]:
            policy_step(model, cache, policy, [token])
        assert cache.length == 40 and cache.offset == 60
        positions = policy.positions[:, :, :40]  # (layers, kv_heads, slots): each head keeps its own tokens
        assert np.all(np.sort(positions, axis=-1)[..., :4] == np.arange(4))  # sinks
        assert np.all(np.sort(positions, axis=-1)[..., -18:] == np.arange(82, 100)) or name == "veda"  # recent
        _, values = layer0(model, ids)
        for head in range(model.info.num_kv_heads):  # the slot holds the token the policy thinks it holds
            np.testing.assert_allclose(cache.arrays[1][0, head, :40], values[head, positions[0, head]], atol=1e-5)
        assert len(list(bounded_generate(model, ids, 5, config))) == 5  # a prompt over the budget, in chunks
    with pytest.raises(OnnxlmError, match="--kv-scores"):
        start(tiny_artifact.session, KVPolicyConfig("h2o", budget=40), 100)


def fake_cache(slots: int, kv_heads: int = 1) -> KVCache:
    cache = KVCache.empty(["k", "v"], 1, kv_heads, 2, capacity=slots)
    cache.arrays[1][0, :, :, 0] = np.arange(slots)  # value = slot index, to follow the moves
    cache.length = slots
    return cache


class OneLayer:
    num_layers, num_kv_heads, head_dim, rope_theta = 1, 1, 2, 10000.0


def test_h2o_evicts_the_lowest_accumulated_score_outside_the_recent_half():
    policy = HeavyHitters(KVPolicyConfig("h2o", budget=40, sinks=4), OneLayer)
    cache = fake_cache(40)
    policy.positions[0, 0] = np.arange(40)
    policy.scores[0, 0] = 10.0
    policy.scores[0, 0, 7] = 1.0  # the weakest old token
    policy.scores[0, 0, 30] = 0.0  # weaker, but recent: protected
    policy.scores[0, 0, 1] = 0.0  # weaker, but a sink: protected
    policy.make_room(cache, 1)
    assert cache.length == 39 and cache.offset == 1
    assert cache.arrays[1][0, 0, 7, 0] == 39  # the last slot moved into the victim's place
    assert 7 not in policy.positions[0, 0, :39]


def test_veda_votes_against_tokens_below_the_rows_mean():
    policy = Voting(KVPolicyConfig("veda", budget=40, sinks=4), OneLayer)
    cache = fake_cache(40)
    policy.positions[0, 0] = np.arange(40)
    for _ in range(3):  # three queries that look at every token but 12
        row = np.ones((1, 1, 1, 40), np.float32)
        row[..., 12] = 0.0
        policy.score(0, row.reshape(1, 1, 1, 40), 39)
    assert policy.scores[0, 0, 12] == 3 and policy.scores[0, 0, :12].sum() == 0
    policy.make_room(cache, 1)
    assert 12 not in policy.positions[0, 0, :39]


def test_cli_eval_and_generate_take_a_kv_policy(tiny_artifact, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    art = tiny_artifact.directory
    code, out, _ = run_cli(capsys, "eval", art, "--text", text, "--window", "200", "--kv-policy", "sinks-window",
                           "--kv-budget", "64", "--json")
    data = json.loads(out)
    assert code == 0 and data["kv_policy"] == "sinks-window" and data["max_slots"] <= 64 and data["ppl"] > 1
    runs = [run_cli(capsys, "generate", art, "--prompt", "the fox", "--max-new-tokens", "40", "--no-chat", *policy)
            for policy in ([], ["--kv-policy", "sinks-window", "--kv-budget", "100"])]
    assert runs[0][0] == runs[1][0] == 0 and runs[0][1] == runs[1][1]  # room for everything: the same text
    code, _, err = run_cli(capsys, "eval", art, "--text", text, "--kv-budget", "64")
    assert code == 2 and "evicting --kv-policy" in err
    code, _, err = run_cli(capsys, "generate", art, "--prompt", "x", "--kv-policy", "h2o", "--kv-budget", "40")
    assert code == 2 and "--kv-scores" in err
