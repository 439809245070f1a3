"""Granite 3: llama's block with multipliers on the embedding, the attention scores, each residual branch and the
logits."""

from onnxlm.frontend.families.base import Family

FAMILY = Family("granite", embedding_scale="embedding_multiplier", attention_scale="attention_multiplier",
                residual_multiplier="residual_multiplier", logits_divisor="logits_scaling",
                required=("embedding_multiplier", "attention_multiplier", "residual_multiplier", "logits_scaling"))
