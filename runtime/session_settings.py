"""Which session settings a loaded artifact runs with: an explicit request, else the options `onnxlm tune-session`
recorded in its manifest for this machine, else the backend's defaults.

The manifest's "session" entry (plain data, written by tune_session.record):

    {"options": {"threads": 2, "spinning": true, "pinning": "compact", "parallel": false, "inter_op_threads": null},
     "machine": {"cpu": "AMD EPYC", "cores": 2}, "measured": [...the table the options were chosen from...]}

The rule: the recorded options are applied only on a machine with the same CPU model and the same number of usable
logical CPUs (lscpu's model name; `os.sched_getaffinity`, so a `taskset` to fewer cores counts as another machine);
elsewhere they are ignored, with one warning per artifact and process. An explicit `threads` (or `session`
settings) replaces them entirely; `spinning=False` (sessions that take turns on the same cores) turns spinning off
on top of whatever applies.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import platform
import subprocess

from onnxlm.backends.base import SessionSettings
from onnxlm.backends.cpu import usable_cores
from onnxlm.errors import OnnxlmError

log = logging.getLogger(__name__)
_warned: set[str] = set()  # artifacts whose recorded options this process already said it ignores


@functools.cache
def cpu_model() -> str:
    """The CPU's model name as lscpu gives it (on ARM lscpu names the core from its part id, which /proc/cpuinfo
    lacks); the platform's processor string where lscpu is missing."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, env={"LC_ALL": "C"}).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return fields.get("Model name", "").strip() or platform.processor() or platform.machine() or "unknown"


def this_machine() -> dict:
    """What recorded options are keyed by: the CPU model and the logical CPUs this process may use."""
    return {"cpu": cpu_model(), "cores": usable_cores()}


def recorded(manifest: dict, where: str) -> SessionSettings | None:
    """The manifest's recorded options when they were measured on this machine; None otherwise (one warning per
    artifact and process when they were measured elsewhere)."""
    entry = manifest.get("session")
    if not entry:
        return None
    here = this_machine()
    if entry["machine"] != here:
        if where not in _warned:
            _warned.add(where)
            there = entry["machine"]
            log.warning(f"{where}: its session options were measured on {there['cpu']} with {there['cores']} "
                        f"cores, this is {here['cpu']} with {here['cores']}: using the defaults (re-measure with "
                        f"`onnxlm tune-session {where}`)")
        return None
    return SessionSettings.from_dict(entry["options"], f"{where}: manifest session options")


def resolve(manifest: dict, where: str, threads: int | None = None, spinning: bool = True,
            session: SessionSettings | None = None) -> SessionSettings:
    """The settings a session of this artifact opens with (the rule in this module's docstring)."""
    if threads is not None and session is not None:
        raise OnnxlmError("give threads or session settings, not both")
    if session is not None:
        settings = session
    elif threads is not None:
        settings = SessionSettings(threads=threads)
    else:
        settings = recorded(manifest, where) or SessionSettings()
    return settings if spinning else dataclasses.replace(settings, spinning=False)
