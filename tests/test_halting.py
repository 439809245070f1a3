"""QuickSilver token halting (the quicksilver recipe) on a tiny 4-layer model, against a torch layer-by-layer
reference: which tokens halt where, the logits with halted tokens' K/V masked, prefill and decode alike."""

import numpy as np
import pytest

from conftest import write_tiny_llama
from onnxlm.errors import OnnxlmError
from reference import halting_logits

TEXT = "The quick brown fox jumps over the lazy dog. " * 4
MIN_LAYER = 1


@pytest.fixture(scope="module")
def four_layer_hf(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("qs") / "hf", layers=4)


def build(hf, tmp_path_factory, skip_kv: bool):
    import onnxlm
    import transformers

    art = onnxlm.optimize(str(hf), recipe="quicksilver", output=tmp_path_factory.mktemp("qs") / "art",
                          overrides={"quicksilver_halting": {"min_layer": MIN_LAYER, "skip_kv": skip_kv}})
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(hf, attn_implementation="eager").eval()
    return art, torch_model


@pytest.fixture(scope="module")
def four_layers(four_layer_hf, tmp_path_factory):
    return build(four_layer_hf, tmp_path_factory, skip_kv=True)


def test_threshold_zero_is_the_unhalted_graph(four_layers):
    art, _ = four_layers
    report = next(r for r in art.manifest["passes"] if r["name"] == "quicksilver_halting")
    assert report["check"]["max_abs_logit_diff"] <= report["check"]["tolerance"]


@pytest.mark.parametrize("threshold, skip_kv", [(0.6, True), (1.2, True), (0.6, False)])
def test_halting_matches_torch_in_prefill_and_decode(four_layers, four_layer_hf, tmp_path_factory, threshold,
                                                     skip_kv):
    art, torch_model = four_layers if skip_kv else build(four_layer_hf, tmp_path_factory, skip_kv=False)
    ids = art.tokenizer.encode(TEXT)
    expected, expected_halted = halting_logits(torch_model, ids, threshold, MIN_LAYER, skip_kv)
    assert 0 < expected_halted.sum() < expected_halted.size  # some tokens halt, not all
    model = art.session
    cache = model.new_cache(capacity=len(ids), halt_threshold=threshold)
    prefill = model.step(np.asarray([ids[:-3]], np.int64), cache)[0]  # (seq - 3, vocab)
    decoded = [model.step(np.asarray([[t]], np.int64), cache)[0, -1].copy() for t in ids[-3:]]
    np.testing.assert_allclose(np.vstack([prefill, decoded]), expected, atol=2e-4)
    state = cache.state["token_halting"]
    np.testing.assert_array_equal(state.halted[0], expected_halted)
    assert state.skipped == expected_halted.sum() and state.run == expected_halted.size


def test_halt_threshold_needs_the_quicksilver_graph(tiny_artifact, four_layers, tmp_path):
    with pytest.raises(OnnxlmError, match="quicksilver"):
        tiny_artifact.session.new_cache(capacity=8, halt_threshold=0.5)
    art, _ = four_layers
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 3)
    dense = art.perplexity(text, window=64)
    halted = art.perplexity(text, window=64, halt_threshold=1.2)
    assert dense["layers_skipped"] == 0 and 0 < halted["layers_skipped"] < 1
    assert halted["ppl"] != dense["ppl"]
