"""Backends: how an artifact meets an ONNX Runtime execution provider (providers, session options, and
EP-specific lowering). Only the CPU EP exists so far; CUDA and NPU-class providers go beside it."""

from __future__ import annotations

from onnxlm.backends import cpu
from onnxlm.errors import OnnxlmError

BACKENDS = {"cpu": cpu}


def get_backend(name: str):
    if name not in BACKENDS:
        raise OnnxlmError(f"unknown execution provider '{name}' (available: {', '.join(BACKENDS)})")
    return BACKENDS[name]
