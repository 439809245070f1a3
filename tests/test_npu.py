"""NPU-class static artifacts (issue 20): the static_kv pass, the static executor, the OpenVINO backend.

The tiny model's static artifact has C = 192 slots and P = 32-token prefill chunks; it is checked against the
dynamic fp32 (GroupQueryAttention) artifact of the same model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from cli_helpers import run_cli

import onnxlm
from onnxlm.backends import get_backend
from onnxlm.errors import OnnxlmError
from onnxlm.passes.lowering.static import non_static_values
from onnxlm.runtime.decoding import Decoding, executor_for
from onnxlm.runtime.execution import Plain
from onnxlm.runtime.generate import generate_with
from onnxlm.runtime.kv_policy import KVPolicyConfig
from onnxlm.runtime.sampling import Sampler, SamplingConfig
from onnxlm.runtime.static import Static

C, P = 192, 32
HAS_OPENVINO = "OpenVINOExecutionProvider" in ort.get_available_providers()


@pytest.fixture(scope="session")
def static_artifact(tiny_hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("static") / "static"
    return onnxlm.optimize(str(tiny_hf_dir), recipe="static", output=out,
                           overrides={"static_kv": {"context_length": C, "prefill_chunk": P}})


def text_ids(art, n):
    from onnxlm.api import CALIBRATION_TEXT

    return art.tokenizer.encode(CALIBRATION_TEXT.read_text(), add_bos=False)[:n]


def test_the_pair_is_static_and_shares_the_weight_file(static_artifact):
    directory = static_artifact.directory
    manifest = static_artifact.manifest
    assert manifest["static"] == {"context_length": C, "prefill_chunk": P, "prefill": "prefill.onnx",
                                  "decode": "decode.onnx"}
    assert sorted(p.name for p in directory.glob("*.data")) == ["model.onnx.data"]
    info = static_artifact.info
    for name, seq in (("prefill.onnx", P), ("decode.onnx", 1)):
        proto = onnx.load(str(directory / name), load_external_data=False)
        external = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
        assert external == {"model.onnx.data"}
        assert not {n.op_type for n in proto.graph.node} & {"If", "Loop", "Scan", "IsNaN"}  # no NaN guards: below
        dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in [*proto.graph.input, *proto.graph.output]}
        assert dims["input_ids"] == [1, seq] and dims["attention_mask"] == [1, C + seq]
        assert dims["past_key_values.0.key"] == [1, info.num_kv_heads, C, info.head_dim]
        assert dims["present.0.key"] == [1, info.num_kv_heads, seq, info.head_dim]
        assert dims["logits"] == [1, seq, info.vocab_size]
        assert non_static_values(directory / name) == []
    check = manifest["passes"][-1]["check"]
    assert check["static_max_abs_logit_diff"] <= check["static_tolerance"]
    # The dynamic graph keeps the export's guard for a fully masked attention row (one per layer); the pair drops it
    dynamic = onnx.load(str(directory / "model.onnx"), load_external_data=False)
    assert sum(n.op_type == "IsNaN" for n in dynamic.graph.node) == info.num_layers


def test_static_logits_equal_the_dynamic_fp32_artifact(static_artifact, tiny_artifact):
    """2.5 chunks of prefill (the last one padded), then decode steps, against the GQA artifact (1e-4 scale-aware)."""
    ids = text_ids(static_artifact, P * 5 // 2 + 8)
    prompt, rest = ids[: P * 5 // 2], ids[P * 5 // 2 :]
    rows = {}
    for name, executor in (("static", executor_for(static_artifact.session)),
                           ("dynamic", Plain(tiny_artifact.session))):
        executor.begin(len(ids))
        logits = [executor.prefill(prompt, all_logits=True)]
        logits += [executor.decode(t)[None].copy() for t in rest]
        rows[name] = np.concatenate(logits)
    assert isinstance(executor_for(static_artifact.session), Static)
    reference = rows["dynamic"]
    assert np.abs(rows["static"] - reference).max() <= 1e-4 + 1e-5 * np.abs(reference).max()


@pytest.mark.parametrize("decoding", [Decoding(), Decoding("sample", SamplingConfig(temperature=1.0, top_k=0,
                                                                                   top_p=1.0, seed=3))],
                         ids=["greedy", "sampled"])
def test_generation_equals_the_dynamic_artifact(static_artifact, tiny_artifact, decoding):
    prompt = text_ids(static_artifact, 40)  # two chunks, the second padded
    got = list(static_artifact.generate_ids(prompt, 64, ignore_eos=True, decoding=decoding))
    want = list(tiny_artifact.generate_ids(prompt, 64, ignore_eos=True, decoding=decoding))
    assert len(got) == 64 and got == want


def test_perplexity_and_bench_run_on_the_static_pair(static_artifact, tiny_artifact):
    from onnxlm.api import CALIBRATION_TEXT

    text = CALIBRATION_TEXT.read_text()
    static = static_artifact.perplexity(text=text, window=C, max_tokens=400)
    dynamic = tiny_artifact.perplexity(text=text, window=C, max_tokens=400)
    assert static["ppl"] == pytest.approx(dynamic["ppl"], rel=1e-5) and static["static_slots"] == C
    result = static_artifact.bench(runs=1)
    assert result["decode_tok_s"] > 0 and result["prefill_tokens"] == C and "prefill512_s" not in result


def test_a_full_cache_is_one_line_or_slides_with_sinks_window(static_artifact, tiny_artifact):
    prompt = text_ids(static_artifact, 40)
    with pytest.raises(OnnxlmError, match=f"exceed the static KV cache's {C} slots.*sinks-window"):
        list(static_artifact.generate_ids(prompt, C, ignore_eos=True, decoding=Decoding()))
    with pytest.raises(OnnxlmError, match="exceeds the static cache's"):
        executor_for(static_artifact.session, KVPolicyConfig("sinks-window", budget=C + 1))
    with pytest.raises(OnnxlmError, match="full cache or --kv-policy sinks-window, not h2o"):
        executor_for(static_artifact.session, KVPolicyConfig("h2o", budget=64))
    policy = KVPolicyConfig("sinks-window", budget=64)
    got = list(static_artifact.generate_ids(prompt, 2 * C, ignore_eos=True, decoding=Decoding(kv_policy=policy)))
    want = list(tiny_artifact.generate_ids(prompt, 2 * C, ignore_eos=True, decoding=Decoding(kv_policy=policy)))
    assert len(got) == 2 * C and got == want  # past C, the same tokens as the GQA artifact under the policy


def test_control_flow_is_refused_in_one_line_and_nothing_is_written(tiny_hf_dir, tmp_path):
    recipe = tmp_path / "sparse.json"
    recipe.write_text(json.dumps({"name": "sparse", "passes": [
        {"pass": "cleanup"}, {"pass": "topk_sparsify", "sparsity": 0.25},
        {"pass": "static_kv", "context_length": 64, "prefill_chunk": 8}]}))
    with pytest.raises(OnnxlmError, match="dynamic control flow \\(If"):
        onnxlm.optimize(str(tiny_hf_dir), recipe=str(recipe), output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--recipe", "fp32", "--ep", "openvino"], "pass 'static_kv' at step 10 cannot take the lowered graph "
                                                "(GroupQueryAttention), which 'fuse_gqa' at step 5 made"),
    (["--recipe", "fp32", "--context-length", "64"], "recipe 'fp32' has no pass static_kv"),
    (["--recipe", "static", "--context-length", "5000"], "context_length 5000 exceeds the model's context length"),
    (["--recipe", "static", "--context-length", "16", "--prefill-chunk", "32"], "prefill_chunk in 1..context_length"),
    (["--recipe", "static", "--ep", "openvino:XPU"], "unknown OpenVINO device 'XPU'"),
    (["--recipe", "static", "--sparsity", "0.25", "--context-length", "64",
      "--prefill-chunk", "8"], "static_kv: the graph has dynamic control flow (If"),
])
def test_bad_static_options_are_one_line(tiny_hf_dir, tmp_path, capsys, args, message):
    code, _, err = run_cli(capsys, "optimize", str(tiny_hf_dir), "-o", tmp_path / "out", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_the_openvino_backend_lowers_to_the_static_pair(tiny_hf_dir, tmp_path, capsys):
    backend = get_backend("openvino")
    assert backend.lowering == ({"pass": "static_kv"},) and backend.provider_options[0] == {"device_type": "CPU"}
    assert get_backend("openvino:NPU").provider_options[0] == {"device_type": "NPU"}
    code, _, err = run_cli(capsys, "optimize", str(tiny_hf_dir), "-o", tmp_path / "ov", "--recipe", "static",
                           "--ep", "openvino", "--context-length", "64", "--prefill-chunk", "16")
    assert code == 0, err
    manifest = json.loads((tmp_path / "ov" / "manifest.json").read_text())
    assert [p["pass"] for p in manifest["recipe"]["passes"]] == ["cleanup", "static_kv"]  # not appended twice
    assert manifest["target"]["ep"] == "openvino" and manifest["static"]["context_length"] == 64
    code, out, err = run_cli(capsys, "generate", tmp_path / "ov", "--prompt", "fox", "--max-new-tokens", "4",
                             "--greedy", "--ep", "cpu")
    assert code == 0, err
    if not HAS_OPENVINO:
        code, _, err = run_cli(capsys, "generate", tmp_path / "ov", "--prompt", "fox", "--max-new-tokens", "4")
        assert code == 2 and "no OpenVINOExecutionProvider" in err and "onnxruntime-openvino" in err


def test_cli_eval_and_bench_on_a_static_artifact(static_artifact, capsys, tmp_path):
    from onnxlm.api import CALIBRATION_TEXT

    code, out, err = run_cli(capsys, "eval", static_artifact.directory, "--text", CALIBRATION_TEXT,
                             "--window", str(C), "--max-tokens", "300", "--json")
    assert code == 0 and json.loads(out)["static_slots"] == C, err
    code, out, err = run_cli(capsys, "bench", static_artifact.directory, "--runs", "1", "--json")
    assert code == 0 and json.loads(out)["prefill_tokens"] == C, err
    code, out, err = run_cli(capsys, "eval", static_artifact.directory, "--text", CALIBRATION_TEXT,
                             "--window", str(C + 8))
    assert code == 2 and f"static KV cache's {C} slots" in err and len(err.strip().splitlines()) == 1


@pytest.fixture(scope="session")
def qdq_artifacts(tiny_hf_dir, tmp_path_factory):
    """The QNN-style (uint16 activations, uint8 per-channel weights) and the int4 QDQ static artifacts (blocks of
    32; and per channel, ORT's Intel NPU form)."""
    out = tmp_path_factory.mktemp("qdq")
    shape = {"context_length": C, "prefill_chunk": P}
    builds = {"static-qdq": ("static-qdq", {}),
              "static-int4": ("static-int4", {"quant_weight_only": {"block_size": 32}}),
              "static-int4-per-channel": ("static-int4", {"quant_weight_only": {"per_channel": True}})}
    return {name: onnxlm.optimize(str(tiny_hf_dir), recipe=recipe, output=out / name,
                                  overrides={"static_kv": shape, **extra})
            for name, (recipe, extra) in builds.items()}


def quantized_types(path):
    """op -> {input's element type}: for QuantizeLinear its zero point (the activations' type), for
    DequantizeLinear of a constant its codes (the weights' type); and the DequantizeLinear attributes."""
    proto = onnx.load(str(path), load_external_data=False)
    types = {t.name: t.data_type for t in proto.graph.initializer}
    found = {"activations": set(), "weights": set(), "attributes": set()}
    for node in proto.graph.node:
        if node.op_type == "QuantizeLinear":
            found["activations"].add(types.get(node.input[2]))
        if node.op_type == "DequantizeLinear" and node.input[0] in types:
            found["weights"].add(types[node.input[0]])
            found["attributes"] |= {(a.name, a.i) for a in node.attribute}
    return found


def head_weight_producer(path) -> str:
    """The op that makes the LM head's weight (the MatMul writing `logits`)."""
    proto = onnx.load(str(path), load_external_data=False)
    producers = {o: n for n in proto.graph.node for o in n.output}
    head = producers["logits"]
    while head.op_type != "MatMul":
        head = producers[head.input[0]]
    return producers[head.input[1]].op_type


def test_a_partial_int4_block_is_refused_before_the_export():
    from onnxlm.model_info import ModelInfo
    from onnxlm.passes.registry import make_pass

    smollm2 = ModelInfo("llama", 30, 9, 3, 64, 576, 49152, 8192, 1e5, 1, [2], intermediate_size=1536)
    blocked = make_pass({"pass": "quant_weight_only", "block_size": 128, "format": "qdq"})
    with pytest.raises(OnnxlmError, match="block_size 128 does not divide the linears' input width 576.*OpenVINO "
                                          "refuses a partial DequantizeLinear block: use --block-size 64"):
        blocked.check_fits(smollm2)
    for fits in ({"block_size": 64, "format": "qdq"}, {"block_size": 128, "format": "qdq", "per_channel": True},
                 {"block_size": 128}):  # MatMulNBits pads a partial block itself
        make_pass({"pass": "quant_weight_only", **fits}).check_fits(smollm2)
    with pytest.raises(OnnxlmError, match="per_channel needs format qdq, symmetric and 4 bits"):
        make_pass({"pass": "quant_weight_only", "per_channel": True})


def test_qdq_artifacts_are_static_report_their_ppl_and_run(qdq_artifacts):
    qnn, int4 = qdq_artifacts["static-qdq"], qdq_artifacts["static-int4"]
    for art in (qnn, int4):
        lossy = art.manifest["passes"][1]
        assert lossy["check"]["ppl_after"] > 0 and lossy["check"]["ppl_before"] > 0, lossy["name"]
        assert 0 < lossy["check"]["weight_rel_error"] < 0.2
        for name in ("prefill.onnx", "decode.onnx"):
            assert non_static_values(art.directory / name) == []
    qnn_types = quantized_types(qnn.directory / "prefill.onnx")
    assert qnn_types["activations"] == {onnx.TensorProto.UINT16} and qnn_types["weights"] >= {onnx.TensorProto.UINT8}
    assert ("axis", 1) in qnn_types["attributes"]  # per output channel of the [K, N] weights
    # The rotary frequency product keeps float positions (quantized, they would clip at the calibration's range).
    import onnx_ir as ir

    from onnxlm.passes.quant.qdq import rotary_products

    graph = ir.load(qnn.directory / "model.onnx").graph
    rotary = [n for n in graph if n.name in rotary_products(graph)]
    assert rotary and all(i.producer() is None or i.producer().op_type != "DequantizeLinear"
                          for n in rotary for i in n.inputs)
    # The QNN-style pair is checked with its activation Q/DQ bypassed; its own agreement is recorded.
    assert qnn.manifest["passes"][-1]["check"]["static_qdq_argmax_agreement"] > 0.9
    assert "static_qdq_argmax_agreement" not in int4.manifest["passes"][-1]["check"]
    int4_types = quantized_types(int4.directory / "prefill.onnx")
    assert int4_types["activations"] == set() and int4_types["weights"] == {onnx.TensorProto.INT4}
    assert ("block_size", 32) in int4_types["attributes"]
    assert head_weight_producer(int4.directory / "prefill.onnx") == "Transpose"  # the float embedding, tied
    per_channel = qdq_artifacts["static-int4-per-channel"]
    assert 0 < per_channel.manifest["passes"][1]["check"]["weight_rel_error"] < 0.2
    channel_types = quantized_types(per_channel.directory / "prefill.onnx")
    assert channel_types["weights"] == {onnx.TensorProto.INT4} and ("axis", 1) in channel_types["attributes"]
    blocks = {a for a in channel_types["attributes"] if a[0] == "block_size"}
    assert blocks <= {("block_size", 64), ("block_size", 128)}  # one block per channel: the whole K (64 or 128)
    sampled = Decoding("sample", SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, seed=5))
    prompt = text_ids(qnn, 40)
    for art in (qnn, int4, per_channel):  # the pair decodes as the dynamic QDQ graph it was specialized from
        got = list(art.generate_ids(prompt, 32, ignore_eos=True, decoding=sampled))
        want = list(generate_with(Plain(art.session), prompt, 32, sampler=Sampler(sampled.sampling)))
        assert got == want


