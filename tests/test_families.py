"""Every family onnxlm exports, on a tiny random checkpoint of its own (tests/tiny_families.py): the `fp32`
artifact's logits and greedy tokens against transformers (eager attention: the reference that applies every
feature, soft-capping included), `int4-rtn` builds and runs, genai decodes the same tokens, and the lowering
fused what the family's description says it can and reported the rest.

Each test records its outcome in RESULTS; `ONNXLM_ARCH_TABLE=docs/architectures.md pytest tests/test_families.py`
writes the table from them (conftest.py)."""

from __future__ import annotations

import numpy as np
import pytest

from reference import torch_greedy
from tiny_families import VARIANTS

from onnxlm.runtime.decoding import Decoding

PREFILL, DECODE, GREEDY = 16, 8, 32
RESULTS: dict[str, dict[str, str]] = {}  # variant -> column -> cell, for docs/architectures.md


def record(variant: str, column: str, cell: str) -> None:
    RESULTS.setdefault(variant, {})[column] = cell


def prompt(n: int = PREFILL + DECODE) -> list[int]:
    return np.random.default_rng(7).integers(3, 320, n).tolist()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fp32_logits_match_transformers(family_builds, variant):
    """A 16-token prefill and 8 decode steps on the fused graph, within the pass manager's bound of transformers."""
    import torch

    _, model, artifact = family_builds
    art = artifact(variant, "fp32")
    ids = prompt()
    with torch.no_grad():
        ref = model(variant)(torch.tensor([ids])).logits[0].numpy()
    cache = art.session.new_cache(capacity=64)
    ours = [art.session.step(np.asarray([ids[:PREFILL]]), cache)[0]]
    for token in ids[PREFILL:]:
        ours.append(art.session.step(np.asarray([[token]]), cache)[0].copy())  # the decode path reuses its array
    diff = float(np.abs(np.concatenate(ours) - ref).max())
    bound = 1e-4 + 1e-5 * float(np.abs(ref).max())
    record(variant, "fp32 parity", f"{diff:.1e}" if diff <= bound else f"**{diff:.1e}** > {bound:.1e}")
    assert diff <= bound


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fp32_greedy_equals_transformers(family_builds, variant):
    _, model, artifact = family_builds
    art = artifact(variant, "fp32")
    ids = prompt(PREFILL)
    ours = list(art.generate_ids(ids, max_new_tokens=GREEDY, ignore_eos=True, decoding=Decoding()))
    same = ours == torch_greedy(model(variant), ids, GREEDY)
    record(variant, "greedy 32", "same" if same else "**differs**")
    assert same


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lowering_fuses_what_the_family_allows(family_builds, variant):
    """Every fusion with expect "layers" met the family's count (else the build failed); what stays unfused is
    named in the pass's notes."""
    from onnxlm.passes.lowering.plan import lowering_plan

    _, _, artifact = family_builds
    art = artifact(variant, "fp32")
    plan = lowering_plan(art.info)
    ops = art.manifest["op_histogram"]
    reports = {r["name"]: r for r in art.manifest["passes"]}
    for name, expected in plan.items():
        report = reports[name]
        assert sum(report["matched"].get(k, 0) for k in expected["counts"]) == expected["count"], name
        for reason in expected["unfused"]:
            assert reason in report["notes"], (name, reason)
    fused = {op.split("::")[-1]: n for op, n in ops.items() if op.startswith("com.microsoft::") or
             op.endswith("SimplifiedLayerNormalization")}
    record(variant, "fused ops", ", ".join(f"{op} {n}" for op, n in sorted(fused.items())) or "none")
    unfused = [f"{name}: {r}" for name, expected in plan.items() for r in expected["unfused"]]
    record(variant, "left unfused", "; ".join(unfused) or "-")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_int4_rtn_without_a_layer_runs_under_a_kv_policy(family_builds, variant):
    """`int4-rtn --remove-layers 1 --kv-scores` builds (its PPL reported), keeps one layer, and generates 32 tokens
    under h2o past a 40-slot budget, so the cache evicts (h2o keeps original positions: it runs whatever the
    family's RoPE). A graph whose attention stayed unfused is refused in one line instead: the KV policies work on
    GroupQueryAttention's cache."""
    from onnxlm.errors import OnnxlmError
    from onnxlm.runtime.kv_policy import KVPolicyConfig

    _, _, artifact = family_builds
    art = artifact(variant, "int4-rtn", remove_layers=1, kv_scores=True)
    ops = art.manifest["op_histogram"]
    report = next(p for p in art.manifest["passes"] if p["name"] == "quant_weight_only")
    qmoe = ops.get("com.microsoft::QMoE", 0)
    record(variant, "int4-rtn", f"runs, {ops.get('com.microsoft::MatMulNBits', 0)} MatMulNBits"
           + (f", {qmoe} QMoE" if qmoe else "") + f"; PPL {report['check']['ppl_before']:.0f} -> "
           f"{report['check']['ppl_after']:.0f} (random weights)")
    assert ops.get("com.microsoft::MatMulNBits", 0) > 0 and report["check"]["ppl_after"] > 0
    assert art.info.num_layers == 1
    decoding = Decoding(kv_policy=KVPolicyConfig("h2o", budget=40))
    if "com.microsoft::GroupQueryAttention" not in ops:
        with pytest.raises(OnnxlmError, match="KV policies need a GroupQueryAttention graph"):
            list(art.generate_ids(prompt(PREFILL), max_new_tokens=GREEDY, ignore_eos=True, decoding=decoding))
        record(variant, "remove 1 + h2o", "layer removed; h2o refused (attention left unfused)")
        return
    tokens = list(art.generate_ids(prompt(PREFILL), max_new_tokens=GREEDY, ignore_eos=True, decoding=decoding))
    record(variant, "remove 1 + h2o", "runs" if len(tokens) == GREEDY else "**fails**")
    assert len(tokens) == GREEDY


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_genai_greedy_equals_onnxlm(family_builds, variant):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is part of the test extras")
    from test_genai import genai_greedy

    _, _, artifact = family_builds
    art = artifact(variant, "fp32")
    ids = prompt(PREFILL)
    ours = list(art.generate_ids(ids, max_new_tokens=GREEDY, ignore_eos=True, decoding=Decoding()))
    try:
        og.Model(str(art.directory))
    except Exception as exc:  # genai refuses the model type: recorded, not an onnxlm failure
        record(variant, "genai", f"not run: {str(exc).splitlines()[0][:80]}")
        pytest.skip(f"onnxruntime-genai does not run {variant}: {exc}")
    same = genai_greedy(art.directory, ids, GREEDY) == ours
    record(variant, "genai", "same tokens" if same else "**differs**")
    assert same


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_description_agrees_with_transformers_modules(family_builds, variant):
    """The family's description read from the config says what transformers' modules do: sliding windows per
    layer, RoPE per layer, soft-caps, the attention scale."""
    _, model, artifact = family_builds
    m = model(variant)
    info = artifact(variant, "fp32").info
    attn = [layer.self_attn for layer in m.model.layers]
    # a module's own window, else (mistral, phi3) the one its forward reads from the config
    windows = [(a.sliding_window if hasattr(a, "sliding_window") else getattr(a.config, "sliding_window", None))
               or 0 for a in attn]
    assert windows == (info.layer_windows or [0] * info.num_layers)
    assert [bool(getattr(a, "use_rope", True)) for a in attn] == info.family["rope"]["layers"]
    # (Qwen2-MoE's attention, an older module, has no `scaling` and divides by sqrt(head_dim))
    assert [getattr(a, "scaling", a.head_dim ** -0.5) for a in attn] == pytest.approx(
        [info.family["attention_scale"]] * info.num_layers)
    moe = info.family["moe"]
    blocks = [getattr(layer, moe["module"][0] if moe else "mlp") for layer in m.model.layers]
    assert [len(getattr(b, "experts", ())) for b in blocks] == [
        moe["experts"] if moe and sparse else 0 for sparse in (moe["layers"] if moe else [False] * len(blocks))]
    assert [getattr(a, "attn_logit_softcapping", None) or 0.0 for a in attn] == [
        info.family["attention_softcap"]] * info.num_layers
    assert (getattr(m.config, "final_logit_softcapping", None) or 0.0) == info.family["final_softcap"]
    assert info.family["tied_head"] == (m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_speculative_decoding_keeps_greedy_tokens(family_builds, variant):
    """Prompt-lookup speculative decoding verifies its drafts with the model: the same 32 tokens as greedy. The
    prompt repeats itself, so that drafts are proposed and accepted."""
    _, _, artifact = family_builds
    art = artifact(variant, "fp32")
    ids = prompt(8) * 3
    greedy = list(art.generate_ids(ids, max_new_tokens=GREEDY, ignore_eos=True, decoding=Decoding()))
    drafted = list(art.generate_ids(ids, max_new_tokens=GREEDY, ignore_eos=True,
                                    decoding=Decoding("speculative", prompt_lookup=True)))
    record(variant, "speculative", "same tokens" if drafted == greedy else "**differs**")
    assert drafted == greedy


def test_gemma2_soft_capping_bites(family_builds):
    """The gemma2 variant's caps change its logits (so its parity above covers them): transformers' sdpa path,
    which leaves the attention cap out, and the model without its final cap both differ from the reference."""
    import torch
    import transformers

    checkpoint, model, _ = family_builds
    ids = torch.tensor([prompt()])
    with torch.no_grad():
        reference = model("gemma2-softcap")(ids).logits
        uncapped_attention = transformers.AutoModelForCausalLM.from_pretrained(
            checkpoint("gemma2-softcap"), attn_implementation="sdpa").eval()(ids).logits
        m = model("gemma2-softcap")
        cap, m.config.final_logit_softcapping = m.config.final_logit_softcapping, None
        try:
            uncapped_logits = m(ids).logits
        finally:
            m.config.final_logit_softcapping = cap
    assert (reference - uncapped_attention).abs().max() > 1e-2
    assert (reference - uncapped_logits).abs().max() > 1e-2


def test_sinks_window_refuses_an_artifact_without_its_rope_frequencies(family_builds):
    """StreamingLLM moves keys by rotating them with the frequencies the description records
    (test_decoder_structure.py checks them against the graph); a llama3-scaled artifact written before they were
    recorded cannot be moved rightly, so the policy is refused in one line."""
    import dataclasses

    from onnxlm.errors import OnnxlmError
    from onnxlm.runtime.kv_policy import KVPolicyConfig, make_policy

    _, _, artifact = family_builds
    art = artifact("llama3-rope", "fp32")
    rope = {k: v for k, v in art.info.family["rope"].items() if k != "inv_freq"}
    older = dataclasses.replace(art.info, family={**art.info.family, "rope": rope})
    assert art.info.key_frequencies(0) == art.info.family["rope"]["inv_freq"] and older.key_frequencies(0) is None
    with pytest.raises(OnnxlmError, match="does not record its llama model's RoPE frequencies"):
        make_policy(KVPolicyConfig("sinks-window", budget=40), older).check_positions(art.session)


def test_artifacts_without_a_description_read_as_llama():
    """A manifest written before families were described (no `family`, no `layer_windows`) gets llama's plan,
    plain RoPE, and keeps sharing its KV buffer; a graph with one layer left unfused does not share it."""
    from onnxlm.model_info import ModelInfo, shares_kv_buffer
    from onnxlm.passes.lowering.plan import lowering_plan

    info = ModelInfo("llama", 30, 9, 3, 64, 576, 49152, 8192, 100000.0, 1, [2])
    plan = lowering_plan(info)
    assert {name: p["count"] for name, p in plan.items()} == {"fuse_skip_rms_norm": 60, "fuse_rotary": 60,
                                                              "fuse_gqa": 30}
    assert not any(p["unfused"] for p in plan.values()) and info.sliding_window == 0
    assert info.key_frequencies(0) == pytest.approx([100000.0 ** (-i / 32) for i in range(32)])
    assert shares_kv_buffer({"com.microsoft::GroupQueryAttention": 30}, 30)
    assert not shares_kv_buffer({"com.microsoft::GroupQueryAttention": 29}, 30)
    assert not shares_kv_buffer({}, 30)


def test_remove_layers_on_a_scaled_embedding(family_builds, tmp_path):
    """Gemma scales its embedding (Gather, then Mul): the residual stream starts after the scale, and the model
    without a layer matches transformers without it."""
    import torch

    import onnxlm
    from reference import drop_layers

    checkpoint, model, _ = family_builds
    art = onnxlm.optimize(str(checkpoint("gemma")), recipe="fp32", output=tmp_path / "a", remove_layers=1)
    removed = next(p for p in art.manifest["passes"] if p["name"] == "remove_layers")["check"]["removed_layers"]
    ids = prompt(12)
    reference = model("gemma")
    layers = list(reference.model.layers)
    try:
        drop_layers(reference, removed)
        with torch.no_grad():
            expected = reference(torch.tensor([ids])).logits[0].numpy()
    finally:  # the session's model keeps its layers for the other tests
        for index, layer in enumerate(layers):
            layer.self_attn.layer_idx = index
        reference.model.layers = torch.nn.ModuleList(layers)
        reference.config.num_hidden_layers = len(layers)
    ours = art.session.step(np.asarray([ids]), art.session.new_cache(capacity=16))[0]
    assert art.info.num_layers == 1 and np.abs(ours - expected).max() <= 1e-4


MOE_VARIANTS = [v for v, (model_type, _) in VARIANTS.items() if model_type.endswith("moe") or model_type == "mixtral"]


@pytest.mark.parametrize("variant", MOE_VARIANTS)
def test_moe_blocks_export_as_one_moe_op_each(family_builds, variant):
    """Each sparse layer is one com.microsoft.MoE (the dense ones stay plain MLPs), its router a float Gemm; the
    op's torch reference, on the stacked weights, computes what transformers' expert loop does."""
    import torch

    from onnxlm.frontend import moe as moe_export

    _, model, artifact = family_builds
    art = artifact(variant, "fp32")
    spec = art.info.family["moe"]
    ops = art.manifest["op_histogram"]
    assert ops["com.microsoft::MoE"] == sum(spec["layers"]) and ops.get("Gemm", 0) >= sum(spec["layers"])
    m = model(variant)
    layer = next(i for i, sparse in enumerate(spec["layers"]) if sparse)
    block = getattr(m.model.layers[layer], spec["module"][0])
    x = torch.randn(1, 16, m.config.hidden_size)
    with torch.no_grad():
        expected, _ = block(x)
        with moe_export.sparse_blocks_as_moe_ops(m, art.info.family):
            ours, _ = block(x)
        restored, _ = block(x)
    assert torch.allclose(ours, expected, atol=1e-5) and torch.equal(restored, expected)
    assert not hasattr(block, "moe_fc1")


@pytest.mark.parametrize("variant", MOE_VARIANTS)
def test_int4_rtn_quantizes_the_experts_with_qmoe(family_builds, variant):
    """`int4-rtn` turns each MoE whose routing renormalizes into a QMoE (symmetric 4-bit codes, blocks of 32), and
    one such node computes what the MoE does with the dequantized weights (the codes and scales read back as ORT
    reads them). A MoE that does not renormalize keeps float experts, and the pass says why."""
    import onnx_ir as ir
    import onnxruntime as ort

    from onnxlm.passes.quant.moe_experts import quantize_experts

    _, _, artifact = family_builds
    art = artifact(variant, "int4-rtn")
    spec = art.info.family["moe"]
    report = next(p for p in art.manifest["passes"] if p["name"] == "quant_weight_only")
    ops = art.manifest["op_histogram"]
    if not spec["normalize"]:
        assert ops["com.microsoft::MoE"] == sum(spec["layers"]) and "qmoe" not in report["matched"]
        assert any("ORT's CPU QMoE always does" in n for n in report["notes"])
        return
    assert report["matched"]["qmoe"] == ops["com.microsoft::QMoE"] == sum(spec["layers"])
    assert "com.microsoft::MoE" not in ops
    fp32 = ir.load(artifact(variant, "fp32").directory / "model.onnx")
    ir.external_data.load_to_model(fp32)
    node = next(n for n in fp32.graph if n.op_type == "MoE")
    rng = np.random.default_rng(0)
    w1, w2 = node.inputs[2].const_value.numpy() * 50, node.inputs[4].const_value.numpy() * 50  # outputs ~1e3
    x = rng.standard_normal((12, w1.shape[2])).astype(np.float32)
    logits = rng.standard_normal((12, w1.shape[0])).astype(np.float32) * 3
    pairs, _ = quantize_experts(quantized := one_node_model(node, (w1, w2)), 4, 32)
    reference = one_node_model(node, [dq for _, dq in pairs])
    run = [ort.InferenceSession(ir.to_proto(g).SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x, "router": logits})[0] for g in (one_node_model(node, (w1, w2)), quantized, reference)]
    scale = np.abs(run[0]).max()
    assert np.abs(run[1] - run[2]).max() <= 1e-5 * scale < 1e-3 * scale < np.abs(run[0] - run[1]).max()


