"""The facts about a decoder that the passes, the manifest and the runtime share, as plain data.

Imported by the frontend and the runtime alike, so it imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from onnxlm.errors import OnnxlmError

# Decoder families whose export we test: llama-style blocks (RMSNorm, RoPE, GQA, SwiGLU).
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


def check_architecture(arch: str | None) -> str:
    if arch not in SUPPORTED_ARCHITECTURES:
        raise OnnxlmError(
            f"unsupported architecture '{arch}': onnxlm exports {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def shares_kv_buffer(op_histogram: dict[str, int]) -> bool:
    """Whether one buffer can be both past and present: GroupQueryAttention reads lengths from position_ids,
    not from the past's shape. The plain export concatenates past and new K/V and cannot share."""
    return "com.microsoft::GroupQueryAttention" in op_histogram


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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelInfo:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})

    @classmethod
    def from_hf_config(cls, config: Any, eos_token_ids: list[int] | None = None) -> ModelInfo:
        arch = check_architecture(config.model_type)
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        eos = eos_token_ids if eos_token_ids is not None else config.eos_token_id
        if eos is None:
            eos = []
        elif isinstance(eos, int):
            eos = [eos]
        return cls(
            architecture=arch,
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
        )
