"""Dynamic early exit in decode (AdaInfer, arXiv 2403.02181), on an artifact built with the early-exit recipe.

The graph exposes one exit after layer k (passes/layers/exits.py) as three segments in DIR/exits/: `lower`
(layers < k, returns the stream r_k and the drift ||r_k - r_{k-1}|| / ||r_{k-1}||), `upper` (layers >= k and the
head) and `head` (final norm and LM head). The runtime decides: a decode step runs `lower`; when the drift is
below the threshold the token exits, its logits come from `head` on r_k, and `upper` does not run.

KV policy, lazy recompute: an exited token still owes K/V to layers >= k. Its r_k is kept, and the next step
that does not exit runs `upper` on the pending r_k's and its own at once (one call, several positions), which
writes exactly the K/V the full model would have written: only the exited token's own logits are approximate.
The deep layers' FLOPs are deferred, not saved; the time saved is the deep layers' weight reads on exit steps
(decode is memory-bound, so the catch-up call costs about what a one-token call does). Prefill runs model.onnx.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from onnxlm.artifact import EXIT_DRIFT as DRIFT
from onnxlm.artifact import EXIT_HIDDEN as HIDDEN
from onnxlm.artifact import EXITS_DIR
from onnxlm.errors import OnnxlmError
from onnxlm.runtime.execution import Executor
from onnxlm.runtime.generate import generate_with
from onnxlm.runtime.kv_cache import KVCache
from onnxlm.runtime.perplexity import perplexity
from onnxlm.runtime.sampling import Sampler
from onnxlm.runtime.session import DecoderSession

FEATURE = "early_exit"  # declared by passes/layers/exits.py


class Segment:
    """One graph of exits/ in an ORT session; runs with IO binding on (a subset of) the shared KV buffers."""

    def __init__(self, path: Path, model: DecoderSession):
        # The segments take turns on the same cores: no spinning workers (see backends/cpu.py).
        self.session = model.backend.session(path, dataclasses.replace(model.settings, spinning=False))
        self.inputs = {i.name for i in self.session.get_inputs()}
        index = {name: i for i, name in enumerate(model.kv_input_names)}
        self.kv = [(index[n], n, n.replace("past_key_values.", "present.")) for n in model.kv_input_names
                   if n in self.inputs]

        self.bound = (None, None)  # (cache, its IO binding): the KV buffers are bound once per cache

    def run(self, feeds: dict[str, np.ndarray], cache: KVCache, outputs: list[str]) -> list[np.ndarray]:
        io = self._binding(cache, outputs)
        for name in outputs:  # anew each step: their shapes change
            io.bind_output(name, "cpu")
        for name, array in feeds.items():
            if name in self.inputs:
                io.bind_cpu_input(name, np.ascontiguousarray(array))
        self.session.run_with_iobinding(io)
        return [v.numpy() for v in io.get_outputs()[: len(outputs)]]

    def _binding(self, cache: KVCache, outputs: list[str]):
        if self.bound[0] is cache:
            return self.bound[1]
        io = self.session.io_binding()
        for name in outputs:  # bound first, so they come first out of get_outputs
            io.bind_output(name, "cpu")
        for i, past, present in self.kv:  # the same buffer as past and present: GQA writes in place
            io.bind_ortvalue_input(past, cache.values[i])
            io.bind_ortvalue_output(present, cache.values[i])
        self.bound = (cache, io)
        return io


class ExitSegments:
    def __init__(self, model: DecoderSession):
        directory = model.directory / EXITS_DIR
        if not directory.is_dir() or not model.shared_kv or not model.interface.has(FEATURE):
            raise OnnxlmError(f"{model.directory} has no {EXITS_DIR}/: --exit-threshold needs an artifact built "
                              f"with `onnxlm optimize ... --recipe early-exit`")
        self.lower, self.upper, self.head = (Segment(directory / f"{n}.onnx", model) for n in ("lower", "upper", "head"))
        self.layer = len(self.lower.kv) // 2  # the exit: after layers 0..layer-1


@dataclasses.dataclass
class ExitState:
    """Where the two halves of the cache are: `lower` positions written by layers < k, `upper` by the rest; the
    r_k of the tokens in between (exited, their deep K/V pending)."""

    lower: int
    upper: int
    pending: list = dataclasses.field(default_factory=list)
    steps: int = 0
    exits: int = 0


def exit_step(segments: ExitSegments, cache: KVCache, state: ExitState, token: int, threshold: float) -> np.ndarray:
    """Decode `token` at position state.lower; return its logits (vocab,), from the exit if the drift is low."""
    position = state.lower
    hidden, drift = segments.lower.run({"input_ids": np.array([[token]], np.int64),
                                        "position_ids": np.array([[position]], np.int64),
                                        "attention_mask": np.ones((1, position + 1), np.int64)},
                                       cache, [HIDDEN, DRIFT])  # (1, 1, hidden), (1, 1)
    state.lower += 1
    state.steps += 1
    state.pending.append(hidden[0])  # (1, hidden)
    if float(drift[0, 0]) < threshold:
        state.exits += 1
        return segments.head.run({"hidden": hidden}, cache, ["logits"])[0][0, -1]
    pending = np.concatenate(state.pending)[None]  # (1, p, hidden)
    positions = np.arange(state.upper, state.upper + pending.shape[1], dtype=np.int64)[None]
    logits = segments.upper.run({"hidden": pending, "position_ids": positions,
                                 "attention_mask": np.ones((1, state.lower), np.int64)}, cache, ["logits"])[0]
    state.upper, state.pending = state.lower, []
    return logits[0, -1]


class EarlyExit(Executor):
    """Decode steps that may exit after layer k; the prompt runs model.onnx. A perplexity scores each window's
    first token through model.onnx, then one token per decode step (teacher-forced), each predicted from the exit
    or the full depth as the signal decides."""

    def __init__(self, model: DecoderSession, segments: ExitSegments, threshold: float):
        super().__init__(model)
        self.segments, self.threshold, self.state = segments, threshold, None

    def prefill(self, ids, all_logits=False, scoring=False):
        logits = self.model.step(np.asarray([ids], np.int64), self.cache, last_only=not all_logits,
                                 scoring=scoring)[0]  # (n or 1, vocab)
        self.state = ExitState(lower=self.cache.length, upper=self.cache.length)
        return logits if all_logits else logits[-1]

    def decode(self, token):
        return exit_step(self.segments, self.cache, self.state, token, self.threshold)

    def first_block(self, n):
        return 1

    def _fold(self) -> None:
        """The run's totals also count the last cache's decode steps and exits."""
        if self.state is not None:
            for key in ("steps", "exits"):
                self.totals[key] = self.totals.get(key, 0) + getattr(self.state, key)
            self.state = None
        super()._fold()

    def report(self):
        report = super().report()
        exit_rate = self.totals.get("exits", 0) / max(self.totals.get("steps", 0), 1)
        return {**report, "exit_threshold": self.threshold, "exit_rate": exit_rate, "exit_layer": self.segments.layer}


def exit_generate(model: DecoderSession, segments: ExitSegments, prompt_ids: list[int], max_new_tokens: int,
                  threshold: float, stop_ids: tuple[int, ...] = (), sampler: Sampler | None = None):
    """Greedy or sampled decoding with early exit."""
    return generate_with(EarlyExit(model, segments, threshold), prompt_ids, max_new_tokens, stop_ids, sampler)


def exit_perplexity(model: DecoderSession, segments: ExitSegments, token_ids: list[int], threshold: float,
                    window: int = 512) -> dict:
    """PPL with early exit (EarlyExit's protocol)."""
    return perplexity(EarlyExit(model, segments, threshold), token_ids, window)
