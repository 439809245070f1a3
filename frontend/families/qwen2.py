"""Qwen2 / 2.5: llama's block with q/k/v biases; sliding windows only with use_sliding_window (layer_types)."""

from onnxlm.frontend.families.base import Family

FAMILY = Family("qwen2", qkv_bias="always", windows="layer_types", gguf="qwen2")
