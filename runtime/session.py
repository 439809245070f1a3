"""An artifact's decoder graph in an ONNX Runtime session, driven with IO binding.

The KV cache never leaves ORT. On a GroupQueryAttention graph one preallocated buffer per layer is bound as both
`past_key_values.*` and `present.*`, and decode writes in place (past_present_share_buffer). On the plain export,
each step's `present.*` OrtValues are bound as the next step's past without a copy to numpy; ORT allocates each
present anew there, because that graph concatenates past and new K/V.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from onnxlm.artifact import MODEL_FILE, read_manifest
from onnxlm.backends import get_backend
from onnxlm.errors import OnnxlmError
from onnxlm.model_info import ModelInfo, shares_kv_buffer
from onnxlm.runtime.kv_cache import KVCache


def ort_value(array: np.ndarray):
    import onnxruntime as ort

    return ort.OrtValue.ortvalue_from_numpy(array)


class DecoderSession:
    """One loaded decoder. `step` runs new tokens against a KV cache and returns their logits."""

    def __init__(self, directory: Path, threads: int | None = None, ep: str = "cpu", profile: bool = False,
                 spinning: bool = True):
        import onnxruntime as ort

        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self.info = ModelInfo.from_dict(self.manifest["model"])
        backend = get_backend(ep)
        self.threads = threads  # None: ORT picks the count (physical cores) and pins the threads
        try:
            self.session = ort.InferenceSession(
                str(self.directory / MODEL_FILE),
                sess_options=backend.session_options(threads, profile, spinning),
                providers=backend.PROVIDERS,
            )
        except Exception as exc:
            raise OnnxlmError(f"ONNX Runtime cannot load {self.directory / MODEL_FILE}: {exc}") from None
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.kv_input_names = self._ordered_kv("past_key_values.{}.{}")
        self.kv_output_names = self._ordered_kv("present.{}.{}")
        self.shared_kv = shares_kv_buffer(self.manifest.get("op_histogram", {}))

    def _ordered_kv(self, fmt: str) -> list[str]:
        return [fmt.format(i, kind) for i in range(self.info.num_layers) for kind in ("key", "value")]

    def new_cache(self, batch: int = 1, capacity: int | None = None) -> KVCache:
        """An empty cache. `capacity` (positions) sizes the shared buffer of a GQA graph; default: context length."""
        if self.shared_kv:
            capacity = min(capacity or self.info.context_length, self.info.context_length)
        else:
            capacity = None
        return KVCache.empty(self.kv_input_names, batch, self.info.num_kv_heads, self.info.head_dim, capacity)

    def step(self, token_ids: np.ndarray, cache: KVCache, positions: np.ndarray | None = None) -> np.ndarray:
        """Run `token_ids` (batch, seq) at positions cache.length.. and advance the cache.

        Returns logits (batch, seq, vocab) as float32. For a decode step (seq == 1) the array is the cache's own
        buffer, overwritten by its next decode step: copy it to keep it.

        `positions` (batch, 1) gives each row its own position, for a decode batch whose rows hold different
        lengths (shared buffer only: GQA takes each row's length from its position). The caller then keeps the
        rows' lengths, and cache.length is not advanced.
        """
        batch, seq = token_ids.shape
        ragged = positions is not None
        if ragged and not (cache.shared and seq == 1):
            raise OnnxlmError("per-row positions need a GroupQueryAttention graph and one new token per row")
        if ragged:
            positions = np.ascontiguousarray(positions, dtype=np.int64)  # (batch, 1)
            total = int(positions.max()) + 1
            if total > cache.capacity:
                raise OnnxlmError(f"KV cache full: position {total - 1} is past its capacity {cache.capacity}")
        else:
            cache.check_room(seq)
            total = cache.length + seq
            positions = np.broadcast_to(np.arange(cache.length, total, dtype=np.int64), (batch, seq)).copy()
        io = self._binding(cache)
        io.bind_cpu_input("input_ids", np.ascontiguousarray(token_ids, dtype=np.int64))
        if "attention_mask" in self.input_names:
            io.bind_cpu_input("attention_mask", np.ones((batch, total), np.int64))
        if "position_ids" in self.input_names:
            io.bind_cpu_input("position_ids", positions)
        if seq == 1:  # decode: ORT writes into the cache's buffer; no allocation, no copy
            if cache.decode_logits is None or cache.decode_logits.shape[0] != batch:
                cache.decode_logits = np.empty((batch, 1, self.info.vocab_size), np.float32)  # (batch, 1, vocab)
            logits = cache.decode_logits
            io.bind_ortvalue_output("logits", ort_value(logits))
        else:  # prefill: ORT's arena reuses its memory across requests; a fresh 100 MB array would page-fault
            io.bind_output("logits", "cpu")
        self.session.run_with_iobinding(io)
        if cache.shared and seq == 1:  # the hot path: nothing to fetch, the buffers were written in place
            if not ragged:
                cache.advance(None, seq)
            return logits
        outputs = io.get_outputs()  # [logits, *presents] in binding order
        cache.advance(None if cache.shared else outputs[1:], seq)
        return logits if seq == 1 else outputs[0].numpy()

    def _binding(self, cache: KVCache):
        """The IO binding for this step. A shared cache keeps one, its buffers bound once as past and present;
        a growing cache binds the last step's presents as this step's past."""
        if cache.shared and cache.binding is not None:
            return cache.binding
        io = self.session.io_binding()
        for name, value in zip(self.kv_input_names, cache.values):
            io.bind_ortvalue_input(name, value)
        io.bind_output("logits", "cpu")
        for name, value in zip(self.kv_output_names, cache.values):
            if cache.shared:
                io.bind_ortvalue_output(name, value)  # the same buffer as the past: written in place
            else:
                io.bind_output(name, "cpu")
        if cache.shared:
            cache.binding = io
        return io
