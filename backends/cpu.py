"""The CPU execution provider: session options for decoding on a few cores."""

from __future__ import annotations

import os

PROVIDERS = ["CPUExecutionProvider"]


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def session_options(threads: int | None = None, profile: bool = False):
    """Intra-op threads = the cores we may use; one inter-op thread (a decoder graph is a chain).

    Spinning threads are turned off: between decode steps the Python loop runs, and spinning workers would
    steal its core on a 2-core machine.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or default_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.enable_profiling = profile
    return opts


def lower(model) -> dict[str, int]:
    """EP-specific lowering. The CPU EP runs the portable graph as it is; nothing to change yet."""
    return {}