OPENVINO_PYTHON = os.environ.get("ONNXLM_OPENVINO_PYTHON")  # a python whose onnxruntime is onnxruntime-openvino
OPENVINO_RUN = """
import json, sys
import onnxlm
from onnxlm.runtime.decoding import Decoding
art = onnxlm.load(sys.argv[1], ep="openvino")
assert art.session.backend.name == "openvino", art.session.backend.name
print(json.dumps(list(art.generate_ids(json.loads(sys.argv[2]), int(sys.argv[3]), ignore_eos=True,
                                       decoding=Decoding()))))
"""
needs_openvino = pytest.mark.skipif(
    not HAS_OPENVINO and not OPENVINO_PYTHON,
    reason="no OpenVINOExecutionProvider: onnxruntime-openvino replaces the onnxruntime module, so it lives in its "
           "own environment (README: OpenVINO install; .ci/run builds it); set ONNXLM_OPENVINO_PYTHON to its python")


@pytest.fixture(scope="session")
def openvino_greedy(tmp_path_factory):
    """(artifact directory, prompt ids, n) -> n greedy tokens on the OpenVINO EP (device CPU), run by the python that
    has it: this process's, or ONNXLM_OPENVINO_PYTHON's in a subprocess that imports this very onnxlm (a link to
    it on PYTHONPATH; a checkout's directory need not be named onnxlm) with that environment's onnxruntime."""
    import subprocess
    import sys

    python = sys.executable if HAS_OPENVINO else OPENVINO_PYTHON
    path = tmp_path_factory.mktemp("openvino-path")
    (path / "onnxlm").symlink_to(Path(onnxlm.__file__).resolve().parent)
    env = {**os.environ, "PYTHONPATH": str(path)}

    def run(directory, prompt, n):
        result = subprocess.run([python, "-c", OPENVINO_RUN, str(directory), json.dumps(prompt), str(n)], env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads(result.stdout.strip().splitlines()[-1])

    return run


@needs_openvino
@pytest.mark.parametrize("recipe", ["static", "static-qdq", "static-int4", "static-int4-per-channel"])
def test_openvino_cpu_runs_the_static_pair_with_the_cpu_eps_tokens(static_artifact, qdq_artifacts, openvino_greedy,
                                                                   recipe):
    art = static_artifact if recipe == "static" else qdq_artifacts[recipe]
    prompt = text_ids(art, 40)
    want = list(art.generate_ids(prompt, 64, ignore_eos=True, decoding=Decoding()))
    assert openvino_greedy(art.directory, prompt, 64) == want


@pytest.fixture(scope="session")
def smollm2_static(tmp_path_factory):
    return onnxlm.optimize("smollm2-135m", recipe="static", output=tmp_path_factory.mktemp("smol-static") / "s")


@pytest.mark.integration
def test_smollm2_static_pair_equals_the_dynamic_fp32_artifact(smollm2_static, smollm2_artifact):
    """SmolLM2 at C = 2048, P = 128: a padded 2.5-chunk prefill and decode steps (1e-4 scale-aware), and 64 greedy
    tokens, against the GQA artifact."""
    check = smollm2_static.manifest["passes"][-1]["check"]
    assert check["static_max_abs_logit_diff"] <= check["static_tolerance"]
    ids = text_ids(smollm2_static, 330)
    rows = {}
    for name, executor in (("static", executor_for(smollm2_static.session)),
                           ("dynamic", Plain(smollm2_artifact.session))):
        executor.begin(len(ids))
        logits = [executor.prefill(ids[:320], all_logits=True)]
        logits += [executor.decode(t)[None].copy() for t in ids[320:]]
        rows[name] = np.concatenate(logits)
    reference = rows["dynamic"]
    assert np.abs(rows["static"] - reference).max() <= 1e-4 + 1e-5 * np.abs(reference).max()
    prompt = smollm2_static.prompt_ids("Write a short story about a lighthouse keeper.")
    got = list(smollm2_static.generate_ids(prompt, 64, ignore_eos=True, decoding=Decoding()))
    assert got == list(smollm2_artifact.generate_ids(prompt, 64, ignore_eos=True, decoding=Decoding()))


@needs_openvino
@pytest.mark.integration
def test_smollm2_static_on_openvino_cpu_gives_the_cpu_eps_greedy_tokens(smollm2_static, openvino_greedy):
    prompt = smollm2_static.prompt_ids("Write a short story about a lighthouse keeper.")
    want = list(smollm2_static.generate_ids(prompt, 64, ignore_eos=True, decoding=Decoding()))
    assert openvino_greedy(smollm2_static.directory, prompt, 64) == want


def test_an_openvino_device_it_does_not_see_is_one_line(monkeypatch, tmp_path):
    import onnxlm.backends.openvino as openvino

    monkeypatch.setattr(openvino, "openvino_devices", lambda: ["CPU", "GPU.0"])
    with pytest.raises(OnnxlmError, match="OpenVINO device NPU is not available here \\(OpenVINO sees: CPU, GPU.0\\)"):
        get_backend("openvino:NPU").session(tmp_path / "decode.onnx")
