"""Recipes are data: they load, print and round-trip, extend a built-in, and are checked for the graph forms
every pass requires; options are typed."""

import dataclasses
import json

import pytest

from onnxlm.api import with_layer_removal, with_pass
from onnxlm.errors import OnnxlmError
from onnxlm.passes.base import GRAPH_FORMS, parse_options
from onnxlm.passes.larosa.recipe import with_sparsity
from onnxlm.passes.recipe import BUILTIN_DIR, Recipe, builtin_recipes, load_recipe
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


# Each built-in recipe's passes as they were written out in full before `extends` (commit 506e429).
LOWERING = [
    {"pass": "cleanup"}, {"pass": "fuse_rms_norm", "expect": "none"},
    {"pass": "fuse_skip_rms_norm", "expect": "layers"}, {"pass": "fuse_rotary", "expect": "layers"},
    {"pass": "fuse_gqa", "expect": "layers"}, {"pass": "pack_qkv"}, {"pass": "pack_gate_up"}, {"pass": "cleanup"},
]
KEEP = {"pass": "logits_to_keep"}
ROTATE = {"pass": "rotate_residual", "calibration_tokens": 2048, "damping": 0.01}
RTN4 = {"pass": "quant_weight_only", "bits": 4, "block_size": 32, "symmetric": True, "accuracy_level": 4,
        "method": "rtn"}
SHARE = {"pass": "share_tied_embedding"}
PASSES_BEFORE_EXTENDS = {
    "early-exit": [*LOWERING, {"pass": "early_exit", "layer": 20}, KEEP],
    "fp32": [*LOWERING, KEEP],
    "fp32-plain": [{"pass": "cleanup"}, KEEP],
    "fp16": [*LOWERING, KEEP, {"pass": "convert_float16"}],
    "int4": [*LOWERING, {"pass": "quant_gguf_exact", "accuracy_level": -1, "head_accuracy_level": 4,
                         "max_ppl_increase": 0.5}, RTN4, SHARE, KEEP],
    "int4-calibrated": [*LOWERING, {"pass": "quant_weight_only", "bits": 4, "block_size": 32, "symmetric": False,
                                    "accuracy_level": 4, "method": "gptq"}, KEEP],
    "int4-fast": [*LOWERING, {"pass": "quant_gguf_exact", "accuracy_level": 4, "head_accuracy_level": 4}, RTN4,
                  SHARE, KEEP],
    "int4-rtn": [*LOWERING, RTN4, SHARE, KEEP],
    "int4-cuda": [*LOWERING, {"pass": "quant_gguf_exact", "accuracy_level": 0, "head_accuracy_level": 0},
                  {"pass": "quant_weight_only", "bits": 4, "block_size": 32, "symmetric": True, "accuracy_level": 0,
                   "method": "rtn"}, KEEP, {"pass": "convert_float16"}],
    "int8": [*LOWERING, {"pass": "quant_weight_only", "bits": 8, "block_size": 32, "symmetric": True,
                         "accuracy_level": 4}, SHARE, KEEP],
    "int8-dynamic": [*LOWERING, {"pass": "quant_dynamic_int8", "per_channel": True, "keep_float": "lm_head"}, KEEP],
    "larosa-rotate": [*LOWERING, ROTATE, KEEP],
    "larosa-s25": [*LOWERING, ROTATE, {"pass": "topk_sparsify", "sparsity": 0.25}, KEEP],
    "larosa-s40": [*LOWERING, ROTATE, {"pass": "topk_sparsify", "sparsity": 0.4}, KEEP],
    "nested": [*LOWERING, {"pass": "quant_nested", "budget_bits": 4.0, "block_size": 32, "accuracy_level": 4,
                           "lm_head_bits": 8}, SHARE, KEEP],
    "quicksilver": [*LOWERING, {"pass": "quicksilver_halting", "min_layer": 4}, KEEP],
}
# Recipes on the portable graph (no lowering to ORT's ops), added after `extends`: they extend nothing.
STATIC = {"pass": "static_kv", "context_length": 2048, "prefill_chunk": 128}
PORTABLE = {
    "static": [{"pass": "cleanup"}, STATIC],
    "static-qdq": [{"pass": "cleanup"}, {"pass": "quant_qdq", "activations": "uint16", "weights": "uint8",
                                         "per_channel": True}, STATIC],
    "static-int4": [{"pass": "cleanup"}, {"pass": "quant_weight_only", "bits": 4, "block_size": 128,
                                          "symmetric": True, "accuracy_level": 0, "format": "qdq",
                                          "lm_head": False}, STATIC],
}


