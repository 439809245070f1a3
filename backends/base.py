"""The contract of a backend: how an artifact meets one ONNX Runtime execution provider.

A backend holds the provider list and its options, the session options, the device on which IO binding
allocates (the KV cache, the logits), and the passes that lower a graph for it. Those passes are ordinary recipe
entries: `optimize --ep NAME` appends them to the recipe, so the pass manager checks them and the manifest
records them, with the backend as the artifact's "target". A new EP is one module here with one subclass.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from onnxlm.errors import OnnxlmError, first_line


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    providers: tuple[str, ...]  # in ORT's order of preference; CPU last as the fallback for unassigned nodes
    device: str = "cpu"  # where OrtValues bound for a step live: "cpu", "cuda", ...
    provider_options: tuple[dict, ...] = ()  # one dict per provider, or empty for ORT's defaults
    lowering: tuple[dict, ...] = ()  # recipe entries ({"pass": NAME, ...}) appended for this EP
    install: str = ""  # how to get the EP, for the error when this onnxruntime lacks it

    def available(self) -> bool:
        """Whether this machine's onnxruntime build has the EP."""
        import onnxruntime as ort

        return self.providers[0] in ort.get_available_providers()

    def session_options(self, threads: int | None = None, profile: bool = False, spinning: bool = True):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.enable_profiling = profile
        return options

    def session(self, path: Path, threads: int | None = None, profile: bool = False, spinning: bool = True,
                as_written: bool = False):
        """An InferenceSession of the graph at `path` on this EP; one-line error when ORT refuses it. `as_written`:
        ORT's basic graph optimizations only, none of its EP-specific fusions (which may change the numerics)."""
        import onnxruntime as ort

        if not self.available():
            raise OnnxlmError(f"this onnxruntime has no {self.providers[0]} (it has "
                              f"{', '.join(ort.get_available_providers())}): run the artifact with --ep cpu"
                              + (f", or {self.install}" if self.install else ""))
        try:
            options = self.session_options(threads, profile, spinning)
            if as_written:
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            return ort.InferenceSession(str(path), sess_options=options,
                                        providers=list(self.providers),
                                        provider_options=list(self.provider_options) or None)
        except Exception as exc:
            raise OnnxlmError(f"ONNX Runtime cannot load {path}: {first_line(exc)}") from None

    def target(self, probe: Backend) -> dict:
        """The manifest's "target": this backend, and the one the pass manager's probe ran on."""
        return {"ep": self.name, "providers": list(self.providers), "device": self.device,
                "probe_providers": list(probe.providers)}
