"""The CPU execution provider: session options for decoding on a few cores. It runs the portable lowered graph
as it is, so it adds no lowering passes."""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

from onnxlm.backends.base import Backend, SessionSettings


def usable_cpus() -> list[int]:
    """The logical CPUs this process may run on, in order."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def usable_cores() -> int:
    return len(usable_cpus())


@functools.cache
def physical_core(cpu: int) -> tuple[int, int]:
    """(package, core) of a logical CPU, from sysfs; (0, cpu) where sysfs does not say (no SMT assumed)."""
    topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
    try:
        return (int((topology / "physical_package_id").read_text()), int((topology / "core_id").read_text()))
    except (OSError, ValueError):
        return (0, cpu)


def worker_cpus(pinning: str) -> list[int]:
    """The usable logical CPUs in the order workers are pinned to them: "compact" in CPU order, "cores" one per
    physical core first (SMT siblings after)."""
    cpus = usable_cpus()
    if pinning == "cores":
        seen, first, rest = set(), [], []
        for cpu in cpus:
            (rest if physical_core(cpu) in seen else first).append(cpu)
            seen.add(physical_core(cpu))
        cpus = first + rest
    return cpus


def affinity(pinning: str, threads: int) -> str:
    """ORT's session.intra_op_thread_affinities for `threads` intra-op threads: one entry per worker (the
    caller's thread is the first intra-op thread and is not pinned), 1-based logical processor ids. Worker i
    (1, 2, ...) runs on `worker_cpus(pinning)[i]`: the first CPU is left to the caller's thread."""
    cpus = worker_cpus(pinning)
    return ";".join(str(cpus[i % len(cpus)] + 1) for i in range(1, threads))


@dataclasses.dataclass(frozen=True)
class CpuBackend(Backend):
    name: str = "cpu"
    providers: tuple[str, ...] = ("CPUExecutionProvider",)

    def session_options(self, settings: SessionSettings = SessionSettings(), profile: bool = False):
        """ORT's defaults, which measured fastest for decode here, unless `settings` say otherwise (a tuned
        artifact's recorded options, `onnxlm tune-session`).

        - Threads: with the default pinning, when `threads` is None or covers every usable core, ORT picks the
          count itself and pins its threads to cores; an explicit count of the same size leaves them unpinned and
          measured about 8% slower per decode step on 2 cores. A smaller count is set as given. Pinning "none"
          sets the count as given, unpinned; "compact" and "cores" pin each worker to one logical CPU.
        - Spinning workers on: turning spinning off cost about 10% decode tok/s on 2 cores. Off (`spinning=False`)
          for sessions that take turns, as a speculative target and its draft model do: each session's idle
          workers would spin on the cores the other one is computing on.
        - Sequential execution (a decoder graph is a chain; `parallel` runs independent nodes at once, with
          `inter_op_threads`) and all graph optimizations.
        - Errors only in the log: a run-time switch (La RoSA's `sparsify_all_positions`) is an initializer that is
          also a graph input on purpose, which ORT would warn about at every load.
        """
        import onnxruntime as ort

        opts = super().session_options(settings, profile)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_PARALLEL if settings.parallel else ort.ExecutionMode.ORT_SEQUENTIAL
        if settings.parallel and settings.inter_op_threads:
            opts.inter_op_num_threads = settings.inter_op_threads
        threads, cores = settings.threads, usable_cores()
        if settings.pinning == "default":
            opts.intra_op_num_threads = 0 if threads is None or threads >= cores else threads
        else:
            opts.intra_op_num_threads = threads or cores
            if settings.pinning != "none" and opts.intra_op_num_threads > 1:
                opts.add_session_config_entry("session.intra_op_thread_affinities",
                                              affinity(settings.pinning, opts.intra_op_num_threads))
        spin = "1" if settings.spinning else "0"
        opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
        opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
        return opts
