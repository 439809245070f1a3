"""The decoder-structure analysis (passes/decoder_structure.py) on every family's tiny model, and the passes that
edit the decoder by its parts on the families whose structure differs from llama's: post-norms (OLMo 2: Add
joins and no pre-norm; Gemma 2: both), multipliers (Granite), a scaled embedding and (1 + w) norms (Gemma), packed
projections (Phi-3), q/k norms (Qwen 3), and RoPE that is scaled, partial, per-layer or absent (sinks-window)."""

from __future__ import annotations

import numpy as np
import pytest

from tiny_families import VARIANTS

from onnxlm.runtime.decoding import Decoding


def prompt(n: int) -> list[int]:
    return np.random.default_rng(11).integers(3, 320, n).tolist()


def graph_of(art):
    import onnx_ir as ir

    model = ir.load(art.directory / "model.onnx")
    ir.external_data.load_to_model(model)
    return model.graph


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_analysis_finds_what_the_description_says(family_builds, variant):
    """On the lowered graph: 2 sub-blocks a layer chained through the stream, a pre-norm and a post-norm exactly
    where the family's block_norms put them, a scale where it has a residual multiplier, an output linear on every
    dense block (none on a mixture of experts), the layer's GroupQueryAttention, and the head behind the final
    norm; the int8 roles are those linears."""
    from onnxlm.passes.decoder_structure import find_decoder
    from onnxlm.passes.quant.dynamic_int8 import linear_roles
    from onnxlm.passes.quant.linears import lm_head

    _, _, artifact = family_builds
    art = artifact(variant, "fp32")
    info, graph = art.info, graph_of(art)
    decoder = find_decoder(graph, info)
    norms = info.family["block_norms"]
    sparse = (info.moe or {}).get("layers", [False] * info.num_layers)
    gqa = "com.microsoft::GroupQueryAttention" in art.manifest["op_histogram"]
    assert len(decoder.blocks) == 2 * info.num_layers and decoder.fused
    for j, block in enumerate(decoder.blocks):
        name = "attention" if block.kind == "attn" else "mlp"
        assert (block.layer, block.kind) == (j // 2, ("attn", "mlp")[j % 2])
        assert (block.norm is not None) == (f"pre_{name}" in norms)
        assert (block.post_norm is not None) == (f"post_{name}" in norms)
        assert (block.scale is not None) == (info.family["residual_multiplier"] != 1)
        assert (block.out is None) == (block.kind == "mlp" and sparse[block.layer])
        if block.out is not None:
            assert block.out.op_type == "MatMul" and block.out.inputs[1].shape[-1] == info.hidden_size
        if j:
            assert block.stream_in is decoder.blocks[j - 1].stream_out
        if block.kind == "attn":
            assert (block.attention is not None) == gqa
    assert decoder.head is lm_head(graph)
    roles = linear_roles(graph, info)
    assert sorted(roles.values()) == sorted(["lm_head"] + ["o_proj"] * info.num_layers
                                            + ["down_proj"] * (info.num_layers - sum(sparse)))


@pytest.mark.parametrize("variant", ["gemma", "phi3"])
def test_larosa_rotation_is_lossless_beyond_llama(family_builds, variant):
    """rotate_residual on the lowered graph of Gemma (a scaled embedding, (1 + w) norms) and Phi-3 (packed qkv and
    gate/up): the manager's check against the graph before holds (a scale that did not commute, or a gamma left
    behind, would move the logits). Granite's multipliers are covered by the larosa-s25 test below."""
    _, _, artifact = family_builds
    art = artifact(variant, "larosa-rotate")
    report = next(r for r in art.manifest["passes"] if r["name"] == "rotate_residual")
    assert report["check"]["max_abs_logit_diff"] <= report["check"]["tolerance"]
    assert report["matched"] == {"layers_rotated": art.info.num_layers, "adapters": art.info.num_layers - 1}


def test_larosa_sparsity_runs_on_granite(family_builds):
    """topk_sparsify after the rotation on Granite (multipliers on every block's output): top-k sites on each
    block's inputs and outputs, a reported sparse PPL, and decoding runs."""
    _, _, artifact = family_builds
    art = artifact("granite", "larosa-s25")
    report = next(r for r in art.manifest["passes"] if r["name"] == "topk_sparsify")
    assert report["matched"] == {"topk_sites": 4 * art.info.num_layers}
    assert report["check"]["ppl_after"] > 0
    assert len(list(art.generate_ids(prompt(8), max_new_tokens=8, ignore_eos=True, decoding=Decoding()))) == 8


@pytest.mark.parametrize("variant", ["gemma2-softcap", "olmo2"])
def test_larosa_refuses_post_norms_in_one_line(family_builds, capsys, tmp_path, variant):
    from cli_helpers import run_cli

    checkpoint, _, _ = family_builds
    code, _, err = run_cli(capsys, "optimize", str(checkpoint(variant)), "-o", str(tmp_path / "a"), "--recipe",
                           "larosa-rotate")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "rotate_residual: La RoSA rotates pre-norm blocks" in err and "post_mlp" in err
    assert not (tmp_path / "a").exists()


def test_quicksilver_halting_on_post_norm_joins(family_builds):
    """OLMo 2's residual joins are plain Adds (no norm reads them; llama's are SkipSimplifiedLayerNormalization,
    tests/test_halting.py): at threshold 0 the halting graph is the graph before (the manager's check), and a threshold that halts every
    token after the first drops their layer-1 updates: their logits are the model without layer 1's."""
    import torch

    from reference import drop_layers

    checkpoint, _, artifact = family_builds
    variant = "olmo2"
    art = artifact(variant, "quicksilver", overrides={"quicksilver_halting": {"min_layer": 1}})
    report = next(r for r in art.manifest["passes"] if r["name"] == "quicksilver_halting")
    assert report["check"]["max_abs_logit_diff"] <= report["check"]["tolerance"]
    ids = prompt(6)
    cache = art.session.new_cache(capacity=len(ids), halt_threshold=1e9)
    logits = art.session.step(np.asarray([ids], np.int64), cache)[0]
    assert cache.state["token_halting"].halted[0][1, 1:].all()
    import transformers

    shallow = transformers.AutoModelForCausalLM.from_pretrained(checkpoint(variant),
                                                                attn_implementation="eager").eval()
    drop_layers(shallow, [1])
    with torch.no_grad():
        expected = shallow(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(logits[1:], expected[1:], atol=2e-4)


@pytest.mark.parametrize("variant", ["olmo2", "gemma2-softcap"])
def test_early_exit_on_families_beyond_llama(family_builds, variant):
    """The exit after layer 0 of OLMo 2 (its stream enters the upper segment through an Add) and Gemma 2
    (post-norms, soft-caps, a scaled embedding): with a threshold every step takes, the head segment on the exit's stream gives
    what transformers' model cut after that layer gives (with the family's scale, caps and divisor); with
    threshold 0 the segments decode the full model's tokens."""
    import torch
    import transformers

    from onnxlm.runtime.early_exit import ExitSegments, ExitState, exit_generate, exit_step
    from onnxlm.runtime.generate import generate_tokens, prefill
    from reference import drop_layers

    checkpoint, _, artifact = family_builds
    art = artifact(variant, "early-exit", overrides={"early_exit": {"layer": 1}})
    segments = ExitSegments(art.session)
    ids = prompt(6)
    assert list(exit_generate(art.session, segments, ids, 8, 0.0)) == list(generate_tokens(art.session, ids, 8))
    cache = art.session.new_cache(capacity=len(ids))
    prefill(art.session, cache, ids[:1])
    state = ExitState(lower=1, upper=1)
    ours = [exit_step(segments, cache, state, token, 1e9).copy() for token in ids[1:]]
    assert state.exits == len(ids) - 1
    shallow = transformers.AutoModelForCausalLM.from_pretrained(checkpoint(variant),
                                                                attn_implementation="eager").eval()
    drop_layers(shallow, [1])
    with torch.no_grad():
        expected = shallow(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(np.stack(ours), expected[1:], atol=2e-4)


@pytest.mark.parametrize("variant", ["llama3-rope", "phi3-partial", "gemma3-text", "smollm3"])
def test_moving_keys_is_the_graphs_rope_on_every_layer(family_builds, variant):
    """sinks-window moves cached keys by rotating them with the frequencies the description records: on every
    layer (Gemma 3's sliding one on its local base, SmolLM3's NoPE one not at all), the keys of a prompt run 9
    positions later are the keys run at 0, rotated by 9 (RoPE is relative, so deeper layers see the same
    inputs); and generation past the budget runs."""
    from onnxlm.runtime.kv_policy import KVPolicyConfig, rotate_keys

    _, _, artifact = family_builds
    art = artifact(variant, "fp32", kv_scores=True)
    model, ids = art.session, prompt(8)

    def keys_at(start):
        cache = model.new_cache(capacity=len(ids))
        cache.offset = start
        model.step(np.asarray([ids], np.int64), cache)
        return [cache.arrays[2 * layer][0, :, : len(ids)].copy() for layer in range(art.info.num_layers)]

    at0, at9 = keys_at(0), keys_at(9)
    for layer in range(art.info.num_layers):
        moved = at0[layer].copy()
        rotate_keys(moved, 9, art.info, layer)
        np.testing.assert_allclose(moved, at9[layer], atol=1e-4, err_msg=f"layer {layer}")
        assert (np.abs(at9[layer] - at0[layer]).max() > 1e-2) == bool(art.info.key_frequencies(layer))
    decoding = Decoding(kv_policy=KVPolicyConfig("sinks-window", budget=40))
    tokens = list(art.generate_ids(prompt(16), max_new_tokens=48, ignore_eos=True, decoding=decoding))
    assert len(tokens) == 48
