"""The CPU execution provider: session options for decoding on a few cores. It runs the portable lowered graph
as it is, so it adds no lowering passes."""

from __future__ import annotations

import dataclasses
import os

from onnxlm.backends.base import Backend


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclasses.dataclass(frozen=True)
class CpuBackend(Backend):
    name: str = "cpu"
    providers: tuple[str, ...] = ("CPUExecutionProvider",)

    def session_options(self, threads: int | None = None, profile: bool = False, spinning: bool = True):
        """ORT's defaults, which measured fastest for decode here.

        - Threads: when `threads` is None or covers every usable core, ORT picks the count itself and pins its
          threads to cores; an explicit count of the same size leaves them unpinned and measured about 8% slower
          per decode step on 2 cores. A smaller count is set as given.
        - Spinning workers on: turning spinning off cost about 10% decode tok/s on 2 cores. Off (`spinning=False`)
          for sessions that take turns, as a speculative target and its draft model do: each session's idle
          workers would spin on the cores the other one is computing on.
        - Sequential execution (a decoder graph is a chain) and all graph optimizations.
        - Errors only in the log: a run-time switch (La RoSA's `sparsify_all_positions`) is an initializer that is
          also a graph input on purpose, which ORT would warn about at every load.
        """
        import onnxruntime as ort

        opts = super().session_options(threads, profile, spinning)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.intra_op_num_threads = 0 if threads is None or threads >= usable_cores() else threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        return opts
