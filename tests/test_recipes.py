"""Recipes are data: they load, print and round-trip; options are typed."""

import dataclasses

import pytest

from onnxlm.errors import OnnxlmError
from onnxlm.passes.base import parse_options
from onnxlm.passes.recipe import Recipe, builtin_recipes, load_recipe


def test_builtin_recipes_load_and_round_trip():
    assert "fp32" in builtin_recipes()
    for name in builtin_recipes():
        recipe = load_recipe(name)
        again = Recipe.from_dict(recipe.to_dict(), name)
        assert again.to_dict() == recipe.to_dict()


def test_pipeline_prints_passes_in_order():
    assert load_recipe("fp32-plain").pipeline() == "cleanup() -> logits_to_keep()"
    assert load_recipe("fp32").pipeline().startswith("cleanup() -> fuse_rms_norm(expect='none') -> ")


def test_recipe_file_by_path(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text('{"passes": [{"pass": "cleanup"}]}')
    recipe = load_recipe(str(path))
    assert recipe.name == "mine" and [p.name for p in recipe.passes] == ["cleanup"]


@dataclasses.dataclass
class _Opts:
    bits: int = 4
    ratio: float = 0.5
    symmetric: bool = True


def test_options_are_typed():
    assert parse_options("q", _Opts, {"bits": 8, "ratio": 1}).ratio == 1
    with pytest.raises(OnnxlmError, match="option 'bits' must be int"):
        parse_options("q", _Opts, {"bits": "8"})
    with pytest.raises(OnnxlmError, match="option 'bits' must be int"):
        parse_options("q", _Opts, {"bits": True})
    with pytest.raises(OnnxlmError, match="option 'symmetric' must be bool"):
        parse_options("q", _Opts, {"symmetric": 1})
    with pytest.raises(OnnxlmError, match="has no option 'block'"):
        parse_options("q", _Opts, {"block": 32})