def test_builtin_recipes_extend_the_lowering_and_keep_their_passes():
    assert set(builtin_recipes()) == {*PASSES_BEFORE_EXTENDS, *PORTABLE, "lowered"}
    assert load_recipe("lowered").to_dict()["passes"] == [make_pass(s).to_dict() for s in LOWERING]
    for name, specs in {**PASSES_BEFORE_EXTENDS, **PORTABLE}.items():
        assert load_recipe(name).to_dict()["passes"] == [make_pass(s).to_dict() for s in specs], name
        written = json.loads((BUILTIN_DIR / f"{name}.json").read_text())
        assert written.get("extends") == (None if name == "fp32-plain" or name in PORTABLE else "lowered"), name


def test_a_recipe_file_extends_a_builtin(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"name": "mine", "extends": "int8", "passes": [{"pass": "expose_attention"}]}))
    recipe = load_recipe(str(path))
    assert [p.name for p in recipe.passes] == [p.name for p in load_recipe("int8").passes] + ["expose_attention"]
    # The manifest records the resolved passes, without `extends`: loading that back gives the same recipe.
    assert "extends" not in recipe.to_dict()
    assert Recipe.from_dict(recipe.to_dict(), "again").to_dict() == recipe.to_dict()


def one_line_error(call, *words):
    with pytest.raises(OnnxlmError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_extends_must_name_a_builtin_without_a_cycle(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"extends": "fp64", "passes": []}))
    one_line_error(lambda: load_recipe(str(path)), "extends 'fp64', which is not a built-in recipe", "lowered")
    path.write_text(json.dumps({"extends": "fp32\nx", "passes": []}))
    one_line_error(lambda: load_recipe(str(path)), "extends 'fp32\\nx', which is not a built-in recipe")
    path.write_text(json.dumps({"extends": ["fp32"], "passes": []}))
    one_line_error(lambda: load_recipe(str(path)), "extends")
    builtins = tmp_path / "builtin"
    builtins.mkdir()
    monkeypatch.setattr("onnxlm.passes.recipe.BUILTIN_DIR", builtins)
    (builtins / "a.json").write_text(json.dumps({"extends": "b", "passes": [{"pass": "cleanup"}]}))
    (builtins / "b.json").write_text(json.dumps({"extends": "a", "passes": []}))
    (builtins / "c.json").write_text(json.dumps({"extends": "c", "passes": []}))
    one_line_error(lambda: load_recipe("a"), "cycle: b -> a -> b")
    one_line_error(lambda: load_recipe("c"), "cycle: c -> c")


@pytest.mark.parametrize("recipe, words", [
    ({"passes": [{"pass": "cleanup"}, {"pass": "fuse_rms_norm"}, {"pass": "fuse_skip_rms_norm"},
                 {"pass": "remove_layers", "n": 1}]},
     ["recipe 'bad': pass 'remove_layers' at step 4 needs the plain export's residual Adds",
      "'fuse_skip_rms_norm' at step 3 ended that"]),
    ({"extends": "fp32", "passes": [{"pass": "remove_layers", "n": 1}]},
     ["pass 'remove_layers' at step 10 needs the plain export's residual Adds", "'fuse_skip_rms_norm' at step 3"]),
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
                       if n.startswith(("quant_", "share_tied_embedding", "logits_to_keep", "static_kv"))),
                      len(before))
            added = ["rotate_residual"] * ("rotate_residual" not in before) + ["topk_sparsify"]
            assert names(with_sparsity(recipe, 0.3)) == [*before[:at], *added, *before[at:]]
        if "fuse_gqa" in before:
            assert names(with_pass(recipe, {"pass": "expose_attention"})) == [*before, "expose_attention"]
