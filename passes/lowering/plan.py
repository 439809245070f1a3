"""What the lowering can fuse in a model, read from its family's description (ModelInfo.family, plain data):
the count each fusion pass must match when the recipe says `expect: "layers"`, and, for what stays unfused,
why. The fusion passes (ort_fusions.py) check their counts against it and copy the reasons into their reports;
a pass whose rewrite cannot express the model at all is not run.

An artifact or an ONNX source without a description is read as llama's (every block pre-norm, RoPE everywhere).
"""

from __future__ import annotations

from onnxlm.model_info import ModelInfo
from onnxlm.passes.lowering.attention import gqa_takes_rotary_dim

# ORT's RotaryEmbedding takes a cos/sin cache of plain cos and sin; these RoPE types scale them (attention_factor).
SCALED_COS_SIN = ("yarn",)


def lowering_plan(info: ModelInfo) -> dict[str, dict]:
    """fusion pass name -> {"count": matches its `expect: layers` means, "counts": the report keys that count,
    "run": whether to run it at all, "unfused": [what stays unfused and why]}."""
    family = info.family or {}
    layers = info.num_layers
    block = family.get("block_norms", ["pre_attention", "pre_mlp"])
    rope = family.get("rope", {})
    with_rope = rope.get("layers", [True] * layers)
    # A residual Add fuses with the norm that reads it: the MLP's pre-norm reads the one after attention, the next
    # block's attention pre-norm the one after the MLP, and the final norm the last one.
    skip = (layers if "pre_mlp" in block else 0) + (layers - 1 if "pre_attention" in block else 0) + 1
    skip_unfused = [] if skip == 2 * layers else [
        f"{2 * layers - skip} residual Adds are read by no norm ({family.get('family')} blocks have "
        f"{', '.join(block)} norms)"]
    rotary_unfused = []
    if rope.get("type") in SCALED_COS_SIN:
        rotary_unfused.append(f"{rope['type']} RoPE scales cos/sin, which ORT's RotaryEmbedding cache cannot hold")
    nope = with_rope.count(False)
    if nope:
        rotary_unfused.append(f"{nope} layer(s) without RoPE (NoPE): fuse_gqa gives them an identity "
                              "RotaryEmbedding (cos 1, sin 0)")
    rotary = 0 if rope.get("type") in SCALED_COS_SIN else 2 * sum(with_rope)
    # The GQA rule fuses RoPE into GroupQueryAttention: without a fused RotaryEmbedding attention stays plain,
    # and so does the KV buffer (not shared).
    gqa = layers if rotary else 0
    gqa_unfused = [] if gqa else ["no fused RotaryEmbedding: attention stays plain ops (the GroupQueryAttention "
                                  "rule fuses RoPE into it), and the KV buffer is not shared"]
    rotary_dim = rope.get("rotary_dim", info.head_dim)
    # Partial RoPE (Phi-4-mini) becomes one RotaryEmbedding over the whole head (rotary_embedding_dim), which GQA
    # takes when its cos cache width, rotary_dim / 2, is a multiple of 8.
    if rotary_dim < info.head_dim and not gqa_takes_rotary_dim(rotary_dim):
        gqa, gqa_unfused = 0, [f"partial RoPE over {rotary_dim} of {info.head_dim} dims keeps plain attention: "
                               "ORT's GroupQueryAttention needs rotary_dim / 2 to be a multiple of 8"]
    return {
        "fuse_skip_rms_norm": {"count": skip, "counts": ["skip_rms_normalization"], "run": True,
                               "unfused": skip_unfused},
        "fuse_rotary": {"count": rotary, "counts": ["rotary_embedding"], "run": rope.get("type") not in
                        SCALED_COS_SIN, "unfused": rotary_unfused},
        "fuse_gqa": {"count": gqa, "counts": ["gqa"], "run": True, "unfused": gqa_unfused},
    }
