"""`onnxlm tune-session`: measure ORT's session options for one artifact on this machine and record the fastest.

After issue 23's references on thread-to-core allocation (SMT ARM), DVFS governors and heterogeneous scheduling,
the knobs ORT exposes: how many intra-op threads, whether idle workers spin (a spinning worker wakes at once and
keeps its core busy, which may also keep a DVFS governor from clocking it down), where the workers are pinned
(none, one per logical CPU in order, one per physical core before SMT siblings), and sequential or parallel
(inter-op) execution. The answer depends on the
machine, so it is measured there: every candidate (`candidates`) is loaded at once and timed round-robin in the
same process (each round starts one candidate later), decode tok/s and a 512-token prefill, medians of the
per-round ratios to ORT's defaults (the first candidate). The fastest on the objective is recorded in the
manifest (`record`: "session" = options, this machine, the table) only when it beats the defaults by at least
`min_gain`, else the defaults are recorded, so noise does not pick a setting. `load` then applies them on the
same machine (runtime/session_settings.py). `onnxlm tune` can search the same options as a dimension of its space.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
from collections.abc import Callable
from pathlib import Path

from onnxlm.backends.base import SessionSettings
from onnxlm.errors import OnnxlmError

OBJECTIVES = ("decode", "prefill")
DECODE_TOKENS = 64  # new tokens per timed decode (after a 32-token prompt)


def candidates(threads: list[int] | None = None) -> list[SessionSettings]:
    """The options measured on this machine, ORT's defaults first. Thread counts: `threads`, default 1, 2, 4, ...
    up to the usable logical CPUs and that count itself. Per count above 1: spinning on and off, unpinned and
    pinned compact (and pinned one per physical core on an SMT machine), and at every core ORT's own choice;
    then parallel execution with 2 inter-op threads at ORT's default count, spinning on and off."""
    from onnxlm.backends.cpu import usable_cores, usable_cpus, worker_cpus

    cores = usable_cores()
    if threads is None:
        threads = sorted({*(2**i for i in range(cores.bit_length()) if 2**i <= cores), cores})
    if not threads or any(t < 1 for t in threads):
        raise OnnxlmError(f"thread counts must be integers >= 1, got {threads}")
    smt = worker_cpus("cores") != usable_cpus()
    found = [SessionSettings()]
    for t in sorted(set(threads)):
        if t == 1:  # no workers: nothing spins or is pinned
            found.append(SessionSettings(threads=1, pinning="none"))
            continue
        for spinning in (True, False):
            # at every core, the default pinning is ORT's own choice (spinning: the first candidate)
            pinnings = ["default"] * (t >= cores and not spinning) + ["none", "compact"] + ["cores"] * smt
            found += [SessionSettings(threads=t, spinning=spinning, pinning=p) for p in pinnings]
    found += [SessionSettings(spinning=s, parallel=True, inter_op_threads=2) for s in (True, False)]
    return list(dict.fromkeys(found))


@dataclasses.dataclass
class Row:
    settings: SessionSettings
    decode_tok_s: float  # median over rounds
    prefill_s: float  # median over rounds
    decode_x: float  # median over rounds of decode tok/s / the defaults' in the same round
    prefill_x: float  # median over rounds of the defaults' prefill time / this one's

    def to_dict(self) -> dict:
        return {"options": self.settings.to_dict(), "decode_tok_s": self.decode_tok_s, "prefill_s": self.prefill_s,
                "decode_x": self.decode_x, "prefill_x": self.prefill_x}


