"""Static layer removal (`remove_layers`) on a tiny 3-layer llama: the rewrite against torch with the same layers
dropped, the measured importance against torch, the PPL budget, and the options."""

import json

import numpy as np
import pytest

import onnxlm
from conftest import write_tiny_llama
from onnxlm.errors import OnnxlmError
from onnxlm.passes.evaluate import open_session, session_perplexity
from onnxlm.passes.registry import make_pass
from reference import block_influence, drop_layers, torch_logits


@pytest.fixture(scope="module")
def three_layers(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("three") / "hf", layers=3, seed=2)


@pytest.fixture(scope="module")
def removed_one(three_layers, tmp_path_factory):
    return onnxlm.optimize(str(three_layers), recipe="fp32", output=tmp_path_factory.mktemp("rl") / "a",
                           remove_layers=1)


def report(art):
    return next(p for p in art.manifest["passes"] if p["name"] == "remove_layers")


def test_removed_layer_matches_torch_without_it(removed_one, three_layers):
    from onnxlm.frontend import load_source

    drop = report(removed_one)["check"]["removed_layers"]
    assert len(drop) == 1 and removed_one.info.num_layers == 2
    source = load_source(str(three_layers))
    drop_layers(source.torch_model, drop)
    ids = removed_one.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    ours = removed_one.session.step(np.asarray([ids]), removed_one.session.new_cache(capacity=32))[0]
    np.testing.assert_allclose(ours, torch_logits(source.torch_model, ids), atol=1e-4)
    genai = json.loads((removed_one.directory / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["num_hidden_layers"] == 2
    names = {i.name for i in removed_one.session.session.get_inputs()}
    assert "past_key_values.1.value" in names and "past_key_values.2.key" not in names


def test_reported_importance_is_what_it_claims(removed_one, three_layers):
    from onnxlm.api import CALIBRATION_TEXT
    from onnxlm.frontend import load_source

    check = report(removed_one)["check"]
    source = load_source(str(three_layers))
    ids = source.tokenizer.encode(CALIBRATION_TEXT.read_text()).ids[:1024]
    # Block influence: the same definition computed by torch hooks on the same tokens (windows of 512 there).
    torch_bi = np.mean([block_influence(source.torch_model, ids[i:i + 512]) for i in (0, 512)], axis=0)
    np.testing.assert_allclose(check["block_influence"], torch_bi, atol=1e-4)
    # PPL without the removed layer: what the finished artifact scores on the same tokens.
    session = open_session(removed_one.directory / "model.onnx")
    ppl = session_perplexity(session, removed_one.info, ids)
    drop = check["removed_layers"][0]
    assert ppl == pytest.approx(check["ppl_without_layer"][drop], rel=1e-4)
    assert check["ppl_without_layer"][drop] == min(check["ppl_without_layer"])  # the least important went


def test_ppl_budget_bounds_the_removal(three_layers, tmp_path):
    art = onnxlm.optimize(str(three_layers), recipe="fp32-plain", output=tmp_path / "b", max_ppl_increase=1.0)
    check = report(art)["check"]
    base = check["probe_ppl"]
    assert all(p <= base * 1.01 for p in check.get("ppl_as_removed", []))
    assert art.info.num_layers == 3 - len(check["removed_layers"])
    list(art.generate_ids([5, 6, 7], 4))


def test_options_are_checked(three_layers, tmp_path):
    with pytest.raises(OnnxlmError, match="one of n"):
        make_pass({"pass": "remove_layers", "n": 1, "max_ppl_increase": 5.0})
    with pytest.raises(OnnxlmError, match="metric"):
        make_pass({"pass": "remove_layers", "n": 1, "metric": "cosine"})
    recipe = tmp_path / "late.json"
    recipe.write_text(json.dumps({"name": "late", "passes": [
        {"pass": "cleanup"}, {"pass": "fuse_rms_norm"}, {"pass": "fuse_skip_rms_norm"},
        {"pass": "remove_layers", "n": 1}]}))
    with pytest.raises(OnnxlmError, match="before the lowering passes"):
        onnxlm.optimize(str(three_layers), recipe=str(recipe), output=tmp_path / "c")
    with pytest.raises(OnnxlmError, match="cannot remove 3 of 3"):
        onnxlm.optimize(str(three_layers), recipe="fp32", output=tmp_path / "d", remove_layers=3)
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()