def one_node_model(node, weights=None):
    """A graph of one copy of the MoE `node` (its attributes and expert weights, or `weights` in their place)
    over inputs x [tokens, hidden] and router [tokens, experts]."""
    import onnx_ir as ir

    w1, w2 = weights or (node.inputs[2].const_value.numpy(), node.inputs[4].const_value.numpy())
    def value(name, shape, array=None):
        return ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(shape),
                        const_value=None if array is None else ir.tensor(array))

    x, router = value("x", ["n", w1.shape[2]]), value("router", ["n", w1.shape[0]])
    fc1, fc2 = value("fc1", w1.shape, w1), value("fc2", w2.shape, w2)
    copy = ir.Node("com.microsoft", "MoE", [x, router, fc1, None, fc2], attributes=list(node.attributes.values()),
                   name="moe", num_outputs=1)
    copy.outputs[0].name = "y"
    graph = ir.Graph([x, router], copy.outputs, nodes=[copy], initializers=[fc1, fc2],
                     opset_imports={"": 20, "com.microsoft": 1})
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize("variant, args, message", [
    ("mixtral", ["--recipe", "larosa-s25"],
     "rotate_residual: La RoSA rewrites dense MLPs, and this mixtral model's MLPs are mixtures of experts"),
    ("qwen3-moe-normed", ["--recipe", "static", "--context-length", "256", "--prefill-chunk", "32"],
     "static_kv: this qwen3_moe model's mixture-of-experts blocks export as com.microsoft::MoE, which NPU execution "
     "providers do not run; static artifacts of MoE models are not supported yet"),
])
def test_what_a_mixture_of_experts_cannot_take_is_one_line(family_builds, capsys, tmp_path, variant, args,
                                                              message):
    from cli_helpers import run_cli

    checkpoint, _, _ = family_builds
    code, _, err = run_cli(capsys, "optimize", str(checkpoint(variant)), "-o", str(tmp_path / "a"), *args)
    assert code == 2 and err.strip().splitlines() == [f"error: {message}"]
    assert not (tmp_path / "a").exists()
