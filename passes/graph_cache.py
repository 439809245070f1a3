"""The graph after a recipe prefix, kept on disk so that builds sharing that prefix skip the export and its passes.

An entry is keyed by the source's hash, the onnxlm version and the prefix's pass specs; it holds the graph (with
external data), the prefix's pass reports, and the model facts, interface and tokenizer after it. `onnxlm tune`
uses it:
every trial shares at least the export and the first cleanup, which take most of a SmolLM2 build. A build that
resumes from an entry runs the rest of its recipe exactly as an uninterrupted build would (the manager checks the
first remaining pass against the loaded graph) and with onnx-ir's name counters restored, so its artifact is
byte-identical (tests check a resume after the first pass and after the base recipe).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

GRAPH = "graph.onnx"
TOKENIZER = "tokenizer.json"


def names_of(graph) -> dict:
    """The state of the graph's name authority (onnx-ir's counters and the names it has handed out): the passes
    after a resume must name new nodes and values exactly as they would have without the save and load."""
    authority = graph._name_authority
    return {"value_counter": authority._value_counter, "node_counter": authority._node_counter,
            "value_names": sorted(authority._value_names), "node_names": sorted(authority._node_names)}


def restore_names(graph, names: dict) -> None:
    authority = graph._name_authority
    authority._value_counter, authority._node_counter = names["value_counter"], names["node_counter"]
    authority._value_names, authority._node_names = set(names["value_names"]), set(names["node_names"])


class GraphCache:
    def __init__(self, directory: Path, snapshots: tuple[int, ...] = (1,)):
        self.directory = Path(directory)
        self.snapshots = snapshots  # prefix lengths worth saving (1: after the export and the first pass)

    def _entry(self, source_sha: str, passes: list) -> Path:
        from onnxlm import __version__

        specs = [p.to_dict() for p in passes]
        key = hashlib.sha256(json.dumps([source_sha, __version__, specs], sort_keys=True).encode()).hexdigest()
        return self.directory / key[:24]

    def lookup(self, source_sha: str, passes: list):
        """(k, graph, reports, info dict, interface dict, tokenizer or None) for the longest cached prefix of
        `passes`, or None. The tokenizer is the one after the prefix (trim_vocab changes it)."""
        import onnx_ir as ir

        from onnxlm.schema import read_tokenizer

        for k in range(len(passes), 0, -1):
            entry = self._entry(source_sha, passes[:k])
            if (entry / "state.json").is_file():
                state = json.loads((entry / "state.json").read_text())
                model = ir.load(entry / GRAPH)
                restore_names(model.graph, state["names"])
                tokenizer = read_tokenizer(entry / TOKENIZER) if (entry / TOKENIZER).is_file() else None
                return k, model, state["reports"], state["info"], state["interface"], tokenizer
        return None

    def save(self, source_sha: str, passes: list, model, reports: list, info: dict, interface: dict,
             tokenizer=None) -> None:
        """Keep the graph after `passes` (a prefix) when its length is one of the snapshots, with the tokenizer
        after them (a pass may have changed it: trim_vocab)."""
        import onnx_ir as ir

        entry = self._entry(source_sha, passes)
        if len(passes) not in self.snapshots or (entry / "state.json").is_file():
            return
        # written aside and renamed into place: builds in other processes (tune --ray) may save or read it too
        staging = entry.with_name(f".{entry.name}.{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        ir.save(model, staging / GRAPH, external_data=GRAPH + ".data")
        if tokenizer is not None:
            tokenizer.save(str(staging / TOKENIZER))
        state = {"reports": reports, "info": info, "interface": interface, "names": names_of(model.graph)}
        (staging / "state.json").write_text(json.dumps(state))
        if entry.exists() and not (entry / "state.json").is_file():  # left incomplete by a killed build
            shutil.rmtree(entry, ignore_errors=True)
        try:
            staging.rename(entry)
        except OSError:  # another build saved the same entry first
            shutil.rmtree(staging, ignore_errors=True)
