"""Phi-3 / Phi-4-mini: fused qkv and gate_up weights, optional partial rotary (partial_rotary_factor), a
sliding window on every layer when set."""

from onnxlm.frontend.families.base import Family

FAMILY = Family("phi3", qkv_bias="never", windows="all", gguf="phi3")
