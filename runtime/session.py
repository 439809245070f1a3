"""An artifact's decoder graph in an ONNX Runtime session, driven with IO binding.

The KV cache never leaves ORT. On a GroupQueryAttention graph one preallocated buffer per layer is bound as both
`past_key_values.*` and `present.*`, and decode writes in place (past_present_share_buffer). On the plain export,
each step's `present.*` OrtValues are bound as the next step's past without a copy to numpy; ORT allocates each
present anew there, because that graph concatenates past and new K/V.

Everything beyond a decoder's own inputs and outputs is a step extension (runtime/extensions.py), built from the
interface the artifact's manifest records; the session runs their hooks and knows none of them by name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from onnxlm.artifact import MODEL_FILE, read_manifest
from onnxlm.backends import get_backend
from onnxlm.backends.base import FLOAT_TYPES, SessionSettings, kv_dtype
from onnxlm.errors import OnnxlmError
from onnxlm.interface import DECODE_SHAPES, Interface
from onnxlm.model_info import ModelInfo, shares_kv_buffer
from onnxlm.runtime.device_step import DeviceArgmax, DeviceFeeds, DeviceRows
from onnxlm.runtime.extensions import EXTENSIONS, StepInfo, ort_value
from onnxlm.runtime.kv_cache import KVCache
from onnxlm.runtime.session_settings import resolve


def as_float32(logits: np.ndarray) -> np.ndarray:
    """Logits as float32 (the step's contract): a float16 graph's are widened, a copy; float32 ones are not."""
    return logits.astype(np.float32, copy=False)


class DecodeFeeds:
    """A decode step's inputs, allocated once per cache: at a few ms per step, fresh numpy arrays and OrtValues
    for three tiny inputs were a measurable share of the Python time around `run_with_iobinding`."""

    def __init__(self, batch: int, capacity: int, vocab: int, logits_dtype=np.float32):
        self.host_ids = np.zeros((batch, 1), np.int64)  # (batch, 1)
        self.positions = np.zeros((batch, 1), np.int64)  # (batch, 1)
        self.ones = np.ones(batch * capacity, np.int64)  # every attention mask is all ones: a prefix of this
        self.logits = np.empty((batch, 1, vocab), logits_dtype)  # (batch, 1, vocab)
        self.logits_value = ort_value(self.logits)

    def mask(self, batch: int, total: int) -> np.ndarray:
        return self.ones[: batch * total].reshape(batch, total)  # (batch, total), a view


class Binding:
    """An IO binding, and its outputs' names in binding order (ORT returns bound outputs by position; binding a
    name again keeps its place)."""

    def __init__(self, session):
        self.io = session.io_binding()
        self.outputs: list[str] = []
        self.inputs: dict = {}  # OrtValues bound by `bind_input`, kept alive while bound

    def bind_input(self, name: str, array: np.ndarray) -> None:
        """Bind an input by OrtValue: unlike bind_cpu_input, this reaches inputs that are also initializers
        (the optional inputs passes add)."""
        self.inputs[name] = ort_value(np.ascontiguousarray(array))
        self.io.bind_ortvalue_input(name, self.inputs[name])

    def bind_output(self, name: str, target) -> None:
        """Bind output `name` to a device (a str: ORT allocates) or to an OrtValue."""
        if isinstance(target, str):
            self.io.bind_output(name, target)
        else:
            self.io.bind_ortvalue_output(name, target)
        if name not in self.outputs:
            self.outputs.append(name)

    def fetch(self, name: str):
        return self.io.get_outputs()[self.outputs.index(name)]


class DecoderSession:
    """One loaded decoder. `step` runs new tokens against a KV cache and returns their logits."""

    def __init__(self, directory: Path, threads: int | None = None, ep: str | None = None, profile: bool = False,
                 spinning: bool = True, session: SessionSettings | None = None):
        """`threads` or `session` (SessionSettings) replace the session options the manifest recorded for this
        machine; spinning=False turns spinning off on top of either (runtime/session_settings.py)."""
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self.info = ModelInfo.from_dict(self.manifest["model"])
        self.backend = get_backend(ep or self.manifest["target"]["ep"])  # default: the artifact's target
        self.settings = resolve(self.manifest, str(self.directory), threads, spinning, session)
        self.threads = self.settings.threads  # None: ORT picks the count (physical cores) and pins the threads
        self._profile, self._session = profile, None
        self.kv_input_names = self._ordered_kv("past_key_values.{}.{}")
        self.kv_output_names = self._ordered_kv("present.{}.{}")
        self.shared_kv = shares_kv_buffer(self.manifest.get("op_histogram", {}), self.info.num_layers)
        self.interface = Interface.from_dict(self.manifest["interface"])
        self.extensions = [EXTENSIONS[f](self.interface.of(f), self.info) for f in self.interface.features
                           if f in EXTENSIONS]
        self.hot = all(e.hot for e in self.extensions)  # decode steps may take the preallocated fast path
        limits = [e.max_step_tokens for e in self.extensions if e.max_step_tokens]
        self.max_step_tokens = min(limits) if limits else None
        # decode steps replayed as captured device graphs: fixed shapes (decode_shapes) and the fast path only
        self.captures = (self.backend.device_binding and self.backend.graph_capture and self.shared_kv
                         and self.hot and self.interface.has(DECODE_SHAPES))
        self.capture_refused = None  # why ORT would not capture this graph's decode steps, if it refused
        self.kv_dtype, self.logits_dtype = np.float32, np.float32  # read from the graph when it opens
        self._argmax = None  # DeviceArgmax, made on first use
        self._captured_buffers: dict[int, tuple] = {}  # batch -> (KV values, arrays, DeviceFeeds) a graph reads
        self.device_rows = DeviceRows(self.backend)  # beam reordering of a cache on a device (lazy)
        if "static" not in self.manifest:  # a static artifact runs prefill.onnx/decode.onnx (runtime/static.py):
            self.session  # noqa: B018  (its dynamic model.onnx opens when stepped; it may not compile on an NPU)

    @property
    def session(self):
        """The ORT session of model.onnx, opened on first use; its KV inputs must match the manifest's layers."""
        if self._session is None:
            path = self.directory / MODEL_FILE
            try:
                session = self.backend.session(path, self.settings, self._profile, decoder=self.captures)
            except OnnxlmError as exc:  # ORT refuses capture when it placed nodes off the device: run uncaptured
                if not self.captures or "graph capture" not in str(exc):
                    raise
                self.captures, self.capture_refused = False, str(exc)
                session = self.backend.session(path, self.settings, self._profile)
            self.kv_dtype = kv_dtype(session)  # float16 after convert_float16
            self.logits_dtype = FLOAT_TYPES.get(next(o.type for o in session.get_outputs() if o.name == "logits"),
                                                np.float32)
            self.input_names = {i.name for i in session.get_inputs()}
            graph_layers = sum(1 for name in self.input_names if name.startswith("past_key_values."))
            if graph_layers != 2 * self.info.num_layers:
                raise OnnxlmError(f"{self.directory}: the manifest says {self.info.num_layers} layers but the graph "
                                  f"has KV inputs for {graph_layers // 2}")
            self._session = session
        return self._session

    def _ordered_kv(self, fmt: str) -> list[str]:
        return [fmt.format(i, kind) for i in range(self.info.num_layers) for kind in ("key", "value")]

    def new_cache(self, batch: int = 1, capacity: int | None = None, **options) -> KVCache:
        """An empty cache on the backend's device. `capacity` (positions) sizes the shared buffer of a GQA graph;
        default: context length. `options` go to the step extensions that take them (e.g. `halt_threshold`,
        QuickSilver's drift threshold, on a graph built by the quicksilver recipe).

        On a session that captures decode steps, a captured graph replays the addresses it was captured with: the
        caches of one batch size are all the same buffers, context-long (genai's static buffers), so only one
        cache per batch size may be in use at a time."""
        if self.shared_kv:
            capacity = min(capacity or self.info.context_length, self.info.context_length)
        else:
            capacity = None
        if self.captures:
            capacity = self.info.context_length
        for name, value in options.items():
            owner = next((cls for cls in EXTENSIONS.values() if name in cls.options), None)
            if owner is None:
                raise OnnxlmError(f"no step extension takes the option {name}")
            if value is not None and not self.interface.has(owner.feature):
                raise OnnxlmError(f"--{name.replace('_', '-')} needs an artifact built with {owner.needs}")
        if self.captures and batch in self._captured_buffers:  # the buffers its captured graph replays
            values, arrays, feeds = self._captured_buffers[batch]
            cache = KVCache(values=values, length=0, capacity=capacity, device=self.backend.device, arrays=arrays,
                            decode_feeds=feeds)
        else:
            cache = KVCache.empty(self.kv_input_names, batch, self.info.num_kv_heads, self.info.head_dim, capacity,
                                  self.backend.device, self.kv_dtype)
            if self.captures:
                self._captured_buffers[batch] = (cache.values, cache.arrays, self._feeds(cache, batch))
        if cache.shared and cache.arrays is None:  # a device: beam search reorders rows there
            cache.device_rows = self.device_rows
        for extension in self.extensions:
            extension.start(cache, batch, capacity or self.info.context_length, **options)
        return cache

    def step(self, token_ids: np.ndarray, cache: KVCache, positions: np.ndarray | None = None,
             last_only: bool = False, scoring: bool = False, inputs: dict | None = None) -> np.ndarray:
        """Run `token_ids` (batch, seq) at positions cache.length + cache.offset.. and advance the cache.

        Returns logits (batch, seq, vocab) as float32, or (batch, 1, vocab) for the last position with
        `last_only` (a prefill whose other rows nobody reads: on a logits_to_keep graph the LM head runs on that
        row only). For a decode step (seq == 1) the array is the cache's own buffer, overwritten by its next
        decode step: copy it to keep it.

        `positions` (batch, 1) gives each row its own position, for a decode batch whose rows hold different
        lengths (shared buffer only: GQA takes each row's length from its position). The caller then keeps the
        rows' lengths, and cache.length is not advanced. `scoring`: every position computes what a decode step
        would (perplexity). `inputs`: values for inputs of the interface, by name (they stay bound on a shared
        cache's binding).
        """
        return self._step(token_ids, cache, positions, last_only, scoring, None, inputs)[0]

    def step_reading(self, token_ids: np.ndarray, cache: KVCache, feature: str):
        """`step`, also returning what the step extension of `feature` read back (e.g. attention_probs: each
        layer's probabilities (batch, num_heads, seq, >= cache.length) over the cache's slots)."""
        if not any(e.feature == feature for e in self.extensions):
            needs = EXTENSIONS[feature].needs if feature in EXTENSIONS else "a pass that declares it"
            raise OnnxlmError(f"this artifact has no {feature.replace('_', ' ')} outputs: build it with {needs}")
        return self._step(token_ids, cache, None, False, False, feature, None)

    def _step(self, token_ids, cache, positions, last_only, scoring, want, inputs):
        batch, seq = token_ids.shape
        if seq == 1 and positions is None and cache.shared and self.hot and want is None and not inputs:
            return self._decode_step(token_ids, cache), None
        limit = self.max_step_tokens
        if limit and seq > limit and positions is None:
            if want is not None:
                raise OnnxlmError(f"a step that reads {want} takes at most {limit} tokens, got {seq}")
            chunks = [self._step(token_ids[:, i : i + limit], cache, None, last_only, scoring, None, inputs)[0]
                      for i in range(0, seq, limit)]
            return (chunks[-1] if last_only else np.concatenate(chunks, axis=1)), None
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
            positions = np.broadcast_to(np.arange(first, first + seq, dtype=np.int64), (batch, seq)).copy()
        binding = self._binding(cache)
        step = StepInfo(batch, seq, cache.length, last_only, scoring, ragged, want)
        for extension in self.extensions:
            extension.bind(binding, cache, step)
        for name, value in (inputs or {}).items():
            binding.bind_input(name, value)
        binding.io.bind_cpu_input("input_ids", np.ascontiguousarray(token_ids, dtype=np.int64))
        if "attention_mask" in self.input_names:
            binding.io.bind_cpu_input("attention_mask", np.ones((batch, total), np.int64))
        if "position_ids" in self.input_names:
            binding.io.bind_cpu_input("position_ids", positions)
        host_decode = seq == 1 and not self.backend.device_binding
        if host_decode:  # decode: ORT writes into the cache's buffer; no allocation, no copy
            feeds = self._feeds(cache, batch)
            binding.bind_output("logits", feeds.logits_value)
        else:  # prefill (ORT's arena reuses its memory; a fresh 100 MB array would page-fault), or a device's row
            binding.bind_output("logits", "cpu")
        self.session.run_with_iobinding(binding.io, self._run_options(None))
        for extension in self.extensions:
            extension.collect(binding, cache, step)
        if cache.shared and host_decode:  # the hot path: nothing to fetch, the buffers were written in place
            if not ragged:
                cache.advance(None, seq)
            return as_float32(feeds.logits), step.result
        outputs = binding.io.get_outputs()  # [logits, *presents, ...]: _binding binds them first, in this order
        presents = outputs[1 : 1 + len(self.kv_output_names)]
        if not (ragged and cache.shared):
            cache.advance(None if cache.shared else presents, seq)
        if host_decode:
            return as_float32(feeds.logits), step.result
        logits = as_float32(outputs[0].numpy())
        return (logits[:, -1:] if last_only else logits), step.result  # a view when the graph kept one row

    def _run_options(self, graph_id: int | None):
        """Run options of a step: a captured decode graph per batch size, or none (uncaptured)."""
        return self.backend.run_options(graph_id) if self.captures else None

    def _feeds(self, cache: KVCache, batch: int):
        """The cache's preallocated decode inputs and logits: DecodeFeeds on the host, DeviceFeeds on a device."""
        feeds = cache.decode_feeds
        if feeds is None or feeds.host_ids.shape[0] != batch:
            capacity = cache.capacity or self.info.context_length
            if self.backend.device_binding:
                feeds = DeviceFeeds(batch, capacity, self.info.vocab_size, self.logits_dtype, self.backend.device)
            else:
                feeds = DecodeFeeds(batch, capacity, self.info.vocab_size, self.logits_dtype)
            cache.decode_feeds = feeds
        return feeds

    def _decode_step(self, token_ids: np.ndarray, cache: KVCache) -> np.ndarray:
        """`step` for one token per row on a shared buffer: the hot path of every decoding loop. The inputs are
        written into preallocated arrays and bound by pointer; ORT writes K/V and logits in place. On a device the
        logits row is then copied to the host (`decode_greedy` avoids that)."""
        if self.backend.device_binding:
            return self._device_decode(token_ids, cache).host_logits()
        batch = token_ids.shape[0]
        cache.check_room(1)
        feeds = self._feeds(cache, batch)
        feeds.host_ids[:] = token_ids
        feeds.positions[:] = cache.length + cache.offset
        io = self._binding(cache).io
        io.bind_cpu_input("input_ids", feeds.host_ids)
        if "attention_mask" in self.input_names:
            io.bind_cpu_input("attention_mask", feeds.mask(batch, cache.length + 1))
        if "position_ids" in self.input_names:
            io.bind_cpu_input("position_ids", feeds.positions)
        io.bind_ortvalue_output("logits", feeds.logits_value)
        self.session.run_with_iobinding(io)
        cache.advance(None, 1)
        return as_float32(feeds.logits)

    def _device_decode(self, token_ids: np.ndarray, cache: KVCache) -> DeviceFeeds:
        """The decode step on a device: the same OrtValues bound every step (runtime/device_step.py), replayed as
        the captured graph of this batch size when the session captures; the logits stay on the device."""
        batch = token_ids.shape[0]
        cache.check_room(1)
        feeds = self._feeds(cache, batch)
        feeds.write(token_ids, cache.length + cache.offset)
        io = self._binding(cache).io
        io.bind_ortvalue_input("input_ids", feeds.ids)
        if "attention_mask" in self.input_names:
            if self.captures:  # as wide as the buffer: a fixed shape (decode_shapes reads its width as the total)
                io.bind_ortvalue_input("attention_mask", feeds.mask)
            else:
                io.bind_cpu_input("attention_mask", np.ones((batch, cache.length + 1), np.int64))
        if "position_ids" in self.input_names:
            io.bind_ortvalue_input("position_ids", feeds.positions)
        io.bind_ortvalue_output("logits", feeds.logits)
        self.session.run_with_iobinding(io, self._run_options(batch))
        cache.advance(None, 1)
        return feeds

    def decode_greedy(self, token_ids: np.ndarray, cache: KVCache) -> np.ndarray:
        """One decode step, returning each row's argmax token (batch,) int64. On a device, on the fast path, the
        argmax is taken there and only the token ids cross to the host."""
        batch = token_ids.shape[0]
        if self.backend.device_binding and cache.shared and self.hot:
            if self._argmax is None:
                self._argmax = DeviceArgmax(self.backend, self.logits_dtype)
            return self._argmax(self._device_decode(np.asarray(token_ids, np.int64).reshape(batch, 1), cache))
        return np.argmax(self.step(token_ids, cache)[:, -1], axis=-1)

    def _binding(self, cache: KVCache) -> Binding:
        """The IO binding for this step. A shared cache keeps one, its buffers bound once as past and present;
        a growing cache binds the last step's presents as this step's past."""
        if cache.shared and cache.binding is not None:
            return cache.binding
        binding = Binding(self.session)
        for name, value in zip(self.kv_input_names, cache.values):
            binding.io.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name, value in zip(self.kv_output_names, cache.values):
            # shared: the same buffer as the past, written in place
            binding.bind_output(name, value if cache.shared else self.backend.device)
        if cache.shared:
            cache.binding = binding
        return binding

    def stats(self, cache: KVCache) -> dict[str, int]:
        """The step extensions' counts for one cache's run (summed by a perplexity over its windows)."""
        return {k: v for e in self.extensions for k, v in e.stats(cache).items()}

    def report(self, totals: dict[str, int], options: dict) -> dict:
        """What the step extensions say about a run, from its summed `stats` and the cache options it ran with."""
        return {k: v for e in self.extensions for k, v in e.report(totals, options).items()}
