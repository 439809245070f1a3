"""Backends: one per ONNX Runtime execution provider (base.py has the contract): the CPU EP, CUDA's, and OpenVINO's
(static NPU-class artifacts; `openvino:DEVICE` picks its device), each registered here."""

from __future__ import annotations

from onnxlm.backends.base import Backend
from onnxlm.backends.cpu import CpuBackend
from onnxlm.backends.cuda import CudaBackend
from onnxlm.backends.openvino import OpenVinoBackend, openvino_backend
from onnxlm.errors import OnnxlmError

BACKENDS: dict[str, Backend] = {b.name: b for b in [CpuBackend(), CudaBackend(), OpenVinoBackend()]}
CPU = BACKENDS["cpu"]


def get_backend(name: str) -> Backend:
    base, _, device = name.partition(":")
    if base == "openvino" and device:
        return openvino_backend(device)
    if name not in BACKENDS:
        raise OnnxlmError(f"unknown execution provider '{name}' (available: {', '.join(BACKENDS)})")
    return BACKENDS[name]


def probe_backend(target: Backend) -> Backend:
    """Where the pass manager runs its checks: the target EP when this machine has it, else the CPU."""
    return target if target.available() else CPU
