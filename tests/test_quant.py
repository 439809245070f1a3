"""Quantization recipes end to end on the tiny model, and the GGUF-exact import's column matching."""

from __future__ import annotations

import json

import numpy as np
import pytest

import onnxlm
from onnxlm.errors import OnnxlmError
from onnxlm.frontend.gguf_blocks import decode_blocks
from onnxlm.passes.base import PassContext
from onnxlm.passes.quant.gguf_exact import GgufExact


def quant_report(art) -> dict:
    return next(r for r in art.manifest["passes"] if r["name"].startswith("quant_") and r["modified"])


@pytest.mark.parametrize("recipe, op", [
    ("int8", "com.microsoft::MatMulNBits"),
    ("int4-rtn", "com.microsoft::MatMulNBits"),
    ("int8-dynamic", "MatMulInteger"),
    ("nested", "com.microsoft::MatMulNBits"),
    ("int4-calibrated", "com.microsoft::MatMulNBits"),
])
def test_quant_recipes_report_their_cost_and_still_generate(tiny_artifacts, recipe, op):
    art, fp32 = tiny_artifacts(recipe), tiny_artifacts("fp32")
    report = quant_report(art)
    check = report["check"]
    assert check["ppl_before"] > 1 and check["ppl_after"] > 1 and check["ppl_tokens"] > 500
    assert 0 < check["weight_rel_error"] < 0.5
    assert check["bytes_after"] < check["bytes_before"]
    assert art.manifest["op_histogram"].get(op, 0) >= 2 * art.info.num_layers
    assert art.manifest["op_histogram"].get("com.microsoft::GroupQueryAttention", 0) == 2  # composes with lowering
    assert sum(art.manifest["files"].values()) < sum(fp32.manifest["files"].values())
    shared = recipe in ("int8", "int4-rtn", "nested")  # symmetric heads: the embedding reads their blocks
    assert art.manifest["op_histogram"].get("com.microsoft::GatherBlockQuantized", 0) == int(shared)
    assert ("Gather" in art.manifest["op_histogram"]) == (not shared)
    assert len(list(art.generate_ids(art.prompt_ids("hello"), max_new_tokens=8, ignore_eos=True))) == 8


def test_int8_is_closer_to_fp32_than_int4(tiny_artifacts):
    errors = {r: quant_report(tiny_artifacts(r))["check"]["weight_rel_error"] for r in ("int8", "int4-rtn")}
    assert errors["int8"] < errors["int4-rtn"] / 4


def test_int4_on_a_non_gguf_source_says_so_and_falls_back_to_rtn(tiny_artifacts):
    passes = {r["name"]: r for r in tiny_artifacts("int4").manifest["passes"]}
    assert not passes["quant_gguf_exact"]["modified"]
    assert any("no GGUF block tensors" in n for n in passes["quant_gguf_exact"]["notes"])
    assert passes["quant_weight_only"]["matched"]["matmul_nbits"] >= 8


def test_nested_budget_sets_the_average_bits(tiny_hf_dir, tmp_path):
    import onnxlm

    art = onnxlm.optimize(str(tiny_hf_dir), recipe="nested", output=tmp_path / "n",
                          overrides={"quant_nested": {"budget_bits": 3.0}})
    check = quant_report(art)["check"]
    assert check["average_bits"] <= 3.0 and set(check["layer_bits"]) <= {2, 4, 8}
    assert set(check["layer_nll_increase"]["0"]) == {"8", "4", "2"}


def test_block_size_option_sets_every_matmul_nbits_block_even_past_hidden(tiny_hf_dir, tmp_path, capsys):
    """`optimize --block-size 128` on hidden 64: MatMulNBits pads K to one block, the shared embedding slices the
    padding off, and the artifact decodes like the block-32 one to within int4 error."""
    import onnx

    import onnxlm
    from cli_helpers import run_cli

    code, _, err = run_cli(capsys, "optimize", tiny_hf_dir, "-o", tmp_path / "b", "--recipe", "int4-rtn",
                           "--block-size", "128")
    assert code == 0, err
    art = onnxlm.load(tmp_path / "b")
    graph = onnx.load(tmp_path / "b" / "model.onnx", load_external_data=False).graph
    blocks = {a.i for n in graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized")
              for a in n.attribute if a.name == "block_size"}
    assert blocks == {128}
    assert art.manifest["op_histogram"]["com.microsoft::GatherBlockQuantized"] == 1
    check = quant_report(art)["check"]
    assert check["ppl_after"] < 2 * check["ppl_before"]
    assert len(list(art.generate_ids(art.prompt_ids("hello"), max_new_tokens=4, ignore_eos=True))) == 4