def measure(directory: Path, settings: list[SessionSettings], runs: int = 5,
            say: Callable[[str], None] = lambda _m: None) -> list[Row]:
    """Every candidate loaded at once and timed round-robin (`runs` rounds after a warm-up each)."""
    import onnxlm
    from onnxlm.runtime.bench import PREFILL_TOKENS, PROMPT_TOKENS, bench_prompt, time_generation, time_prefill
    from onnxlm.runtime.decoding import executor_for

    if runs < 1:
        raise OnnxlmError(f"--runs must be at least 1, got {runs}")
    weights = sum(p.stat().st_size for p in Path(directory).glob("model.onnx*"))
    free = available_memory()
    if free and weights * len(settings) > free / 2:
        raise OnnxlmError(f"{len(settings)} sessions of {weights / 2**20:.0f} MB would take more than half of the "
                          f"{free / 2**30:.1f} GiB available: measure fewer thread counts (--threads)")
    say(f"loading {len(settings)} sessions")
    arts = [onnxlm.load(directory, session=s) for s in settings]
    short = bench_prompt(arts[0].tokenizer, PROMPT_TOKENS)
    long = bench_prompt(arts[0].tokenizer, min(PREFILL_TOKENS, arts[0].info.context_length))
    executors = [executor_for(a.session) for a in arts]
    for executor in executors:
        time_generation(executor, short, 4)  # warm-up: first-run allocations
        time_prefill(executor, long)
    times = [[] for _ in settings]  # per candidate: (decode tok/s, prefill s) per round
    for i in range(runs):
        say(f"round {i + 1}/{runs}")
        order = list(range(len(settings)))
        for k in order[i % len(order):] + order[: i % len(order)]:
            times[k].append((time_generation(executors[k], short, DECODE_TOKENS)[1], time_prefill(executors[k], long)))
    base = times[0]
    return [Row(s, statistics.median(d for d, _ in t), statistics.median(p for _, p in t),
                statistics.median(d / b[0] for (d, _), b in zip(t, base)),
                statistics.median(b[1] / p for (_, p), b in zip(t, base))) for s, t in zip(settings, times)]


def available_memory() -> int:
    """Bytes of memory available (Linux's MemAvailable), 0 where unknown."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return 0


def choose(rows: list[Row], objective: str = "decode", min_gain: float = 2.0) -> Row:
    """The fastest row on `objective` when it beats the defaults (rows[0]) by `min_gain` percent, else the
    defaults'."""
    if objective not in OBJECTIVES:
        raise OnnxlmError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective}")
    key = (lambda r: r.decode_x) if objective == "decode" else (lambda r: r.prefill_x)
    best = max(rows, key=key)
    return best if key(best) >= 1 + min_gain / 100 else rows[0]


def record(directory: Path, settings: SessionSettings | None, measured: list[dict] = (),
           machine: dict | None = None) -> None:
    """Write the manifest's "session" entry (None: remove it), replacing manifest.json atomically."""
    from onnxlm.artifact import read_manifest
    from onnxlm.runtime.session_settings import this_machine

    directory = Path(directory)
    manifest = read_manifest(directory)
    manifest.pop("session", None)
    if settings is not None:
        manifest["session"] = {"options": settings.to_dict(), "machine": machine or this_machine(),
                               "measured": list(measured)}
    staged = directory / f".manifest.{os.getpid()}.json"
    staged.write_text(json.dumps(manifest, indent=2) + "\n")
    staged.replace(directory / "manifest.json")


def tune_session(directory: Path, runs: int = 5, threads: list[int] | None = None, objective: str = "decode",
                 min_gain: float = 2.0, write: bool = True, say: Callable[[str], None] = lambda _m: None) -> dict:
    """Measure, choose, and (with `write`) record; returns {"rows", "chosen", "machine"}. Bad input is one line
    before anything is measured or written."""
    from onnxlm.artifact import read_manifest
    from onnxlm.runtime.session_settings import this_machine

    if objective not in OBJECTIVES:
        raise OnnxlmError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective}")
    if not (min_gain >= 0) or min_gain == float("inf"):
        raise OnnxlmError(f"--min-gain must be a percentage >= 0, got {min_gain}")
    target = read_manifest(directory)["target"]["ep"]  # an artifact, or one line
    if target != "cpu":
        raise OnnxlmError(f"session tuning measures the CPU EP's threads; {directory} targets {target}")
    rows = measure(Path(directory), candidates(threads), runs, say)
    chosen = choose(rows, objective, min_gain)
    if write:
        record(directory, chosen.settings, [r.to_dict() for r in rows])
    return {"rows": rows, "chosen": chosen, "machine": this_machine()}
