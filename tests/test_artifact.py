"""Artifacts are written atomically, and a lossless pass that changes the logits is caught."""

import json

import pytest

import onnxlm
from onnxlm.passes import registry
from onnxlm.passes.base import Pass


class ScaleLogits(Pass):
    """A deliberately wrong 'lossless' pass: it scales the final logits by 1.01."""

    name = "scale_logits"

    def run(self, model, ctx):
        import onnx_ir as ir

        logits = next(v for v in model.graph.outputs if v.name == "logits")
        producer = logits.producer()
        scale = ir.Value(name="scale_const", const_value=ir.tensor(1.01, dtype=ir.DataType.FLOAT))
        model.graph.initializers.add(scale)
        producer.outputs[0].name = "raw_logits"
        node = ir.node("Mul", [producer.outputs[0], scale])
        model.graph.append(node)
        node.outputs[0].name = "logits"
        node.outputs[0].dtype, node.outputs[0].shape = logits.dtype, logits.shape
        model.graph.outputs[model.graph.outputs.index(logits)] = node.outputs[0]
        return True, {"Mul": 1}, []


@pytest.fixture
def broken_recipe(tmp_path, monkeypatch):
    monkeypatch.setitem(registry.PASSES, ScaleLogits.name, ScaleLogits)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps({"name": "broken", "passes": [{"pass": "cleanup"}, {"pass": "scale_logits"}]}))
    return str(path)


def test_lossless_check_catches_a_wrong_pass_and_nothing_is_written(tiny_hf_dir, tmp_path, broken_recipe):
    out = tmp_path / "out"
    with pytest.raises(onnxlm.OnnxlmError, match="should be lossless but moved the logits"):
        onnxlm.optimize(str(tiny_hf_dir), recipe=broken_recipe, output=out)
    assert list(tmp_path.iterdir()) == [tmp_path / "broken.json"]


def test_failed_run_keeps_the_existing_artifact(tiny_hf_dir, tmp_path, broken_recipe):
    out = tmp_path / "out"
    onnxlm.optimize(str(tiny_hf_dir), recipe="fp32", output=out)
    before = (out / "manifest.json").read_text()
    with pytest.raises(onnxlm.OnnxlmError, match="should be lossless"):
        onnxlm.optimize(str(tiny_hf_dir), recipe=broken_recipe, output=out, overwrite=True)
    assert (out / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.json", "out"]


def test_rewriting_an_artifact_replaces_it(tiny_hf_dir, tmp_path):
    out = tmp_path / "out"
    first = onnxlm.optimize(str(tiny_hf_dir), recipe="fp32", output=out).manifest["created"]
    with pytest.raises(onnxlm.OnnxlmError, match="--overwrite"):
        onnxlm.optimize(str(tiny_hf_dir), recipe="fp32", output=out)
    second = onnxlm.optimize(str(tiny_hf_dir), recipe="fp32", output=out, overwrite=True)
    assert second.manifest["created"] >= first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_same_recipe_same_model_same_graph(tiny_hf_dir, tmp_path):
    a = onnxlm.optimize(str(tiny_hf_dir), recipe="fp32", output=tmp_path / "a")
    b = onnxlm.optimize(str(tiny_hf_dir), recipe="fp32", output=tmp_path / "b")
    for name in ("model.onnx", "model.onnx.data", "tokenizer.json", "recipe.json"):
        assert (a.directory / name).read_bytes() == (b.directory / name).read_bytes(), name
    volatile = ("created", "passes")  # the creation time and the pass timings
    assert {k: v for k, v in a.manifest.items() if k not in volatile} == {
        k: v for k, v in b.manifest.items() if k not in volatile
    }
