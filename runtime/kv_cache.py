"""The KV cache as a list of ORT values, one key and one value per layer, keys stored after rotary.

Two layouts, chosen by the graph:
- growing (plain export): each entry is (batch, kv_heads, length, head_dim); the graph concatenates past and new
  K/V and returns new tensors each step.
- shared (GroupQueryAttention): each entry is a preallocated (batch, kv_heads, capacity, head_dim) buffer bound as
  both past and present; GQA writes the new positions in place and reads `length` from position_ids.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from onnxlm.errors import OnnxlmError


@dataclasses.dataclass
class KVCache:
    values: list  # onnxruntime.OrtValue, ordered [k0, v0, k1, v1, ...]
    length: int  # positions already in the cache
    capacity: int | None  # None: growing layout; else the shared buffer's length
    binding: Any = None  # shared layout: the session's IO binding with these buffers bound as past and present
    decode_logits: Any = None  # (batch, 1, vocab) float32, reused by every decode step of this cache

    @classmethod
    def empty(cls, names: list[str], batch: int, kv_heads: int, head_dim: int,
              capacity: int | None = None) -> KVCache:
        import onnxruntime as ort

        shape = (batch, kv_heads, capacity or 0, head_dim)  # (batch, kv_heads, capacity, head_dim)
        return cls(values=[ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32)) for _ in names],
                   length=0, capacity=capacity)

    @property
    def shared(self) -> bool:
        return self.capacity is not None

    def check_room(self, new_tokens: int) -> None:
        if self.shared and self.length + new_tokens > self.capacity:
            raise OnnxlmError(
                f"KV cache full: {self.length} + {new_tokens} positions exceed its capacity {self.capacity}"
            )

    def advance(self, presents: list | None, new_tokens: int) -> None:
        """Record `new_tokens` more positions; the growing layout also takes the step's present tensors."""
        if presents is not None:
            self.values = presents
        self.length += new_tokens

    def nbytes(self) -> int:
        return sum(int(np.prod(v.shape())) * 4 for v in self.values)
