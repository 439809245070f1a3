"""The static (NPU-class) artifact's I/O layout, as plain numpy: what the `static_kv` pass checks and what the
runtime (runtime/static.py) drives, written once for both.

A static artifact holds two graphs specialized from its dynamic model.onnx, sharing its weight file:

    prefill.onnx   P = prefill_chunk new tokens      decode.onnx   1 new token
      input_ids        int64 (1, S)                     S = P or 1
      position_ids     int64 (1, S)                     each token's rotary position
      attention_mask   int64 (1, C + S)                 1 for the cache's filled slots, then 1 for the real new tokens
      past_key_values.{i}.key / .value  float32 (1, kv_heads, C, head_dim)   the C-slot cache, read only
   -> logits           float32 (1, S, vocab)
      present.{i}.key / .value          float32 (1, kv_heads, S, head_dim)   the new tokens' K/V only

The graphs never write the cache: the runtime copies each step's new K/V into slots length..length+n-1
(`store`), as onnxruntime-genai does for its static QNN models. So both graphs bind the same C-slot buffers, the
graph has no ScatterND and no dynamic slice, and a chunk of n < P tokens is padded at the end (causality keeps
the real tokens from seeing the padding; the padding's outputs are dropped).
"""

from __future__ import annotations

import dataclasses

import numpy as np

PREFILL_FILE, DECODE_FILE = "prefill.onnx", "decode.onnx"
METADATA_KEY = "onnxlm.static"  # model.onnx's metadata: the static shape it is specialized to (JSON)


@dataclasses.dataclass(frozen=True)
class StaticShape:
    context_length: int  # C: the cache's slots
    prefill_chunk: int  # P: new tokens per prefill call

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "prefill": PREFILL_FILE, "decode": DECODE_FILE}

    @classmethod
    def from_dict(cls, data: dict) -> StaticShape:
        return cls(int(data["context_length"]), int(data["prefill_chunk"]))


class StaticFeeds:
    """The inputs of one static graph taking `size` new tokens, allocated once and rewritten per step."""

    def __init__(self, context_length: int, size: int):
        self.context_length, self.size = context_length, size
        self.ids = np.zeros((1, size), np.int64)  # (1, S)
        self.positions = np.zeros((1, size), np.int64)  # (1, S)
        self.mask = np.zeros((1, context_length + size), np.int64)  # (1, C + S)

    def set(self, tokens, length: int, first_position: int) -> None:
        """`tokens` (n <= S) at `first_position`.., after a cache holding `length` slots."""
        n = len(tokens)
        self.ids[0, :n], self.ids[0, n:] = tokens, 0
        self.positions[0] = first_position + np.arange(self.size)  # the padding continues: any position is valid
        self.mask[:] = 0
        self.mask[0, :length] = 1
        self.mask[0, self.context_length : self.context_length + n] = 1

    def as_dict(self) -> dict[str, np.ndarray]:
        return {"input_ids": self.ids, "position_ids": self.positions, "attention_mask": self.mask}


def store(cache_arrays: list[np.ndarray], presents: list[np.ndarray], length: int, n: int) -> None:
    """Copy a step's first n new K/V rows (1, kv_heads, S, head_dim) into slots length.. of the cache's buffers
    (1, kv_heads, C, head_dim), in the order [k0, v0, k1, v1, ...]."""
    for buffer, new in zip(cache_arrays, presents):
        buffer[:, :, length : length + n] = new[:, :, :n]


def static_step(run, feeds: dict[int, StaticFeeds], cache_arrays: list[np.ndarray], tokens, length: int,
                first_position: int, prefill_chunk: int) -> np.ndarray:
    """Run n = len(tokens) new tokens (n <= P: the decode graph for one, else the prefill graph, padded) after a
    cache of `length` filled slots, store their K/V in slots length.., and return their logits (n, vocab).
    `run(size)` runs the graph of that size on `feeds[size]` and the cache, returning (logits (1, S, vocab),
    presents)."""
    n = len(tokens)
    size = 1 if n == 1 else prefill_chunk
    feeds[size].set(tokens, length, first_position)
    logits, presents = run(size)
    store(cache_arrays, presents, length, n)
    return logits[0, :n]
