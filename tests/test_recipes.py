"""Recipes are data: they load, print and round-trip, and are checked for the graph forms every pass requires;
options are typed."""

import dataclasses
import json

import pytest

from onnxlm.api import with_layer_removal, with_pass
from onnxlm.errors import OnnxlmError
from onnxlm.passes.base import GRAPH_FORMS, parse_options
from onnxlm.passes.larosa.recipe import with_sparsity
from onnxlm.passes.recipe import Recipe, builtin_recipes, load_recipe
from onnxlm.passes.registry import PASSES, make_pass


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


def one_line_error(call, *words):
    with pytest.raises(OnnxlmError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and all(w in message for w in words), message


@pytest.mark.parametrize("recipe, words", [
    ({"passes": [{"pass": "cleanup"}, {"pass": "fuse_rms_norm"}, {"pass": "fuse_skip_rms_norm"},
                 {"pass": "remove_layers", "n": 1}]},
     ["recipe 'bad': pass 'remove_layers' at step 4 needs the plain export's residual Adds",
      "'fuse_skip_rms_norm' at step 3 ended that"]),
    ({"passes": [{"pass": "cleanup"}, {"pass": "quant_weight_only"}, {"pass": "rotate_residual"}]},
     ["pass 'rotate_residual' at step 3 needs float weights", "'quant_weight_only' at step 2 ended that"]),
    ({"passes": [{"pass": "cleanup"}, {"pass": "logits_to_keep"}, {"pass": "topk_sparsify"}]},
     ["pass 'topk_sparsify' at step 3 needs the LM head on every position", "'logits_to_keep' at step 2"]),
    ({"passes": [{"pass": "fuse_rms_norm"}]},
     ["pass 'fuse_rms_norm' at step 1 needs a folded graph", "(cleanup does)"]),
    ({"passes": [{"pass": "cleanup"}, {"pass": "quicksilver_halting"}]},
     ["pass 'quicksilver_halting' at step 2 needs the lowered graph", "(fuse_gqa does)"]),
])
def test_an_order_that_breaks_a_requirement_is_refused_at_load(tmp_path, recipe, words):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"name": "bad", **recipe}))
    one_line_error(lambda: load_recipe(str(path)), *words)


def test_every_pass_declares_known_graph_forms():
    for cls in PASSES.values():
        assert set(cls.requires) | set(cls.provides) | set(cls.removes) <= set(GRAPH_FORMS), cls.name


def names(recipe) -> list[str]:
    return [p.name for p in recipe.passes]


def test_inserting_places_passes_where_their_requirements_hold():
    fp32 = load_recipe("fp32")
    remove = make_pass({"pass": "remove_layers", "n": 1})
    assert names(fp32.inserting([remove]))[:3] == ["cleanup", "remove_layers", "fuse_rms_norm"]
    assert names(fp32.inserting([remove], where="latest"))[:4] == ["cleanup", "fuse_rms_norm", "remove_layers",
                                                                   "fuse_skip_rms_norm"]
    one_line_error(lambda: with_pass(load_recipe("fp32-plain"), {"pass": "expose_attention"}),
                   "recipe 'fp32-plain' has no place for expose_attention", "needs the lowered graph")
    bare = Recipe("bare", "", [make_pass({"pass": "logits_to_keep"})])
    one_line_error(lambda: with_layer_removal(bare, 1, None), "no place for remove_layers", "needs a folded graph")


def test_the_rewriters_keep_the_orders_they_had_by_name():
    """--remove-layers after the first cleanup, --sparsity before the first quant_*, share_tied_embedding or
    logits_to_keep, --kv-scores at the end: the orders of the name-based rewriters they replace."""
    for name in builtin_recipes():
        recipe = load_recipe(name)
        before = names(recipe)
        at = next((i + 1 for i, n in enumerate(before) if n == "cleanup"), 0)
        assert names(with_layer_removal(recipe, 1, None)) == [*before[:at], "remove_layers", *before[at:]]
        if "topk_sparsify" not in before:
            at = next((i for i, n in enumerate(before)
                       if n.startswith(("quant_", "share_tied_embedding", "logits_to_keep"))), len(before))
            added = ["rotate_residual"] * ("rotate_residual" not in before) + ["topk_sparsify"]
            assert names(with_sparsity(recipe, 0.3)) == [*before[:at], *added, *before[at:]]
        if "fuse_gqa" in before:
            assert names(with_pass(recipe, {"pass": "expose_attention"})) == [*before, "expose_attention"]
