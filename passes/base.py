"""The pass contract: a named graph -> graph transformation with typed options and a report.

Modelled on onnx-ir's pass infrastructure (`call(model) -> PassResult(model, modified)`) and MLIR's pass manager:
a pass edits an onnx_ir.Model in place and returns what it did as plain data; the manager (manager.py) times it,
checks the graph after it, and for a lossless pass compares the logits with the graph before it.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from onnxlm.errors import OnnxlmError
from onnxlm.interface import Interface
from onnxlm.model_info import ModelInfo


# Graph forms: the properties of a graph that passes require and change (Pass.requires / provides / removes). A
# recipe is checked against them when it is built (recipe.py): from INITIAL_FORM, each pass must find what it
# requires; then its `removes` end and its `provides` begin. They are coarse on purpose, one per way a pass can be
# put in the wrong place; the passes still check the graph they get when they run.
FOLDED = "folded"  # cleanup has run: constants folded, weights are initializers (the raw export reads Transpose(W))
PLAIN = "plain"  # the export's residual stream, a chain of Adds (fuse_skip_rms_norm fuses them into the norms)
FUSED = "fused"  # lowered to ORT's LLM ops: a GroupQueryAttention per layer (fuse_gqa)
FLOAT_WEIGHTS = "float_weights"  # the linears are float MatMuls and the embedding a float table (before quantizing)
UNSLICED_HEAD = "unsliced_head"  # the LM head reads the final norm at every position (before logits_to_keep)
GRAPH_FORMS = {  # form -> how an error names it
    FOLDED: "a folded graph (constants folded, weights as initializers)",
    PLAIN: "the plain export's residual Adds (before the lowering passes fuse them)",
    FUSED: "the lowered graph (GroupQueryAttention)",
    FLOAT_WEIGHTS: "float weights (before quantization)",
    UNSLICED_HEAD: "the LM head on every position (before logits_to_keep)",
}
INITIAL_FORM = frozenset({PLAIN, FLOAT_WEIGHTS, UNSLICED_HEAD})  # the exporter's graph (an ONNX source's too)


@dataclasses.dataclass
class PassContext:
    """What a pass may read besides the graph: model facts, the source, a scratch dir, calibration text.

    `calibration_ids` are token ids of real text: calibrating passes read activations on them, and the manager
    scores every lossy pass's PPL on them (`calibration_text` is the text they encode). `tokenizer` is the source's
    `tokenizers.Tokenizer`: a pass that changes the vocabulary (trim_vocab) replaces it, the ids, and `info`.
    `interface` collects the ports and features the passes declare. `quantized_tensors` returns the source's block-quantized tensors
    (GGUF only, read by the frontend on demand), else None. A pass records its own measurements (weight error,
    sizes) in `metrics`; the manager moves them into the pass's report.
    """

    info: ModelInfo
    source: dict
    scratch: Path
    calibration_ids: list[int] = dataclasses.field(default_factory=list)
    calibration_text: str = ""
    tokenizer: Any = None
    quantized_tensors: Callable[[], dict] | None = None
    metrics: dict = dataclasses.field(default_factory=dict)
    interface: Interface = dataclasses.field(default_factory=Interface)  # what the passes so far added
    probe: Any = None  # the backend the manager's checks run on (backends.probe_backend); None: the CPU


@dataclasses.dataclass
class PassReport:
    """What one pass did, as recorded in the artifact manifest and printed by `onnxlm inspect`."""

    name: str
    options: dict
    modified: bool
    matched: dict[str, int]  # pattern or rewrite name -> count; empty when the pass has no patterns
    nodes_before: int
    nodes_after: int
    seconds: float
    check: dict  # lossless: {"max_abs_logit_diff", "tolerance"}; lossy: {"ppl_before", "ppl_after",
    # "max_abs_logit_diff" (None when the vocabulary changed), metrics...}
    notes: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class NoOptions:
    pass


class Pass:
    """Base class. Subclasses set `name`, `Options` (a dataclass), `lossless` and their graph forms (`requires`,
    `provides`, `removes`, `excludes`), and implement `run`."""

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    lossless: ClassVar[bool] = True
    # A lossless pass may move the probe logits by at most atol + rtol * max|logit| (fp32 reassociation
    # grows with depth: 1e-4 abs holds on a 2-layer model, not on 30 layers with logits near 30).
    atol: ClassVar[float] = 1e-4
    rtol: ClassVar[float] = 1e-5
    # The graph forms (GRAPH_FORMS) the pass needs, makes and ends; by default it needs and changes none.
    requires: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[tuple[str, ...]] = ()
    removes: ClassVar[tuple[str, ...]] = ()
    excludes: ClassVar[tuple[str, ...]] = ()  # forms the pass cannot take (static_kv: GroupQueryAttention)

    def __init__(self, **options: Any):
        self.options = parse_options(self.name, self.Options, options)
        self.validate()

    def validate(self) -> None:
        """Raise OnnxlmError for option values outside their range."""

    def check_fits(self, info: ModelInfo) -> None:
        """Raise OnnxlmError if the options cannot apply to this model. Called once the source is loaded, before
        the export and every pass, so that a recipe that cannot work fails in seconds, not after minutes."""

    def ports(self, info: ModelInfo) -> list:
        """The graph inputs and outputs this pass adds (interface.Port), as the artifact's interface records them:
        the probe, the runtime, genai_config and `onnxlm inspect` read them from there. Default: none."""
        return []

    def features(self) -> list[str]:
        """Behaviours this pass gives the graph without a port of its own (interface.Interface.features)."""
        return []

    def run(self, model, ctx: PassContext) -> tuple[bool, dict[str, int], list[str]]:
        """Edit `model` (an onnx_ir.Model) in place. Return (modified, matched counts, notes)."""
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {"pass": self.name, **dataclasses.asdict(self.options)}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self.options).items())
        return f"{self.name}({opts})"


_JSON_TYPES = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}


def parse_options(pass_name: str, options_cls: type, given: dict) -> Any:
    """Build the options dataclass from recipe JSON, with one clear error per bad key or value type."""
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    hints = typing.get_type_hints(options_cls)
    for key, value in given.items():
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise OnnxlmError(f"pass '{pass_name}' has no option '{key}' (its options: {known})")
        expected = hints[key]
        allowed = _JSON_TYPES.get(expected)
        if allowed and (not isinstance(value, allowed) or (expected is not bool and isinstance(value, bool))):
            raise OnnxlmError(
                f"pass '{pass_name}' option '{key}' must be {expected.__name__}, got {value!r}"
            )
    return options_cls(**given)
