"""The CUDA execution provider (package onnxruntime-gpu): NVIDIA GPUs.

- Provider options: the GPU (`device_id`), an arena that grows by what is asked (the KV buffers are allocated
  once, at their full size), and `enable_cuda_graph` on the runtime's decoder session only: its decode steps are
  captured once per batch size (run option `gpu_graph_id`) and replayed; prefills run uncaptured (`-1`). The
  pass manager's sessions feed fresh numpy arrays of changing shapes, which a captured graph cannot take.
- Device "cuda": the runtime allocates the KV cache, the decode step's inputs and the logits there once per cache,
  at fixed addresses (what replaying a captured graph needs), and binds them by IO binding (runtime/session.py).
- Lowering: `decode_shapes`, which makes the decode step's shapes and host-side values independent of the step
  (GroupQueryAttention's total_sequence_length from the attention mask's width, the rotary cache at its full
  length), as a captured graph needs. The precision is the recipe's (`fp16`, `int4-cuda`), not the backend's.

What is missing is found before anything is built or loaded: the package (onnxruntime is the CPU build), the
NVIDIA driver (libcuda), or the CUDA libraries onnxruntime-gpu links against. ORT itself does not fail on the last
two: it logs an error and silently runs on the CPU.

Nothing here has run on a GPU yet (docs/cuda.md).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import sys
from pathlib import Path

from onnxlm.backends.base import Backend, SessionSettings
from onnxlm.errors import first_line

GPU_INSTALL = "pip uninstall -y onnxruntime && pip install \"onnxruntime-gpu>=1.31,<1.33\""


def installed(distribution: str) -> bool:
    from importlib import metadata

    try:
        metadata.version(distribution)
        return True
    except metadata.PackageNotFoundError:
        return False


@functools.lru_cache(maxsize=1)
def cuda_libraries_problem() -> str | None:
    """Why onnxruntime-gpu's CUDA provider cannot load here (driver, then libraries), or None. Loading the
    provider library is what ORT does at session creation; doing it first turns ORT's silent CPU fallback into
    an error that names the missing file."""
    import onnxruntime

    driver = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        ctypes.CDLL(driver)
    except OSError:
        return f"no NVIDIA driver on this machine ({driver} cannot be loaded)"
    capi = Path(onnxruntime.__file__).parent / "capi"
    shared, provider = (("onnxruntime_providers_shared.dll", "onnxruntime_providers_cuda.dll")
                        if sys.platform == "win32" else
                        ("libonnxruntime_providers_shared.so", "libonnxruntime_providers_cuda.so"))
    try:
        ctypes.CDLL(str(capi / shared), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(capi / provider))
    except OSError as exc:
        return (f"onnxruntime-gpu {onnxruntime.__version__} cannot load its CUDA libraries ({first_line(exc)}; "
                f"see README: GPU install)")
    return None


@dataclasses.dataclass(frozen=True)
class CudaBackend(Backend):
    name: str = "cuda"
    providers: tuple[str, ...] = ("CUDAExecutionProvider", "CPUExecutionProvider")
    device: str = "cuda"
    provider_options: tuple[dict, ...] = ({"device_id": "0", "arena_extend_strategy": "kSameAsRequested"}, {})
    lowering: tuple[dict, ...] = ({"pass": "decode_shapes"},)
    device_binding: bool = True
    graph_capture: bool = True  # capture the decoder session's decode steps (enable_cuda_graph, gpu_graph_id)

    def missing(self) -> str | None:
        import onnxruntime as ort

        if super().missing() is None:
            return cuda_libraries_problem()
        if installed("onnxruntime") and installed("onnxruntime-gpu"):
            return ("onnxruntime and onnxruntime-gpu are both installed and the CPU build's files won: reinstall "
                    "one of them (pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu)")
        return (f"this onnxruntime {ort.__version__} is the CPU build, without CUDAExecutionProvider: install "
                f"the package onnxruntime-gpu in its place ({GPU_INSTALL})")

    def session_provider_options(self, decoder: bool) -> list[dict]:
        cuda, *rest = self.provider_options
        graph = "1" if decoder and self.graph_capture else "0"
        return [{**cuda, "enable_cuda_graph": graph}, *rest]

    def session_options(self, settings: SessionSettings = SessionSettings(), profile: bool = False):
        """All graph optimizations, sequential execution; the host threads only feed the GPU, so one thread
        and no spinning (a spinning pool would take a core from the decoding loop)."""
        import onnxruntime as ort

        opts = super().session_options(settings, profile)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.intra_op_num_threads = settings.threads or 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return opts

    def run_options(self, graph_id: int | None = None):
        """`gpu_graph_id`: one captured graph per decode batch size; -1 runs a step uncaptured (prefill)."""
        import onnxruntime as ort

        if not self.graph_capture:
            return None
        options = ort.RunOptions()
        options.add_run_config_entry("gpu_graph_id", str(-1 if graph_id is None else graph_id))
        return options
