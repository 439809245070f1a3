"""The OpenVINO execution provider: Intel CPUs, GPUs and NPUs, through onnxruntime-openvino.

`--ep openvino` (device CPU) or `--ep openvino:GPU` / `openvino:NPU`. NPUs compile fixed shapes, so the lowering
is the `static_kv` pass (passes/lowering/static.py): the artifact's prefill.onnx and decode.onnx, which the
runtime's static executor runs. onnxruntime-openvino is a whole onnxruntime build that replaces the
`onnxruntime` module, so it lives in its own environment (docs/static.md); in an environment without it the
pass manager's checks run on the CPU EP and loading on this backend is a one-line error.
"""

from __future__ import annotations

import dataclasses

from onnxlm.backends.base import Backend, SessionSettings
from onnxlm.errors import OnnxlmError

DEVICES = ("CPU", "GPU", "NPU")


def openvino_devices() -> list[str]:
    """The OpenVINO devices this onnxruntime sees (onnxruntime-openvino's own list); none without the EP."""
    import onnxruntime as ort

    if "OpenVINOExecutionProvider" not in ort.get_available_providers():
        return []
    listing = getattr(ort.capi._pybind_state, "get_available_openvino_device_ids", None)
    return list(listing()) if listing else []


@dataclasses.dataclass(frozen=True)
class OpenVinoBackend(Backend):
    name: str = "openvino"
    providers: tuple[str, ...] = ("OpenVINOExecutionProvider", "CPUExecutionProvider")
    provider_options: tuple[dict, ...] = ({"device_type": "CPU"}, {})
    lowering: tuple[dict, ...] = ({"pass": "static_kv"},)
    install: str = "install onnxruntime-openvino in an environment of its own (README: OpenVINO install)"
    builds_anywhere: bool = True

    @property
    def device_type(self) -> str:
        return self.provider_options[0]["device_type"]

    def session(self, path, settings=SessionSettings(), profile=False, **options):
        seen = openvino_devices()
        if seen and not any(d.split(".")[0] == self.device_type for d in seen):
            raise OnnxlmError(f"OpenVINO device {self.device_type} is not available here (OpenVINO sees: "
                              f"{', '.join(seen)})")
        return super().session(path, settings, profile, **options)


def openvino_backend(device: str) -> OpenVinoBackend:
    """`openvino:DEVICE`; an unknown device name is one line."""
    if device not in DEVICES:
        raise OnnxlmError(f"unknown OpenVINO device '{device}' (devices: {', '.join(DEVICES)})")
    return OpenVinoBackend(name=f"openvino:{device}" if device != "CPU" else "openvino",
                           provider_options=({"device_type": device}, {}))
