"""Gemma 2: Gemma with pre- and post-norms around attention and MLP, query_pre_attn_scalar, attention and final logit
soft-capping, alternating sliding-window layers."""

from onnxlm.frontend.families.base import Family, POST_ATTENTION, POST_MLP, PRE_ATTENTION, PRE_MLP, RMS_ONE_PLUS

FAMILY = Family("gemma2", norm=RMS_ONE_PLUS, block_norms=(PRE_ATTENTION, POST_ATTENTION, PRE_MLP, POST_MLP),
                activation="hidden_activation", embedding_scale="sqrt_hidden",
                attention_scale="query_pre_attn_scalar", attention_softcap="attn_logit_softcapping",
                final_softcap="final_logit_softcapping", windows="layer_types", required=("query_pre_attn_scalar",),
                gguf="gemma2")
