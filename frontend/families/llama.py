"""Llama 1-3 (and SmolLM2): pre-norm RMSNorm blocks, RoPE (llama3 / linear / yarn scaling), SwiGLU."""

from onnxlm.frontend.families.base import Family

FAMILY = Family("llama", gguf="llama")
