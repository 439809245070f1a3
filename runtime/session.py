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
from onnxlm.errors import OnnxlmError, first_line
from onnxlm.model_info import ModelInfo, shares_kv_buffer
from onnxlm.runtime.kv_cache import KVCache


# A graph with attention outputs (--kv-scores) computes heads x n x total floats per layer for n new tokens even
# when nobody reads them (18 GB for a 4,096-token step on SmolLM2): its steps take at most this many tokens.
PROBS_CHUNK = 256


def ort_value(array: np.ndarray):
    import onnxruntime as ort

    return ort.OrtValue.ortvalue_from_numpy(array)


class DecodeFeeds:
    """A decode step's inputs, allocated once per cache: at a few ms per step, fresh numpy arrays and OrtValues
    for three tiny inputs were a measurable share of the Python time around `run_with_iobinding`."""

    def __init__(self, batch: int, capacity: int, vocab: int):
        self.ids = np.zeros((batch, 1), np.int64)  # (batch, 1)
        self.positions = np.zeros((batch, 1), np.int64)  # (batch, 1)
        self.ones = np.ones(batch * capacity, np.int64)  # every attention mask is all ones: a prefix of this
        self.logits = np.empty((batch, 1, vocab), np.float32)  # (batch, 1, vocab)
        self.logits_value = ort_value(self.logits)

    def mask(self, batch: int, total: int) -> np.ndarray:
        return self.ones[: batch * total].reshape(batch, total)  # (batch, total), a view


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
            raise OnnxlmError(f"ONNX Runtime cannot load {self.directory / MODEL_FILE}: {first_line(exc)}") from None
        self.input_names = {i.name for i in self.session.get_inputs()}
        graph_layers = sum(1 for name in self.input_names if name.startswith("past_key_values."))
        if graph_layers != 2 * self.info.num_layers:
            raise OnnxlmError(f"{self.directory}: the manifest says {self.info.num_layers} layers but the graph has "
                              f"KV inputs for {graph_layers // 2}")
        self.kv_input_names = self._ordered_kv("past_key_values.{}.{}")
        self.kv_output_names = self._ordered_kv("present.{}.{}")
        self.shared_kv = shares_kv_buffer(self.manifest.get("op_histogram", {}))
        # Built with the expose_attention pass: positions apart from cache slots, and per-layer probabilities.
        self.separate_positions = any(r["name"] == "expose_attention" for r in self.manifest.get("passes", []))
        outputs = {o.name for o in self.session.get_outputs()}
        self.probs_names = [n for n in (f"attention_probs.{i}" for i in range(self.info.num_layers)) if n in outputs]
        self.halting = "past_halted" in self.input_names  # built by the quicksilver recipe
        # La RoSA graphs sparsify in decode only, unless this switch (an input with a default) says every position.
        overridable = {i.name for i in self.session.get_overridable_initializers()}
        self.sparse_switch = "sparsify_all_positions" in overridable
        # Built with the logits_to_keep pass: a prefill that reads only its last row skips the LM head elsewhere.
        self.keep_switch = "logits_to_keep" in overridable
        self.keep_values = {k: ort_value(np.array(k, np.int64)) for k in (0, 1)}  # all positions / the last

    def _ordered_kv(self, fmt: str) -> list[str]:
        return [fmt.format(i, kind) for i in range(self.info.num_layers) for kind in ("key", "value")]

    def new_cache(self, batch: int = 1, capacity: int | None = None, halt_threshold: float | None = None) -> KVCache:
        """An empty cache. `capacity` (positions) sizes the shared buffer of a GQA graph; default: context length.
        `halt_threshold`: QuickSilver's drift threshold, on a graph built by the quicksilver recipe."""
        if self.shared_kv:
            capacity = min(capacity or self.info.context_length, self.info.context_length)
        else:
            capacity = None
        cache = KVCache.empty(self.kv_input_names, batch, self.info.num_kv_heads, self.info.head_dim, capacity)
        if halt_threshold is not None and not self.halting:
            raise OnnxlmError("--halt-threshold needs an artifact built with `onnxlm optimize ... --recipe quicksilver`")
        if self.halting:
            cache.halted = np.zeros((batch, self.info.num_layers, capacity), bool)  # (batch, layers, capacity)
            cache.halt_threshold = float(halt_threshold or 0.0)
        return cache

    def step(self, token_ids: np.ndarray, cache: KVCache, positions: np.ndarray | None = None,
             last_only: bool = False) -> np.ndarray:
        """Run `token_ids` (batch, seq) at positions cache.length + cache.offset.. and advance the cache.

        Returns logits (batch, seq, vocab) as float32, or (batch, 1, vocab) for the last position with
        `last_only` (a prefill whose other rows nobody reads: on a logits_to_keep graph the LM head runs on that
        row only). For a decode step (seq == 1) the array is the cache's own buffer, overwritten by its next
        decode step: copy it to keep it.

        `positions` (batch, 1) gives each row its own position, for a decode batch whose rows hold different
        lengths (shared buffer only: GQA takes each row's length from its position). The caller then keeps the
        rows' lengths, and cache.length is not advanced.
        """
        batch, seq = token_ids.shape
        if seq == 1 and positions is None and cache.shared and not (self.halting or self.sparse_switch):
            return self._decode_step(token_ids, cache)
        if self.probs_names and seq > PROBS_CHUNK and positions is None:
            chunks = [self.step(token_ids[:, i : i + PROBS_CHUNK], cache, last_only=last_only)
                      for i in range(0, seq, PROBS_CHUNK)]
            return chunks[-1] if last_only else np.concatenate(chunks, axis=1)
        ragged = positions is not None
        if ragged and not (cache.shared and seq == 1):
            raise OnnxlmError("per-row positions need a GroupQueryAttention graph and one new token per row")
        if ragged:
            positions = np.ascontiguousarray(positions, dtype=np.int64)  # (batch, 1)
            total = int(positions.max()) + 1
            if total > cache.capacity:
                raise OnnxlmError(f"KV cache full: position {total - 1} is past its capacity {cache.capacity}")
        else:
            first = cache.length + cache.offset  # offset: tokens evicted from a cache that keeps original positions
            if first + seq > self.info.context_length:  # the plain graph's growing cache has no capacity to stop it
                raise OnnxlmError(f"position {first + seq - 1} is past the model's context length "
                                  f"{self.info.context_length}")
            cache.check_room(seq)
            total = cache.length + seq
            self._check_offset(cache)
            positions = np.broadcast_to(np.arange(first, first + seq, dtype=np.int64), (batch, seq)).copy()
        io = self._binding(cache)
        first_slot = cache.length
        if self.halting:
            if ragged:
                raise OnnxlmError("token halting runs one request at a time")
            self._bind_halting(io, cache)
        if self.sparse_switch:
            cache.switch_value = ort_value(np.array(cache.sparse_all_positions))  # kept alive while bound
            io.bind_ortvalue_input("sparsify_all_positions", cache.switch_value)
        io.bind_cpu_input("input_ids", np.ascontiguousarray(token_ids, dtype=np.int64))
        if self.keep_switch:  # bound on every step of this path: the binding outlives it
            io.bind_ortvalue_input("logits_to_keep", self.keep_values[int(last_only)])
        if "attention_mask" in self.input_names:
            io.bind_cpu_input("attention_mask", np.ones((batch, total), np.int64))
        if "position_ids" in self.input_names:
            io.bind_cpu_input("position_ids", positions)
        if seq == 1:  # decode: ORT writes into the cache's buffer; no allocation, no copy
            feeds = self._feeds(cache, batch)
            logits = feeds.logits
            io.bind_ortvalue_output("logits", feeds.logits_value)
        else:  # prefill: ORT's arena reuses its memory across requests; a fresh 100 MB array would page-fault
            io.bind_output("logits", "cpu")
        self.session.run_with_iobinding(io)
        if self.halting:
            self._record_halting(io, cache, first_slot)
        if cache.shared and seq == 1:  # the hot path: nothing to fetch, the buffers were written in place
            if not ragged:
                cache.advance(None, seq)
            return logits
        outputs = io.get_outputs()  # [logits, *presents, *probs] in binding order
        presents = outputs[1 : 1 + len(self.kv_output_names)]
        cache.advance(None if cache.shared else presents, seq)
        if seq == 1:
            return logits
        return outputs[0].numpy()[:, -1:] if last_only else outputs[0].numpy()  # a view when the graph kept one row

    def _check_offset(self, cache: KVCache) -> None:
        """Tokens evicted while the kept ones keep their positions (cache.offset) need positions apart from slots."""
        if cache.offset and not self.separate_positions:
            raise OnnxlmError("this graph reads cache slots from position_ids: positions past the slots need "
                              "an artifact built with `onnxlm optimize ... --kv-scores`")

    def _feeds(self, cache: KVCache, batch: int) -> DecodeFeeds:
        if cache.decode_feeds is None or cache.decode_feeds.ids.shape[0] != batch:
            cache.decode_feeds = DecodeFeeds(batch, cache.capacity or self.info.context_length, self.info.vocab_size)
        return cache.decode_feeds

    def _decode_step(self, token_ids: np.ndarray, cache: KVCache) -> np.ndarray:
        """`step` for one token per row on a shared buffer: the hot path of every decoding loop. The inputs are
        written into preallocated arrays and bound by pointer; ORT writes K/V and logits in place."""
        batch = token_ids.shape[0]
        cache.check_room(1)
        self._check_offset(cache)
        feeds = self._feeds(cache, batch)
        feeds.ids[:] = token_ids
        feeds.positions[:] = cache.length + cache.offset
        io = self._binding(cache)
        io.bind_cpu_input("input_ids", feeds.ids)
        if "attention_mask" in self.input_names:
            io.bind_cpu_input("attention_mask", feeds.mask(batch, cache.length + 1))
        if "position_ids" in self.input_names:
            io.bind_cpu_input("position_ids", feeds.positions)
        io.bind_ortvalue_output("logits", feeds.logits_value)
        self.session.run_with_iobinding(io)
        cache.advance(None, 1)
        return feeds.logits

    def step_probs(self, token_ids: np.ndarray, cache: KVCache) -> tuple[np.ndarray, list[np.ndarray]]:
        """`step`, also returning each layer's attention probabilities (batch, num_heads, seq, >= cache.length)
        over the cache's slots: the scores of the H2O and VEDA eviction policies (a --kv-scores artifact)."""
        if not self.probs_names:
            raise OnnxlmError("this artifact has no attention probability outputs: build it with "
                              "`onnxlm optimize ... --kv-scores`")
        if not cache.shared:
            raise OnnxlmError("attention probabilities need a GroupQueryAttention graph")
        io = self._binding(cache)
        for name in self.probs_names:  # anew each step: the shape changes, and a fetched output stays bound
            io.bind_output(name, "cpu")
        logits = self.step(token_ids, cache)
        probs = io.get_outputs()[-len(self.probs_names):]
        return logits, [p.numpy() for p in probs]

    def _bind_halting(self, io, cache: KVCache) -> None:
        """QuickSilver graphs: which cached tokens skipped which layers, and the drift threshold."""
        io.bind_cpu_input("past_halted", np.ascontiguousarray(cache.halted[:, :, : cache.length]))
        io.bind_cpu_input("halt_threshold", np.array(cache.halt_threshold, np.float32))
        io.bind_output("halted", "cpu")  # anew each step: its shape changes

    def _record_halting(self, io, cache: KVCache, first_slot: int) -> None:
        halted = io.get_outputs()[-1].numpy()  # (batch, layers, seq), bound last
        cache.halted[:, :, first_slot : first_slot + halted.shape[2]] = halted
        cache.layers_skipped += int(halted.sum())
        cache.layers_run += halted.size

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
