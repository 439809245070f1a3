"""The contract of a backend: how an artifact meets one ONNX Runtime execution provider.

A backend holds the provider list and its options, the session options, the device on which IO binding
allocates (the KV cache, the logits), and the passes that lower a graph for it. Those passes are ordinary recipe
entries: `optimize --ep NAME` appends them to the recipe, so the pass manager checks them and the manifest
records them, with the backend as the artifact's "target". A new EP is one module here with one subclass.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from onnxlm.errors import OnnxlmError, first_line

FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
PINNINGS = ("default", "none", "compact", "cores")


@dataclasses.dataclass(frozen=True)
class SessionSettings:
    """How ORT schedules one session on the host's cores. Plain data: `onnxlm tune-session` measures candidates
    and records the fastest in the manifest ("session"), which `load` applies (runtime/session_settings.py).

    - threads: intra-op threads (None: the backend's default; on the CPU, ORT's count, one per physical core);
    - spinning: idle intra-op (and inter-op) workers spin instead of sleeping (session.*.allow_spinning);
    - pinning: where the intra-op workers run (session.intra_op_thread_affinities): "default" (the backend's:
      ORT pins its workers when it picks the count), "none" (the count as given, unpinned), "compact" (worker i
      on the i-th usable logical CPU after the caller's), "cores" (one worker per physical core before any
      SMT sibling; differs from compact only on SMT machines);
    - parallel: ORT_PARALLEL execution (independent nodes at once), with `inter_op_threads` (None: ORT's).
    """

    threads: int | None = None
    spinning: bool = True
    pinning: str = "default"
    parallel: bool = False
    inter_op_threads: int | None = None

    def __post_init__(self):
        if self.pinning not in PINNINGS:
            raise OnnxlmError(f"unknown pinning '{self.pinning}' (pinnings: {', '.join(PINNINGS)})")
        for name in ("threads", "inter_op_threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise OnnxlmError(f"session option {name} must be an integer >= 1, got {value!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "session options") -> SessionSettings:
        """From plain data (a manifest, a search space); unknown keys and wrong types are one line."""
        known = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(data, dict) or set(data) - set(known):
            unknown = sorted(set(data) - set(known)) if isinstance(data, dict) else data
            raise OnnxlmError(f"{where}: unknown key(s) {unknown} (known: {', '.join(known)})")
        if not isinstance(data.get("spinning", True), bool) or not isinstance(data.get("parallel", False), bool):
            raise OnnxlmError(f"{where}: spinning and parallel must be true or false")
        return cls(**data)

    def label(self) -> str:
        """A short description for tables: "2 threads, spinning, pinned compact, sequential"."""
        threads = "default threads" if self.threads is None else f"{self.threads} thread{'s' * (self.threads > 1)}"
        mode = (f"parallel ({self.inter_op_threads or 'default'} inter-op)" if self.parallel else "sequential")
        pinning = {"default": "default pinning", "none": "unpinned"}.get(self.pinning, f"pinned {self.pinning}")
        return f"{threads}, {'spinning' if self.spinning else 'no spinning'}, {pinning}, {mode}"


def kv_dtype(session) -> type:
    """The float type of a decoder session's KV cache (float16 after convert_float16, else float32)."""
    types = {i.type for i in session.get_inputs() if i.name.startswith("past_key_values.")}
    return FLOAT_TYPES.get(types.pop() if len(types) == 1 else "tensor(float)", np.float32)


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    providers: tuple[str, ...]  # in ORT's order of preference; CPU last as the fallback for unassigned nodes
    device: str = "cpu"  # where OrtValues bound for a step live: "cpu", "cuda", ...
    provider_options: tuple[dict, ...] = ()  # one dict per provider, or empty for ORT's defaults
    lowering: tuple[dict, ...] = ()  # recipe entries ({"pass": NAME, ...}) appended for this EP
    # decode steps bind inputs and logits as OrtValues on `device`, allocated once per cache (fixed addresses, the
    # logits stay there): runtime/device_step.py
    device_binding: bool = False
    graph_capture: bool = False  # with device_binding: decode steps may be captured and replayed as device graphs
    install: str = ""  # how to get the EP, for the error when this onnxruntime lacks it
    # optimize --ep NAME on a machine without the EP builds anyway, checking on the CPU (the lowering gives plain
    # ONNX that the CPU EP runs exactly, as the static graphs); otherwise that takes --cross
    builds_anywhere: bool = False

    def missing(self) -> str | None:
        """Why this machine cannot run the EP, in one line that names the missing piece; None when it can."""
        import onnxruntime as ort

        if self.providers[0] in ort.get_available_providers():
            return None
        return (f"this onnxruntime has no {self.providers[0]} (it has {', '.join(ort.get_available_providers())})"
                + (f"; {self.install}" if self.install else ""))

    def available(self) -> bool:
        """Whether this machine can run the EP (its onnxruntime build has it, and what it needs is present)."""
        return self.missing() is None

    def require(self, fallback: str = "run the artifact with --ep cpu") -> None:
        """One-line error naming what is missing for this EP, and what to do instead."""
        reason = self.missing()
        if reason is not None:
            raise OnnxlmError(f"{reason}: {fallback}")

    def run_options(self, graph_id: int | None = None):
        """ORT RunOptions for one step: `graph_id` is the decode batch size on a backend that captures decode
        steps as device graphs (None: an uncaptured step, e.g. a prefill). None where nothing needs setting."""
        return None

    def session_options(self, settings: SessionSettings = SessionSettings(), profile: bool = False):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.enable_profiling = profile
        return options

    def session_provider_options(self, decoder: bool) -> list[dict] | None:
        """The provider options of one session; `decoder`: the runtime's decoder session (not a pass's check)."""
        return list(self.provider_options) or None

    def session(self, path: Path, settings: SessionSettings = SessionSettings(), profile: bool = False,
                decoder: bool = False, as_written: bool = False):
        """An InferenceSession of the graph at `path` on this EP, scheduled by `settings`; one-line error when ORT
        refuses it, or when it silently fell back to another provider (ORT does that when an EP's libraries fail
        to load). `as_written`: ORT's basic graph optimizations only, none of its EP-specific fusions (which may
        change the numerics)."""
        import onnxruntime as ort

        self.require()
        try:
            options = self.session_options(settings, profile)
            if as_written:
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            session = ort.InferenceSession(str(path), sess_options=options, providers=list(self.providers),
                                           provider_options=self.session_provider_options(decoder))
        except Exception as exc:
            raise OnnxlmError(f"ONNX Runtime cannot load {path}: {first_line(exc)}") from None
        if self.providers[0] not in session.get_providers():
            raise OnnxlmError(f"ONNX Runtime did not start {self.providers[0]} for {path} (it fell back to "
                              f"{', '.join(session.get_providers())}): run the artifact with --ep cpu")
        return session

    def target(self, probe: Backend) -> dict:
        """The manifest's "target": this backend, and the one the pass manager's probe ran on."""
        return {"ep": self.name, "providers": list(self.providers), "device": self.device,
                "probe_providers": list(probe.providers)}
