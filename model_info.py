"""The facts about a decoder that the passes, the manifest and the runtime share, as plain data.

Imported by the frontend and the runtime alike, so it imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


def shares_kv_buffer(op_histogram: dict[str, int], num_layers: int = 1) -> bool:
    """Whether one buffer can be both past and present: GroupQueryAttention reads lengths from position_ids,
    not from the past's shape. The plain export concatenates past and new K/V and cannot share, nor can a graph
    in which some layer's attention stayed unfused (a layer without RoPE)."""
    return op_histogram.get("com.microsoft::GroupQueryAttention", 0) >= num_layers > 0


@dataclasses.dataclass
class ModelInfo:
    """The facts about a decoder that the passes, the manifest and the runtime need."""

    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    context_length: int
    rope_theta: float
    bos_token_id: int | None
    eos_token_ids: list[int]
    add_bos_token: bool = False
    intermediate_size: int = 0  # the MLP's width (0: unknown, in artifacts written before it was recorded)
    # Each layer's sliding attention window (0: full attention); empty: every layer full (and older artifacts).
    layer_windows: list[int] = dataclasses.field(default_factory=list)
    # The family's description with this model's values (frontend/families: norms, rotary, soft-capping, ...);
    # empty for artifacts written before it was recorded, and read as llama's then.
    family: dict = dataclasses.field(default_factory=dict)

    @property
    def sliding_window(self) -> int:
        """The widest sliding window of any layer (0: none): past it, a sliding layer no longer sees a token."""
        return max(self.layer_windows, default=0)

    @property
    def moe(self) -> dict | None:
        """The family's mixture of experts (experts, top_k, normalize, shared_expert, per-layer sparse flags, the
        transformers module names), or None for dense MLPs."""
        return self.family.get("moe")

    def key_frequencies(self, layer: int) -> list[float] | None:
        """The inverse frequencies RoPE rotates layer `layer`'s keys by, rotate-half over their first 2 * len
        dims (what moving cached keys, runtime/kv_policy.rotate_keys, needs): [] for a layer without RoPE; None
        where the artifact records none (written before they were) and its RoPE is not llama's plain one."""
        rope = self.family.get("rope")
        if not rope:  # written before families were described: llama's
            return _plain_frequencies(self.rope_theta, self.head_dim)
        if not rope.get("layers", [True] * self.num_layers)[layer]:
            return []
        local = bool(rope.get("local_theta")) and bool((self.layer_windows or [0] * self.num_layers)[layer])
        recorded = rope.get("local_inv_freq" if local else "inv_freq")
        if recorded:
            return list(recorded)
        theta = rope["local_theta"] if local else rope["theta"]
        plain = rope.get("type") == "default" and rope.get("rotary_dim") == self.head_dim and theta == rope["theta"]
        return _plain_frequencies(theta, self.head_dim) if plain else None

    def without_layers(self, drop: list[int]) -> ModelInfo:
        """These facts for the model without the layers `drop`: the per-layer lists keep the other layers'."""
        kept = [i for i in range(self.num_layers) if i not in set(drop)]
        family = dict(self.family)
        if "rope" in family and "layers" in family["rope"]:
            family["rope"] = {**family["rope"], "layers": [family["rope"]["layers"][i] for i in kept]}
        if family.get("moe"):
            family["moe"] = {**family["moe"], "layers": [family["moe"]["layers"][i] for i in kept]}
        windows = [self.layer_windows[i] for i in kept] if self.layer_windows else []
        return dataclasses.replace(self, num_layers=len(kept), layer_windows=windows, family=family)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelInfo:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})

    @classmethod
    def from_hf_config(cls, config: Any, eos_token_ids: list[int] | None = None) -> ModelInfo:
        from onnxlm.frontend.families import describe, family_for, layer_windows

        family = family_for(config.model_type)
        windows = layer_windows(family, config)
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        eos = eos_token_ids if eos_token_ids is not None else config.eos_token_id
        if eos is None:
            eos = []
        elif isinstance(eos, int):
            eos = [eos]
        return cls(
            architecture=family.name,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            hidden_size=config.hidden_size,
            vocab_size=config.vocab_size,
            context_length=config.max_position_embeddings,
            rope_theta=float(getattr(config, "rope_theta", 10000.0)),
            bos_token_id=config.bos_token_id,
            eos_token_ids=list(eos),
            intermediate_size=int(getattr(config, "intermediate_size", 0) or 0),
            layer_windows=windows if any(windows) else [],
            family=describe(family, config),
        )


def _plain_frequencies(theta: float, head_dim: int) -> list[float]:
    """Llama's RoPE over the whole head: theta^(-2i / head_dim)."""
    return list(theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
