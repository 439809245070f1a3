"""Gemma 3 (text): Gemma 2's block with q/k RMSNorm per head instead of soft-capping, sliding layers with their own
RoPE base (rope_local_base_freq)."""

from onnxlm.frontend.families.base import Family, POST_ATTENTION, POST_MLP, PRE_ATTENTION, PRE_MLP, RMS_ONE_PLUS

FAMILY = Family("gemma3_text", norm=RMS_ONE_PLUS, block_norms=(PRE_ATTENTION, POST_ATTENTION, PRE_MLP, POST_MLP),
                qk_norm="head", activation="hidden_activation", embedding_scale="sqrt_hidden",
                attention_scale="query_pre_attn_scalar", attention_softcap="attn_logit_softcapping",
                final_softcap="final_logit_softcapping", windows="layer_types", local_rope_theta="rope_local_base_freq",
                required=("query_pre_attn_scalar",), gguf="gemma3")
