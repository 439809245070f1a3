"""A fusion that matches a different number of patterns than the recipe expects is an error, not a slow artifact."""

import json

import pytest

import onnxlm
from onnxlm.errors import OnnxlmError
from onnxlm.passes.registry import make_pass


def test_unexpected_match_count_stops_the_pipeline(tiny_hf_dir, tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"passes": [{"pass": "cleanup"}, {"pass": "fuse_gqa", "expect": "5"}]}))
    with pytest.raises(OnnxlmError, match="pass 'fuse_gqa' matched 0 patterns, expected 5"):
        onnxlm.optimize(str(tiny_hf_dir), recipe=str(recipe), output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_expect_must_be_none_layers_or_a_count():
    assert make_pass({"pass": "fuse_gqa", "expect": "layers"}).options.expect == "layers"
    with pytest.raises(OnnxlmError, match="option 'expect' must be 'none', 'layers' or a count"):
        make_pass({"pass": "fuse_gqa", "expect": "many"})
