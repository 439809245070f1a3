"""Graph capabilities as data: a pass declares the inputs it adds, and the probe, the runtime, genai_config and
`onnxlm inspect` pick them up from the manifest without knowing the pass."""

import json

import numpy as np
import pytest
from cli_helpers import run_cli

import onnxlm
from onnxlm.interface import Port
from onnxlm.passes.base import Pass
from onnxlm.passes.constants import add_overridable_input
from onnxlm.passes.recipe import load_recipe
from onnxlm.passes.registry import PASSES
from onnxlm.runtime.decoding import Decoding


class ScaleLogits(Pass):
    """A toy pass: logits x an input `toy_scale` (float scalar), optional with the default 1 or required."""

    name = "toy_scale_logits"
    required = False

    def ports(self, info):
        return [Port("toy_scale", "input", "float32", (), feature="toy", role="scale", default=1.0,
                     optional=not self.required, meaning="multiplies the logits")]

    def run(self, model, ctx):
        import onnx_ir as ir

        graph = model.graph
        if self.required:
            scale = ir.Value(name="toy_scale", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([]))
            graph.inputs.append(scale)
        else:
            scale = add_overridable_input(graph, "toy_scale", np.array(1.0, np.float32))
        logits = graph.outputs[0]
        mul = ir.node("Mul", [logits, scale], name="toy_scale.mul")
        graph.append(mul)
        out = mul.outputs[0]
        logits.name, out.name = "toy_scale.unscaled", "logits"
        out.dtype, out.shape = logits.dtype, logits.shape
        graph.outputs[0] = out
        return True, {"scaled": 1}, []


class RequireScale(ScaleLogits):
    name = "toy_require_scale"
    required = True


@pytest.fixture(scope="module")
def toy_artifacts(tiny_hf_dir, tmp_path_factory):
    """The fp32 recipe plus the toy pass, optional and required, built through the ordinary pipeline."""
    out = tmp_path_factory.mktemp("toy")
    built = {}
    with pytest.MonkeyPatch.context() as patch:
        for cls in (ScaleLogits, RequireScale):
            patch.setitem(PASSES, cls.name, cls)
            recipe = out / f"{cls.name}.json"
            passes = [p.to_dict() for p in load_recipe("fp32").passes]
            recipe.write_text(json.dumps({"name": cls.name, "passes": [*passes, {"pass": cls.name}]}))
            built[cls.required] = onnxlm.optimize(str(tiny_hf_dir), recipe=str(recipe), output=out / cls.name)
    return built


def test_the_manifest_records_the_declared_input(toy_artifacts):
    ports = toy_artifacts[False].manifest["interface"]["ports"]
    toy = next(p for p in ports if p["name"] == "toy_scale")
    assert toy["optional"] and toy["default"] == 1.0 and toy["feature"] == "toy"
    assert toy_artifacts[True].manifest["interface"]["ports"][-1]["optional"] is False


def test_the_runtime_feeds_an_added_input(toy_artifacts):
    session = toy_artifacts[False].session
    assert "toy" in session.interface.features
    ids = np.asarray([[5, 6, 7]], np.int64)
    plain = session.step(ids, session.new_cache(capacity=8))
    doubled = session.step(ids, session.new_cache(capacity=8), inputs={"toy_scale": np.array(2.0, np.float32)})
    np.testing.assert_allclose(doubled, 2 * plain, rtol=1e-6)


def test_the_probe_feeds_a_required_input_its_default(toy_artifacts):
    report = next(r for r in toy_artifacts[True].manifest["passes"] if r["name"] == "toy_require_scale")
    assert report["check"]["max_abs_logit_diff"] == 0.0  # the probe ran it with toy_scale = 1


def test_genai_config_follows_the_interface(toy_artifacts):
    og = pytest.importorskip("onnxruntime_genai")
    optional, required = toy_artifacts[False], toy_artifacts[True]
    assert optional.manifest["genai"] == {"deployable": True}
    model = og.Model(str(optional.directory))  # genai leaves toy_scale out; ORT uses its default
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=8, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens([5, 6, 7])
    generator.generate_next_token()
    ours = next(optional.generate_ids([5, 6, 7], max_new_tokens=1, decoding=Decoding()))
    assert int(generator.get_sequence(0)[-1]) == ours
    assert not required.manifest["genai"]["deployable"] and "toy_scale" in required.manifest["genai"]["reason"]
    assert not (required.directory / "genai_config.json").exists()


def test_inspect_lists_the_added_input(toy_artifacts, capsys):
    code, out, _ = run_cli(capsys, "inspect", toy_artifacts[True].directory)
    assert code == 0
    assert "input toy_scale float32[], required: multiplies the logits" in out
    assert "not deployable" in out and "target: cpu" in out
