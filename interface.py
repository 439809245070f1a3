"""An artifact's interface beyond a decoder's own inputs and outputs, as plain data.

A pass that adds a graph input or output declares it as a `Port` (Pass.ports); a pass that changes what an
existing input means declares a feature (Pass.features). The pass manager collects both into the manifest's
"interface", and everything else reads them from there, so no module spells another module's input names:
- the probe (passes/evaluate.py) feeds each required input its neutral `default`;
- the runtime (runtime/extensions.py) binds ports by `feature` and `role`;
- genai_config.py writes a config only when every added input is optional (genai leaves those out);
- `onnxlm inspect` lists them.

Shapes are symbolic: batch, seq (new tokens), past (cached positions), total (past + seq), layers, heads.
A name may hold "{layer}": one port per decoder layer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

DIRECTIONS = ("input", "output")
# A feature without ports: decode steps have fixed shapes and no host-side values (passes/lowering/decode_shapes.py),
# so a device may capture them (runtime/device_step.py).
DECODE_SHAPES = "decode_shapes"


@dataclasses.dataclass(frozen=True)
class Port:
    name: str
    direction: str  # input | output
    dtype: str  # a numpy dtype name: int64, bool, float32
    shape: tuple  # ints and the symbols above
    feature: str  # the runtime extension that drives it (runtime/extensions.py); others only get their default
    role: str  # the port's part in that feature
    meaning: str
    default: Any = None  # inputs: the value that leaves the graph as it was before the pass (filled to the shape)
    optional: bool = False  # inputs: the graph holds `default` as an initializer, so a caller may leave it out

    def names(self, num_layers: int) -> list[str]:
        return [self.name.format(layer=i) for i in range(num_layers)] if "{layer}" in self.name else [self.name]

    def fill(self, dims: dict[str, int]) -> np.ndarray:
        """The default as an array of this port's shape, with symbolic dims taken from `dims`."""
        shape = tuple(d if isinstance(d, int) else dims[d] for d in self.shape)
        return np.full(shape, self.default, dtype=self.dtype)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: dict) -> Port:
        return cls(**{**data, "shape": tuple(data["shape"])})

    def describe(self) -> str:
        dims = ", ".join(str(d) for d in self.shape)
        need = "" if self.direction == "output" else (f", default {self.default}" if self.optional else
                                                     ", required")
        return f"{self.direction} {self.name} {self.dtype}[{dims}]{need}: {self.meaning}"


@dataclasses.dataclass
class Interface:
    """What the passes added: ports, and features (behaviours without a port of their own)."""

    ports: list[Port] = dataclasses.field(default_factory=list)
    features: list[str] = dataclasses.field(default_factory=list)

    def add(self, ports: list[Port], features: list[str]) -> None:
        for port in ports:
            if port not in self.ports:
                self.ports.append(port)
        for feature in [*features, *(p.feature for p in ports)]:
            if feature not in self.features:
                self.features.append(feature)

    def has(self, feature: str) -> bool:
        return feature in self.features

    def of(self, feature: str) -> dict[str, Port]:
        """role -> port, for one feature."""
        return {p.role: p for p in self.ports if p.feature == feature}

    def required_inputs(self) -> list[Port]:
        return [p for p in self.ports if p.direction == "input" and not p.optional]

    def to_dict(self) -> dict:
        return {"features": list(self.features), "ports": [p.to_dict() for p in self.ports]}

    @classmethod
    def from_dict(cls, data: dict | None) -> Interface:
        data = data or {}
        return cls([Port.from_dict(p) for p in data.get("ports", [])], list(data.get("features", [])))