def test_an_override_for_a_pass_the_recipe_lacks_is_an_error(tiny_hf_dir, tmp_path):
    import onnxlm

    with pytest.raises(OnnxlmError, match="has no pass quant_nested"):
        onnxlm.optimize(str(tiny_hf_dir), recipe="fp32", output=tmp_path / "x",
                        overrides={"quant_nested": {"budget_bits": 3.0}})
    assert not (tmp_path / "x").exists()


def test_gguf_exact_finds_permuted_and_packed_rows_and_reproduces_them(tmp_path):
    """A linear whose columns are rows of two GGUF tensors (Q4_1 and Q4_1, one permuted, as packed q|k after the
    HF conversion) becomes MatMulNBits + offset correction; ORT's output equals x @ W."""
    import gguf
    import onnx_ir as ir
    import onnxruntime as ort

    rng = np.random.default_rng(3)
    tensors = {}
    for name, rows in (("a", 8), ("b", 8)):
        raw = gguf.quants.quantize(rng.standard_normal((rows, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q4_1)
        tensors[name] = decode_blocks(name, "Q4_1", raw, rows, 64)
    perm = rng.permutation(8)
    w = np.concatenate([tensors["a"].dequantize()[perm], tensors["b"].dequantize()]).T  # [64, 16]
    x = ir.Value(name="x", shape=ir.Shape([1, 3, 64]), type=ir.TensorType(ir.DataType.FLOAT))
    weight = ir.Value(name="w", shape=ir.Shape(w.shape), type=ir.TensorType(ir.DataType.FLOAT),
                      const_value=ir.tensor(np.ascontiguousarray(w)))
    node = ir.node("MatMul", [x, weight], name="proj")
    node.outputs[0].name = "y"
    graph = ir.Graph([x], [node.outputs[0]], nodes=[node], initializers=[weight],
                     opset_imports={"": 20, "com.microsoft": 1})
    model = ir.Model(graph, ir_version=10)
    ctx = PassContext(info=None, source={}, scratch=tmp_path, quantized_tensors=lambda: tensors)
    modified, matched, notes = GgufExact().run(model, ctx)
    assert modified and matched == {"matmul_nbits_q4_1": 1} and not notes
    assert ctx.metrics["weights_bit_identical"]
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    xs = rng.standard_normal((1, 3, 64)).astype(np.float32)
    np.testing.assert_allclose(session.run(["y"], {"x": xs})[0], xs @ w, rtol=1e-5, atol=1e-5)


def test_gguf_exact_leaves_a_weight_it_cannot_match_in_float(tmp_path):
    import onnx_ir as ir

    x = ir.Value(name="x", shape=ir.Shape([1, 1, 64]), type=ir.TensorType(ir.DataType.FLOAT))
    w = np.random.default_rng(4).standard_normal((64, 16)).astype(np.float32)
    weight = ir.Value(name="w", shape=ir.Shape(w.shape), type=ir.TensorType(ir.DataType.FLOAT),
                      const_value=ir.tensor(w))
    node = ir.node("MatMul", [x, weight], name="proj")
    graph = ir.Graph([x], [node.outputs[0]], nodes=[node], initializers=[weight], opset_imports={"": 20})
    ctx = PassContext(info=None, source={}, scratch=tmp_path, quantized_tensors=lambda: {})
    modified, _, notes = GgufExact().run(ir.Model(graph, ir_version=10), ctx)
    assert not modified and "no GGUF block tensors" in notes[0]


def test_int4_on_a_gguf_measures_its_accuracy_level_and_records_the_choice(tiny_q4_gguf, tmp_path, capsys):
    """The `int4` recipe on a Q4_1/Q8_0 GGUF: every linear imported exactly, the 4-bit blocks' accuracy level
    chosen by measuring both on this machine (int8 activations only within +0.5% calibration PPL), recorded; --exact
    forces float activations."""
    art = onnxlm.optimize(str(tiny_q4_gguf), recipe="int4", output=tmp_path / "auto")
    report = next(r for r in art.manifest["passes"] if r["name"] == "quant_gguf_exact")
    assert report["matched"] == {"matmul_nbits_q4_1": 8, "matmul_nbits_q8_0": 1}  # qkv, o, gate_up, down x 2; head
    assert report["check"]["offsets_centred"] == 8
    choice = report["check"]["accuracy_choice"]
    ppl, ms = choice["calibration_ppl"], choice["decode_step_ms"]
    assert set(ppl) == set(ms) == {"0", "4"} and all(v > 0 for v in [*ppl.values(), *ms.values()])
    faster = ms["4"] < ms["0"] * (1 - choice["min_gain"]) and ppl["4"] <= ppl["0"] * 1.005
    assert choice["chosen"] == (4 if faster else 0)
    import onnx

    graph = onnx.load(str(art.directory / "model.onnx"), load_external_data=False).graph
    levels = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute
              if a.name == "accuracy_level" and any(b.name == "bits" and b.i == 4 for b in n.attribute)}
    assert levels == {choice["chosen"]}

    from cli_helpers import run_cli

    code, _, err = run_cli(capsys, "optimize", tiny_q4_gguf, "-o", tmp_path / "exact", "--recipe", "int4", "--exact")
    assert code == 0, err
    exact = onnxlm.load(tmp_path / "exact")
    for bad, words in ((["--recipe", "int4", "--exact", "--accuracy-level", "4"], "disagree"),
                       (["--recipe", "fp32", "--accuracy-level", "4"], "no pass quant_gguf_exact")):
        code, _, err = run_cli(capsys, "optimize", tiny_q4_gguf, "-o", tmp_path / "bad", *bad)
        assert code == 2 and words in err and not (tmp_path / "bad").exists()
    exact_report = next(r for r in exact.manifest["passes"] if r["name"] == "quant_gguf_exact")
    assert "accuracy_choice" not in exact_report["check"]
    fp32 = onnxlm.optimize(str(tiny_q4_gguf), recipe="fp32", output=tmp_path / "fp32")
    text = "The quick brown fox jumps over the lazy dog. " * 20
    assert exact.perplexity(text=text)["ppl"] == pytest.approx(fp32.perplexity(text=text)["ppl"], rel=1e-4)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"])
def test_every_block_format_dequantizes_as_gguf_py_does_bit_for_bit(qtype):
    """frontend/gguf_blocks.py's codes, scales and offsets give gguf-py's own dequantized floats (what
    transformers loads and the exported graph holds) for random blocks of every supported format."""
    import gguf
    from conftest import random_blocks

    raw = random_blocks(qtype, 6, 512, np.random.default_rng(5))
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])
    t = decode_blocks("w", qtype, raw, 6, 512)
    assert t.codes.max() < t.levels and t.scales.shape == (6, 512 // t.block)
    assert np.array_equal(t.dequantize().view(np.uint32), expected.view(np.uint32))


def test_a_k_quant_mix_is_imported_exactly_run_by_run(tiny_kquant_gguf, tmp_path):
    """A Q4_K_M-like file (Q4_K q/k beside Q6_K v in one packed QKV, Q5_K, Q5_0, Q5_1, Q4_0, a Q6_K embedding and
    head): every linear becomes MatMulNBits (a Concat joins the runs of a mixed packed linear) whose weight is the
    GGUF's bit for bit; with float activations (both levels 0) the artifact scores like the fp32 export of the
    same file."""
    exact = onnxlm.optimize(str(tiny_kquant_gguf), recipe="int4", output=tmp_path / "exact",
                            overrides={"quant_gguf_exact": {"accuracy_level": 0, "head_accuracy_level": 0}})
    report = next(r for r in exact.manifest["passes"] if r["name"] == "quant_gguf_exact")
    assert report["check"]["weights_bit_identical"] and not report["notes"]
    assert set(report["check"]["gguf_types"]) == {"Q4_0", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K"}
    assert report["matched"]["matmul_nbits_q6_k"] == 5  # v in both QKVs, both downs, the head
    import onnx

    graph = onnx.load(str(exact.directory / "model.onnx"), load_external_data=False).graph
    assert sum(n.op_type == "Concat" and n.name.endswith(".concat") for n in graph.node) >= 3  # qkv x 2, gate|up
    fp32 = onnxlm.optimize(str(tiny_kquant_gguf), recipe="fp32", output=tmp_path / "fp32")
    text = "The quick brown fox jumps over the lazy dog. " * 20
    assert exact.perplexity(text=text)["ppl"] == pytest.approx(fp32.perplexity(text=text)["ppl"], rel=1e-4)


def test_gptq_on_the_portable_graph_imports_the_contrib_domain(tiny_hf_dir, tmp_path):
    """ORT's GPTQ path writes com.microsoft.MatMulNBits without importing that domain; on a plain graph (which has
    no contrib op before) the pass adds the import, so the graph passes its check and runs."""
    recipe = tmp_path / "gptq-plain.json"
    recipe.write_text(json.dumps({"name": "gptq-plain", "passes": [
        {"pass": "cleanup"}, {"pass": "quant_weight_only", "method": "gptq", "block_size": 32, "lm_head": False}]}))
    art = onnxlm.optimize(str(tiny_hf_dir), recipe=str(recipe), output=tmp_path / "out")
    assert art.manifest["passes"][1]["matched"]["matmul_nbits"] > 0
    assert len(list(art.generate_ids([5, 6, 7], 8, ignore_eos=True))) == 8


class _SetAccuracyLevel:
    """A pass (duck-typed for run_pipeline) setting every MatMulNBits' accuracy_level; `lossless` as given."""

    def __init__(self, level: int, lossless: bool = True):
        self.name, self.level, self.lossless, self.atol, self.rtol = f"accuracy_level_{level}", level, lossless, \
            1e-4, 1e-5

    def run(self, model, ctx):
        import onnx_ir as ir

        for node in model.graph:
            if node.op_type == "MatMulNBits":
                node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", self.level)
        return True, {}, []

    def ports(self, info):
        return []

    def features(self):
        return []

    def to_dict(self):
        return {"pass": self.name}


def test_a_lossless_check_on_int8_activations_is_repeated_on_float_ones(tiny_artifacts, tmp_path):
    """int8 activations round per block, so a change in the last bit upstream can move the logits by a rounding
    step: a lossless pass that misses the bound on such a graph is checked again with float activations on both
    sides (both numbers reported). Here the pass turns the int8 activations off, which moves the graph's own
    logits by the int8 error but leaves the weights' product exact; a pass that changes a weight still fails."""
    import onnx_ir as ir

    from onnxlm.passes.manager import run_pipeline
    from onnxlm.passes.recipe import Recipe

    art = tiny_artifacts("int4-rtn")
    ctx = PassContext(info=art.info, source={}, scratch=tmp_path)

    def graph():
        model = ir.load(art.directory / "model.onnx")
        ir.external_data.load_to_model(model)
        assert any(n.op_type == "MatMulNBits" and n.attributes.get_int("accuracy_level", 0) == 4 for n in model.graph)
        return model

    [report] = run_pipeline(graph(), Recipe("t", "", [_SetAccuracyLevel(0)]), ctx)
    check = report.check
    assert check["int8_activation_diff"] > check["tolerance"] >= check["max_abs_logit_diff"]

    class Nudge(_SetAccuracyLevel):
        def run(self, model, ctx):
            from onnxlm.passes.constants import add_initializer

            node = next(n for n in model.graph if n.op_type == "MatMulNBits")
            node.replace_input_with(2, add_initializer(model.graph, "nudged", node.inputs[2].const_value.numpy() * 1.1))
            return True, {}, []

    with pytest.raises(OnnxlmError, match="should be lossless but moved the logits"):
        run_pipeline(graph(), Recipe("t", "", [Nudge(4)]), ctx)
