"""What a decoder family is, as plain data, and how a checkpoint's config fills it in.

A `Family` names the family's structure (which norms a block has, whether q/k are normed, how the embedding and
the attention are scaled, where sliding windows and soft-capping come from) and, where a value varies between
checkpoints, the config field that holds it. `describe(family, config)` resolves those fields into the plain
dict that `ModelInfo.family` carries into the manifest: the lowering reads it for its expected fusions, the
runtime for the sliding windows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from onnxlm.errors import OnnxlmError

# Norms a decoder block can have, in the order they run.
PRE_ATTENTION, POST_ATTENTION, PRE_MLP, POST_MLP = "pre_attention", "post_attention", "pre_mlp", "post_mlp"
LLAMA_BLOCK = (PRE_ATTENTION, PRE_MLP)
RMS, RMS_ONE_PLUS = "rms", "rms_one_plus"  # x / rms(x) * w, and Gemma's x / rms(x) * (1 + w)
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# RoPE types whose frequencies depend on the sequence length: a data-dependent branch that torch.export refuses.
UNEXPORTABLE_ROPE = {
    "dynamic": "dynamic NTK RoPE recomputes its frequencies from the sequence length, which the export cannot trace",
    "longrope": "LongRoPE picks its short or long factors from the sequence length, which the export cannot trace",
}
# Fields every family's config.json must give: the shapes of the graph.
SHAPE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")


@dataclasses.dataclass(frozen=True)
class Family:
    """One decoder family (an HF model_type). Strings name config fields or one of the small vocabularies below."""

    name: str
    norm: str = RMS
    block_norms: tuple[str, ...] = LLAMA_BLOCK
    qk_norm: str = "none"  # "none" | "head" (over head_dim) | "all_heads" (OLMo 2: over all heads at once)
    qkv_bias: str = "attention_bias"  # a config field, or "always" | "never"
    activation: str = "hidden_act"  # the config field that names the MLP's activation
    embedding_scale: str = ""  # "" (1) | "sqrt_hidden" (Gemma) | a config field (Granite's embedding_multiplier)
    attention_scale: str = "head_dim"  # softmax scale: "head_dim" (1/sqrt) | "query_pre_attn_scalar" (1/sqrt) |
    # "attention_multiplier" (as given)
    residual_multiplier: str = ""  # a config field scaling each sub-block's output before the residual add
    logits_divisor: str = ""  # a config field dividing the logits (Granite's logits_scaling)
    attention_softcap: str = ""  # a config field: scores -> cap * tanh(scores / cap)
    final_softcap: str = ""  # a config field: logits -> cap * tanh(logits / cap)
    windows: str = "none"  # sliding windows: "none" | "all" (every layer, when sliding_window is set) |
    # "layer_types" (the layers config.layer_types marks sliding) | "layer_types_gated" (only with use_sliding_window)
    rope_layers: str = "all"  # "all" | "no_rope_layers" (SmolLM3: 0 marks a layer without RoPE)
    local_rope_theta: str = ""  # a config field: the sliding layers' RoPE base (Gemma 3)
    required: tuple[str, ...] = ()  # config fields beyond SHAPE_FIELDS that this family cannot do without
    gguf: str = ""  # the GGUF general.architecture onnxlm reads this family from ("": none); transformers'
    # GGUF loader builds the model, so only the architectures it reads can be listed
    genai_type: str = ""  # onnxruntime-genai's model.type for it ("": the name)
    # Mixture of experts (a sparse MLP block replaces the MLP on the layers `moe_layers` selects):
    moe_experts: str = ""  # the config field with the number of routed experts ("": every MLP is dense)
    moe_top_k: str = "num_experts_per_tok"  # the config field with the experts each token is routed to
    moe_normalize: str = "always"  # renormalize the top-k routing weights: "always" or a config field
    moe_shared_expert: str = ""  # a config field with a shared expert's size ("": none); its output is gated
    # by sigmoid(x @ w) and added to the routed experts' (Qwen2-MoE)
    moe_layers: str = "all"  # "all" | "sparse_step" (every config.decoder_sparse_step-th, minus mlp_only_layers)
    moe_module: tuple[str, str, str, str] = ("mlp", "gate_proj", "up_proj", "down_proj")  # the block's attribute
    # on a transformers decoder layer and its experts' gate, up and down linears (export.py rewrites the block)


def config_fields_missing(family: Family, config_json: dict) -> list[str]:
    return [f for f in (*SHAPE_FIELDS, *family.required) if config_json.get(f) is None]


def rope_type(family: Family, scaling: dict | None) -> str:
    """The RoPE type of a config's rope_scaling, or a one-line error for one onnxlm cannot export."""
    scaling = scaling if isinstance(scaling, dict) else {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in UNEXPORTABLE_ROPE:
        raise OnnxlmError(f"this {family.name} config's rope_scaling is '{kind}': {UNEXPORTABLE_ROPE[kind]}")
    if kind not in ROPE_TYPES:
        raise OnnxlmError(f"unsupported rope_scaling type '{kind}' in this {family.name} config: onnxlm exports "
                          f"{', '.join(ROPE_TYPES)}")
    return kind


def _field(config: Any, name: str, default=None):
    return getattr(config, name, default) if name else default


def _flag(spec: str, config: Any) -> bool:
    return {"always": True, "never": False}.get(spec, bool(_field(config, spec, False)))


def _attention_scale(family: Family, config: Any, head_dim: int) -> float:
    if family.attention_scale == "head_dim":
        return head_dim ** -0.5
    if family.attention_scale == "query_pre_attn_scalar":
        return float(config.query_pre_attn_scalar) ** -0.5
    return float(getattr(config, family.attention_scale))


def _embedding_scale(family: Family, config: Any) -> float:
    if family.embedding_scale == "sqrt_hidden":
        return float(config.hidden_size) ** 0.5
    return float(_field(config, family.embedding_scale, 1.0))


def layer_windows(family: Family, config: Any) -> list[int]:
    """Each layer's sliding window (0: full attention), as transformers' attention modules apply them; a bad value
    is a one-line error."""
    try:
        return _layer_windows(family, config)
    except (TypeError, ValueError) as exc:
        raise OnnxlmError(f"this {family.name} config's sliding window is not readable: {exc}") from None


def _layer_windows(family: Family, config: Any) -> list[int]:
    layers = config.num_hidden_layers
    window = int(getattr(config, "sliding_window", None) or 0)
    if family.windows == "none" or not window:
        return [0] * layers
    if family.windows == "all":
        return [window] * layers
    if family.windows == "layer_types_gated" and not getattr(config, "use_sliding_window", False):
        return [0] * layers
    types = getattr(config, "layer_types", None) or ["full_attention"] * layers
    return [window if t == "sliding_attention" else 0 for t in types]


def moe_of(family: Family, config: Any) -> dict | None:
    """The family's mixture of experts with this config's values, or None for a dense MLP."""
    experts = int(_field(config, family.moe_experts, 0) or 0)
    if not experts:
        return None
    layers = config.num_hidden_layers
    if family.moe_layers == "sparse_step":
        step, dense = int(config.decoder_sparse_step), set(getattr(config, "mlp_only_layers", None) or ())
        sparse = [i not in dense and (i + 1) % step == 0 for i in range(layers)]
    else:
        sparse = [True] * layers
    return {
        "experts": experts,
        "top_k": int(getattr(config, family.moe_top_k)),
        "normalize": _flag(family.moe_normalize, config),
        "shared_expert": bool(_field(config, family.moe_shared_expert, 0)),
        "layers": sparse,
        "module": list(family.moe_module),
    }


def rope_of(family: Family, config: Any, head_dim: int) -> dict:
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = rope_type(family, scaling)
    partial = float(getattr(config, "partial_rotary_factor", 1.0) or 1.0)
    layers = config.num_hidden_layers
    if family.rope_layers == "no_rope_layers":
        with_rope = [bool(x) for x in config.no_rope_layers]
    else:
        with_rope = [True] * layers
    local_theta = float(_field(config, family.local_rope_theta, 0.0) or 0.0)
    return {
        "theta": float(getattr(config, "rope_theta", 10000.0)),
        "local_theta": local_theta,
        "type": kind,
        "factor": float(scaling.get("factor", 1.0)),
        "rotary_dim": int(head_dim * partial),
        "layers": with_rope,
        # What the exported graph rotates by (transformers' own RoPE init for this type): the runtime moves
        # cached keys with them (runtime/kv_policy.rotate_keys), whatever the scaling.
        "inv_freq": inverse_frequencies(config, kind),
        **({"local_inv_freq": inverse_frequencies(config, "default", local_theta)} if local_theta else {}),
    }


def inverse_frequencies(config: Any, kind: str, theta: float = 0.0) -> list[float]:
    """RoPE's rotary_dim / 2 inverse frequencies for this config, as transformers computes them (float32), with
    the base `theta` in place of rope_theta where given (Gemma 3's sliding layers: default RoPE on their base)."""
    import copy

    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if theta:
        config = copy.copy(config)
        config.rope_theta, config.rope_scaling = theta, {"rope_type": "default"}
    inv_freq, _ = ROPE_INIT_FUNCTIONS[kind](config, None)
    return [float(f) for f in inv_freq.tolist()]


def attention_implementation(family: Family, config: Any) -> str | None:
    """transformers' attention to load with: "eager" when the config soft-caps attention scores (its sdpa path
    leaves the cap out), else its default."""
    return "eager" if _field(config, family.attention_softcap) else None


def describe(family: Family, config: Any) -> dict:
    """The family's description with this config's values: plain JSON data, stored as ModelInfo.family. A value
    of the wrong kind (a string where a number belongs) is a one-line error."""
    try:
        return _describe(family, config)
    except (TypeError, ValueError, AttributeError, IndexError) as exc:
        raise OnnxlmError(f"this {family.name} config has a value onnxlm cannot read: {exc}") from None


def _describe(family: Family, config: Any) -> dict:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    activation = _field(config, family.activation) or getattr(config, "hidden_act", "silu")
    return {
        "family": family.name,
        "norm": family.norm,
        "block_norms": list(family.block_norms),
        "qk_norm": family.qk_norm,
        "qkv_bias": _flag(family.qkv_bias, config),
        "activation": str(activation),
        "embedding_scale": _embedding_scale(family, config),
        "attention_scale": _attention_scale(family, config, head_dim),
        "residual_multiplier": float(_field(config, family.residual_multiplier, 1.0)),
        "logits_divisor": float(_field(config, family.logits_divisor, 1.0)),
        "attention_softcap": float(_field(config, family.attention_softcap, 0.0) or 0.0),
        "final_softcap": float(_field(config, family.final_softcap, 0.0) or 0.0),
        "rope": rope_of(family, config, head_dim),
        "tied_head": bool(getattr(config, "tie_word_embeddings", False)),
        "moe": moe_of(family, config),
        "genai_type": family.genai_type or family.name,
    }
