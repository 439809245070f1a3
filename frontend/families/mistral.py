"""Mistral: llama's block, a sliding window on every layer when config.sliding_window is set."""

from onnxlm.frontend.families.base import Family

FAMILY = Family("mistral", qkv_bias="never", windows="all")  # llama.cpp writes Mistral GGUFs as llama
