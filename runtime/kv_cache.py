"""The KV cache as a list of ORT values, one key and one value per layer.

Layout of every entry: (batch, kv_heads, length, head_dim), float32, keys stored after rotary.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class KVCache:
    values: list  # onnxruntime.OrtValue, ordered [k0, v0, k1, v1, ...]
    length: int  # positions already in the cache

    @classmethod
    def empty(cls, names: list[str], batch: int, kv_heads: int, head_dim: int) -> KVCache:
        import onnxruntime as ort

        zero = np.zeros((batch, kv_heads, 0, head_dim), np.float32)  # (batch, kv_heads, 0, head_dim)
        return cls(values=[ort.OrtValue.ortvalue_from_numpy(zero) for _ in names], length=0)

    def advance(self, presents: list, new_tokens: int) -> None:
        self.values = presents
        self.length += new_tokens

    def nbytes(self) -> int:
        return sum(int(np.prod(v.shape())) * 4 for v in self.values)
