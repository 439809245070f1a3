"""Qwen3: llama's block with an RMSNorm on each query and key head before RoPE."""

from onnxlm.frontend.families.base import Family

FAMILY = Family("qwen3", qk_norm="head", windows="layer_types", gguf="qwen3")
