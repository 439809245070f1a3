"""The KV cache as a list of ORT values, one key and one value per layer, keys stored after rotary.

Two layouts, chosen by the graph:
- growing (plain export): each entry is (batch, kv_heads, length, head_dim); the graph concatenates past and new
  K/V and returns new tensors each step.
- shared (GroupQueryAttention): each entry is a preallocated (batch, kv_heads, capacity, head_dim) buffer on the
  backend's device, bound as both past and present; GQA writes the new positions in place and reads each row's
  length from position_ids. Positions past `length` hold stale K/V that the next write overwrites, so dropping
  the last k positions (speculative rollback) is `truncate`, with no copy.

On the CPU a shared buffer is a numpy array (`arrays`) that the OrtValue aliases, so beam reordering and KV
eviction edit it in place. On another device there are no host arrays, and those edits are refused.

The cache knows nothing of features: a step extension (runtime/extensions.py) keeps its per-cache state in
`state`, under its feature's name.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import numpy as np

from onnxlm.errors import OnnxlmError


def _wrap(array: np.ndarray):
    import onnxruntime as ort

    return ort.OrtValue.ortvalue_from_numpy(array)  # on CPU the OrtValue aliases the numpy memory


@dataclasses.dataclass
class KVCache:
    values: list  # onnxruntime.OrtValue, ordered [k0, v0, k1, v1, ...]
    length: int  # positions already in the cache
    capacity: int | None  # None: growing layout; else the shared buffer's length
    device: str = "cpu"  # where `values` live
    arrays: list | None = None  # shared layout on the CPU: the numpy buffers behind `values`
    offset: int = 0  # tokens evicted while the kept keys keep their original positions (see kv_policy.py)
    binding: Any = None  # shared layout: the session's binding of these buffers as past and present (session.py)
    decode_feeds: Any = None  # the decode step's preallocated inputs and logits buffer (session.DecodeFeeds)
    device_rows: Any = None  # on a device: row edits made there (runtime/device_step.DeviceRows), set by the session
    state: dict = dataclasses.field(default_factory=dict)  # step extensions' per-cache state, by feature

    @classmethod
    def empty(cls, names: list[str], batch: int, kv_heads: int, head_dim: int, capacity: int | None = None,
              device: str = "cpu", dtype=np.float32) -> KVCache:
        """`dtype`: the graph's KV type (float16 after convert_float16)."""
        shape = (batch, kv_heads, capacity or 0, head_dim)  # (batch, kv_heads, capacity, head_dim)
        if device == "cpu":
            arrays = [np.zeros(shape, dtype) for _ in names]
            return cls(values=[_wrap(a) for a in arrays], length=0, capacity=capacity,
                       arrays=arrays if capacity else None)
        import onnxruntime as ort

        values = [ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, device, 0) for _ in names]
        return cls(values=values, length=0, capacity=capacity, device=device)

    @property
    def shared(self) -> bool:
        return self.capacity is not None

    def host_arrays(self, what: str) -> list[np.ndarray]:
        """The shared buffers as numpy arrays, for edits made on the host (`what`: the edit, for the error)."""
        if self.arrays is None:
            raise OnnxlmError(f"{what} needs the shared KV buffer in host memory; this cache is "
                              f"{'growing' if not self.shared else f'on {self.device}'}")
        return self.arrays

    @contextlib.contextmanager
    def editing(self, what: str, write: bool = True):
        """The shared buffers as numpy arrays for the host to read or edit in place (`what`: the edit, for the
        error). On a device they are copies, written back (`write`) when the block ends: a full copy each way,
        correct rather than fast (KV eviction and prefix caching on a GPU)."""
        if self.arrays is not None or not self.shared:
            yield self.host_arrays(what)
            return
        copies = [v.numpy() for v in self.values]  # (batch, kv_heads, capacity, head_dim) each, on the host
        yield copies
        if write:
            for value, array in zip(self.values, copies):
                value.update_inplace(np.ascontiguousarray(array))

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

    def truncate(self, length: int) -> None:
        """Keep the first `length` positions (speculative rollback)."""
        if not 0 <= length <= self.length:
            raise OnnxlmError(f"cannot truncate a cache of {self.length} positions to {length}")
        if not self.shared and length < self.length:
            self.values = [_wrap(np.ascontiguousarray(v.numpy()[:, :, :length])) for v in self.values]
        self.length = length

    def reorder(self, rows: np.ndarray) -> None:
        """Row b takes the K/V of row rows[b] (beam search), in place on the shared buffer."""
        rows = np.asarray(rows, np.int64)  # (batch,)
        if self.shared and self.arrays is None and self.device_rows is not None:  # on a device, by ORT there
            self.device_rows.reorder(self.values, rows)
        elif self.shared:
            for a in self.host_arrays("beam reordering"):  # (batch, kv_heads, capacity, head_dim)
                a[:, :, : self.length] = a[rows, :, : self.length]
        else:
            self.values = [_wrap(np.ascontiguousarray(v.numpy()[rows])) for v in self.values]

    def row(self, b: int) -> KVCache:
        """A batch-1 cache over row b of a shared buffer, without a copy: prefill one request of a batch."""
        if not self.shared:
            raise OnnxlmError("per-row caches need a GroupQueryAttention graph (shared KV buffer)")
        arrays = [a[b : b + 1] for a in self.host_arrays("a per-row cache")]  # (1, kv_heads, capacity, head_dim)
        return KVCache(values=[_wrap(a) for a in arrays], length=0, capacity=self.capacity, arrays=arrays)

    def nbytes(self) -> int:
        if not self.values:
            return 0
        itemsize = 2 if "float16" in self.values[0].data_type() else 4  # data_type(): "tensor(float16)"
        return sum(int(np.prod(v.shape())) * itemsize for v in self.values)
