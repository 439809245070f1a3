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
from onnxlm.errors import OnnxlmError
from onnxlm.interface import Interface
from onnxlm.model_info import ModelInfo, shares_kv_buffer
from onnxlm.runtime.extensions import EXTENSIONS, StepInfo, ort_value
from onnxlm.runtime.kv_cache import KVCache


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
                 spinning: bool = True):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self.info = ModelInfo.from_dict(self.manifest["model"])
        self.backend = get_backend(ep or self.manifest["target"]["ep"])  # default: the artifact's target
        self.threads = threads  # None: ORT picks the count (physical cores) and pins the threads
        self._options, self._session = (profile, spinning), None
        if "static" not in self.manifest:  # a static artifact runs prefill.onnx/decode.onnx (runtime/static.py):
            self.session  # noqa: B018  (its dynamic model.onnx opens when stepped; it may not compile on an NPU)
        self.kv_input_names = self._ordered_kv("past_key_values.{}.{}")
        self.kv_output_names = self._ordered_kv("present.{}.{}")
        self.shared_kv = shares_kv_buffer(self.manifest.get("op_histogram", {}), self.info.num_layers)
        self.interface = Interface.from_dict(self.manifest["interface"])
        self.extensions = [EXTENSIONS[f](self.interface.of(f), self.info) for f in self.interface.features
                           if f in EXTENSIONS]
        self.hot = all(e.hot for e in self.extensions)  # decode steps may take the preallocated fast path
        limits = [e.max_step_tokens for e in self.extensions if e.max_step_tokens]
        self.max_step_tokens = min(limits) if limits else None

    @property
    def session(self):
        """The ORT session of model.onnx, opened on first use; its KV inputs must match the manifest's layers."""
        if self._session is None:
            session = self.backend.session(self.directory / MODEL_FILE, self.threads, *self._options)
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
        QuickSilver's drift threshold, on a graph built by the quicksilver recipe)."""
        if self.shared_kv:
            capacity = min(capacity or self.info.context_length, self.info.context_length)
        else:
            capacity = None
        for name, value in options.items():
            owner = next((cls for cls in EXTENSIONS.values() if name in cls.options), None)
            if owner is None:
                raise OnnxlmError(f"no step extension takes the option {name}")
            if value is not None and not self.interface.has(owner.feature):
                raise OnnxlmError(f"--{name.replace('_', '-')} needs an artifact built with {owner.needs}")
        cache = KVCache.empty(self.kv_input_names, batch, self.info.num_kv_heads, self.info.head_dim, capacity,
                              self.backend.device)
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
        if seq == 1:  # decode: ORT writes into the cache's buffer; no allocation, no copy
            feeds = self._feeds(cache, batch)
            logits = feeds.logits
            binding.bind_output("logits", feeds.logits_value)
        else:  # prefill: ORT's arena reuses its memory across requests; a fresh 100 MB array would page-fault
            binding.bind_output("logits", "cpu")
        self.session.run_with_iobinding(binding.io)
        for extension in self.extensions:
            extension.collect(binding, cache, step)
        if cache.shared and seq == 1:  # the hot path: nothing to fetch, the buffers were written in place
            if not ragged:
                cache.advance(None, seq)
            return logits, step.result
        outputs = binding.io.get_outputs()  # [logits, *presents, ...]: _binding binds them first, in this order
        presents = outputs[1 : 1 + len(self.kv_output_names)]
        cache.advance(None if cache.shared else presents, seq)
        if seq == 1:
            return logits, step.result
        logits = outputs[0].numpy()
        return (logits[:, -1:] if last_only else logits), step.result  # a view when the graph kept one row

    def _feeds(self, cache: KVCache, batch: int) -> DecodeFeeds:
        if cache.decode_feeds is None or cache.decode_feeds.ids.shape[0] != batch:
            cache.decode_feeds = DecodeFeeds(batch, cache.capacity or self.info.context_length, self.info.vocab_size)
        return cache.decode_feeds

    def _decode_step(self, token_ids: np.ndarray, cache: KVCache) -> np.ndarray:
        """`step` for one token per row on a shared buffer: the hot path of every decoding loop. The inputs are
        written into preallocated arrays and bound by pointer; ORT writes K/V and logits in place."""
        batch = token_ids.shape[0]
        cache.check_room(1)
        feeds = self._feeds(cache, batch)
        feeds.ids[:] = token_ids
        feeds.positions[:] = cache.length + cache.offset
        io = self._binding(cache).io
        io.bind_cpu_input("input_ids", feeds.ids)
        if "attention_mask" in self.input_names:
            io.bind_cpu_input("attention_mask", feeds.mask(batch, cache.length + 1))
        if "position_ids" in self.input_names:
            io.bind_cpu_input("position_ids", feeds.positions)
        io.bind_ortvalue_output("logits", feeds.logits_value)
        self.session.run_with_iobinding(io)
        cache.advance(None, 1)
        return feeds.logits

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
