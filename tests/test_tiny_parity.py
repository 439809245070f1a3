"""fp32 artifacts (plain and lowered) of a tiny random llama against transformers: logits and greedy tokens."""

import numpy as np

from reference import torch_greedy, torch_logits

from onnxlm.runtime.generate import decode_one_token, prefill


def test_prefill_and_decode_logits_match_transformers(tiny_any_artifact, tiny_torch):
    art = tiny_any_artifact
    ids = art.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    cache = art.session.new_cache(capacity=64)
    ours = [prefill(art.session, cache, ids[:6])]
    for token in ids[6:8]:
        ours.append(decode_one_token(art.session, cache, token).copy())
    ours.append(art.session.step(np.asarray([ids[8:]]), cache)[0, -1])  # a multi-token chunk after a past
    ref = torch_logits(tiny_torch, ids)[[5, 6, 7, len(ids) - 1]]
    assert cache.length == len(ids)
    np.testing.assert_allclose(np.stack(ours), ref, atol=1e-4, rtol=0)


def test_logits_to_keep_runs_the_head_on_the_last_row_only(tiny_any_artifact):
    """The logits_to_keep pass: a last_only prefill returns (batch, 1, vocab) equal to the full prefill's last
    row, leaves the same cache behind, and the switch is an input no caller has to feed."""
    session = tiny_any_artifact.session
    report = next(r for r in tiny_any_artifact.manifest["passes"] if r["name"] == "logits_to_keep")
    assert report["matched"] == {"lm_head_slice": 1} and report["check"]["max_abs_logit_diff"] == 0
    assert session.interface.has("logits_to_keep") and "logits_to_keep" not in {i.name for i in session.session.get_inputs()}
    ids = np.array([[5, 6, 7, 8, 9, 10]])
    full_cache, last_cache = session.new_cache(capacity=16), session.new_cache(capacity=16)
    full = session.step(ids, full_cache)  # (1, 6, vocab)
    last = session.step(ids, last_cache, last_only=True)  # (1, 1, vocab)
    assert full.shape[1] == 6 and last.shape[1] == 1
    np.testing.assert_allclose(last[:, 0], full[:, -1], atol=1e-5, rtol=0)
    # the same cache (and IO binding) next runs a 2-token chunk, as speculative verification does: all its rows
    after_full = session.step(ids[:, :2], full_cache)
    after_last = session.step(ids[:, :2], last_cache)
    assert after_last.shape[1] == 2
    np.testing.assert_allclose(after_last, after_full, atol=1e-5, rtol=0)


def test_batched_prefill_matches_single_rows(tiny_any_artifact):
    session = tiny_any_artifact.session
    ids = np.array([[5, 6, 7, 8], [9, 10, 11, 12]])
    both = session.step(ids, session.new_cache(batch=2, capacity=8))
    first = session.step(ids[:1], session.new_cache(capacity=8))
    np.testing.assert_allclose(both[:1], first, atol=1e-5)


def test_greedy_64_tokens_identical_to_transformers(tiny_any_artifact, tiny_torch):
    ids = tiny_any_artifact.tokenizer.encode("In 2007, version 3")
    ours = list(tiny_any_artifact.generate_ids(ids, max_new_tokens=64, ignore_eos=True))
    assert len(ours) == 64
    assert ours == torch_greedy(tiny_torch, ids, 64)


def test_runtime_imports_no_torch(tiny_artifact):
    import subprocess
    import sys

    code = (
        "import sys, onnxlm; a = onnxlm.load(sys.argv[1]); "
        "print(a.generate('fox', max_new_tokens=4, chat=False)); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'runtime imported torch'"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tiny_artifact.directory)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_lowered_graph_uses_ort_llm_ops_and_a_shared_kv_buffer(tiny_artifacts):
    art = tiny_artifacts("fp32")
    ops = art.manifest["op_histogram"]
    layers = art.info.num_layers
    assert ops["com.microsoft::GroupQueryAttention"] == layers
    assert ops["com.microsoft::SkipSimplifiedLayerNormalization"] == 2 * layers
    assert art.session.shared_kv and not tiny_artifacts("fp32-plain").session.shared_kv
    cache = art.session.new_cache(capacity=16)
    buffers = [v.data_ptr() for v in cache.values]
    art.session.step(np.asarray([[3, 4, 5]]), cache)
    art.session.step(np.asarray([[6]]), cache)
    assert cache.length == 4 and [v.data_ptr() for v in cache.values] == buffers  # written in place


def test_lowering_reports_every_fusion_and_checks_it(tiny_artifacts):
    reports = {r["name"]: r for r in tiny_artifacts("fp32").manifest["passes"]}
    layers = tiny_artifacts("fp32").info.num_layers
    assert reports["fuse_gqa"]["matched"]["gqa"] == layers
    assert reports["pack_qkv"]["matched"]["packed_qkv"] == layers
    assert reports["pack_gate_up"]["matched"]["packed_gate_up"] == layers
    for r in reports.values():
        assert r["check"]["max_abs_logit_diff"] <= 1e-4


def test_full_cache_is_an_error(tiny_artifact):
    import pytest

    from onnxlm.errors import OnnxlmError

    cache = tiny_artifact.session.new_cache(capacity=4)
    tiny_artifact.session.step(np.asarray([[3, 4, 5]]), cache)
    with pytest.raises(OnnxlmError, match="KV cache full"):
        tiny_artifact.session.step(np.asarray([[6, 7]]), cache)
