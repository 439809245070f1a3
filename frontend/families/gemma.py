"""Gemma: (1 + w) RMSNorm, embedding scaled by sqrt(hidden_size), GeGLU (tanh GELU)."""

from onnxlm.frontend.families.base import Family, RMS_ONE_PLUS

FAMILY = Family("gemma", norm=RMS_ONE_PLUS, embedding_scale="sqrt_hidden")
