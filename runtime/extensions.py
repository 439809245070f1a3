"""Step extensions: what a decode step binds and reads beyond a decoder's own inputs and outputs.

Each extension drives the ports of one feature of the artifact's interface (interface.py), found by role; the
session (session.py) builds one for each feature its artifact declares and calls the same four hooks on every
step, so the session and the KV cache hold no feature of their own. A feature with ports but no extension here
runs with its inputs' defaults, and a caller may still feed them (`DecoderSession.step(..., inputs=)`).

Hooks: `start` when a cache is made (per-cache state goes in cache.state[feature]), `bind` before a step,
`collect` after it, `report` to sum up a run. `hot = False` when every decode step must bind something, which
keeps decode off the preallocated fast path.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np

from onnxlm.errors import OnnxlmError
from onnxlm.interface import Port


def ort_value(array: np.ndarray):
    import onnxruntime as ort

    return ort.OrtValue.ortvalue_from_numpy(array)


@dataclasses.dataclass
class StepInfo:
    """One step as the extensions see it."""

    batch: int
    seq: int
    first_slot: int  # the cache slot of the first new token
    last_only: bool = False  # only the last position's logits are read
    scoring: bool = False  # every position should compute what a decode step computes (perplexity)
    ragged: bool = False  # rows at their own positions (a batch of requests)
    want: str | None = None  # the feature whose outputs the caller reads back
    result: Any = None  # what that feature's `collect` read


class StepExtension:
    feature: ClassVar[str]
    options: ClassVar[tuple[str, ...]] = ()  # keywords of `new_cache` this extension takes
    needs: ClassVar[str] = ""  # what to build when an option is given to an artifact without the feature
    hot: ClassVar[bool] = True
    max_step_tokens: ClassVar[int | None] = None  # longer steps are split into chunks of this many tokens

    def __init__(self, ports: dict[str, Port], info):
        self.ports, self.info = ports, info

    def start(self, cache, batch: int, capacity: int, **options) -> None:
        pass

    def bind(self, binding, cache, step: StepInfo) -> None:
        pass

    def collect(self, binding, cache, step: StepInfo) -> None:
        pass

    def stats(self, cache) -> dict[str, int]:
        """Counts of one cache's run, summed over a perplexity's windows and passed to `report`."""
        return {}

    def report(self, totals: dict[str, int], options: dict) -> dict:
        return {}


class LogitsToKeep(StepExtension):
    """A prefill whose other rows nobody reads asks for the last row only: the LM head skips the rest."""

    feature = "logits_to_keep"

    def __init__(self, ports, info):
        super().__init__(ports, info)
        self.values = {k: ort_value(np.array(k, np.int64)) for k in (0, 1)}  # all positions / the last

    def bind(self, binding, cache, step):
        binding.io.bind_ortvalue_input(self.ports["count"].name, self.values[int(step.last_only)])


class ScoreAsDecoded(StepExtension):
    """A graph whose decode path differs from its prefill (La RoSA's top-k): perplexity turns the decode path on
    for every position, so that one prefill scores what decoding token by token computes."""

    feature = "score_as_decoded"

    def __init__(self, ports, info):
        super().__init__(ports, info)
        self.values = {k: ort_value(np.array(k)) for k in (False, True)}

    def bind(self, binding, cache, step):
        binding.io.bind_ortvalue_input(self.ports["switch"].name, self.values[step.scoring])


@dataclasses.dataclass
class HaltState:
    halted: np.ndarray  # (batch, layers, capacity) bool: which slots skipped which layers
    threshold: float
    skipped: int = 0  # token-layers skipped / run so far
    run: int = 0


class TokenHalting(StepExtension):
    """QuickSilver (passes/layers/halting.py): feeds which cached tokens halted where, records the new ones."""

    feature = "token_halting"
    options = ("halt_threshold",)
    needs = "`onnxlm optimize ... --recipe quicksilver`"
    hot = False

    def start(self, cache, batch, capacity, halt_threshold=None, **_):
        cache.state[self.feature] = HaltState(np.zeros((batch, self.info.num_layers, capacity), bool),
                                              float(halt_threshold or 0.0))

    def bind(self, binding, cache, step):
        if step.ragged:
            raise OnnxlmError("token halting runs one request at a time")
        state = cache.state[self.feature]
        binding.io.bind_cpu_input(self.ports["past"].name, np.ascontiguousarray(state.halted[:, :, : cache.length]))
        binding.io.bind_cpu_input(self.ports["threshold"].name, np.array(state.threshold, np.float32))
        binding.bind_output(self.ports["halted"].name, "cpu")  # anew each step: its shape changes

    def collect(self, binding, cache, step):
        state = cache.state[self.feature]
        halted = binding.fetch(self.ports["halted"].name).numpy()  # (batch, layers, seq)
        state.halted[:, :, step.first_slot : step.first_slot + halted.shape[2]] = halted
        state.skipped += int(halted.sum())
        state.run += halted.size

    def stats(self, cache):
        state = cache.state[self.feature]
        return {"layers_skipped": state.skipped, "layers_run": state.run}

    def report(self, totals, options):
        return {"halt_threshold": options.get("halt_threshold"),
                "layers_skipped": totals.get("layers_skipped", 0) / max(totals.get("layers_run", 0), 1)}


# A graph with attention outputs computes heads x n x total floats per layer for n new tokens even when nobody
# reads them (18 GB for a 4,096-token step on SmolLM2): its steps take at most this many tokens.
PROBS_CHUNK = 256


class AttentionProbs(StepExtension):
    """Each layer's attention probabilities over the cache slots (expose_attention with probs), read back on the
    steps that ask for them: the scores of the H2O and VEDA eviction policies."""

    feature = "attention_probs"
    needs = "`onnxlm optimize ... --kv-scores`"
    max_step_tokens = PROBS_CHUNK

    def __init__(self, ports, info):
        super().__init__(ports, info)
        self.names = ports["probs"].names(info.num_layers)

    def bind(self, binding, cache, step):
        if step.want == self.feature:
            if not cache.shared:
                raise OnnxlmError("attention probabilities need a GroupQueryAttention graph")
            for name in self.names:  # anew each step: the shape changes, and a fetched output stays bound
                binding.bind_output(name, "cpu")

    def collect(self, binding, cache, step):
        if step.want == self.feature:
            step.result = [binding.fetch(name).numpy() for name in self.names]  # (batch, heads, seq, total) each


EXTENSIONS: dict[str, type[StepExtension]] = {
    cls.feature: cls for cls in (LogitsToKeep, ScoreAsDecoded, TokenHalting, AttentionProbs)
}
