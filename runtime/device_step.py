"""The decode step on a device (the CUDA EP): everything bound once, at fixed addresses, and the logits kept there.

On a backend with `device_binding` (backends/cuda.py) a decode step on the shared KV buffer binds OrtValues that
live on the device and are allocated once per cache (`DeviceFeeds`): the token ids, the positions, an attention
mask as wide as the KV buffer, and the logits. The host writes the tokens and positions into them (batch x 8 bytes
each), so every address and shape stays the same from step to step: what a captured CUDA graph replays
(`enable_cuda_graph`, one graph per batch size, `gpu_graph_id`; the mask's width is GroupQueryAttention's
total_sequence_length after the `decode_shapes` pass, and each row's length still comes from its position).

The logits do not cross to the host unless asked for: greedy decoding takes the argmax on the device
(`DeviceArgmax`, a one-node ArgMax session on the same EP, bound to the logits' OrtValue), and only the chosen
token ids come back. Sampling, beam search and perplexity read the logits row (batch, 1, vocab) on the host.

Every piece here also runs with the CPU as the "device" (a CPU backend with device_binding): the tests take that
path, so it is checked without a GPU, but nothing here has been timed or run on a GPU.
"""

from __future__ import annotations

import numpy as np

from onnxlm.backends.base import FLOAT_TYPES


def device_value(shape: tuple, dtype, device: str, device_id: int = 0):
    """An uninitialised OrtValue on `device`, allocated once and written in place from then on."""
    import onnxruntime as ort

    return ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, device, device_id)


class DeviceFeeds:
    """A decode step's inputs and its logits as OrtValues on the device, allocated once per cache."""

    def __init__(self, batch: int, capacity: int, vocab: int, logits_dtype, device: str, device_id: int = 0):
        import onnxruntime as ort

        self.host_ids = np.zeros((batch, 1), np.int64)  # (batch, 1): written by the host, copied in each step
        self.host_positions = np.zeros((batch, 1), np.int64)  # (batch, 1)
        self.ids = device_value((batch, 1), np.int64, device, device_id)
        self.positions = device_value((batch, 1), np.int64, device, device_id)
        # (batch, capacity) ones: the graph's total_sequence_length is its width (decode_shapes)
        self.mask = ort.OrtValue.ortvalue_from_numpy(np.ones((batch, capacity), np.int64), device, device_id)
        self.logits = device_value((batch, 1, vocab), logits_dtype, device, device_id)  # (batch, 1, vocab)

    def write(self, token_ids: np.ndarray, position: int) -> None:
        self.host_ids[:] = token_ids
        self.host_positions[:] = position
        self.ids.update_inplace(self.host_ids)
        self.positions.update_inplace(self.host_positions)

    def host_logits(self) -> np.ndarray:
        """The logits row on the host as float32, (batch, 1, vocab): what sampling and beam search read."""
        return self.logits.numpy().astype(np.float32, copy=False)


def argmax_model(logits_type: int):
    """ArgMax over the vocabulary: logits (batch, 1, vocab) -> token ids (batch, 1) int64."""
    import onnx

    helper = onnx.helper
    graph = helper.make_graph(
        [helper.make_node("ArgMax", ["logits"], ["token"], axis=-1, keepdims=0)], "argmax",
        [helper.make_tensor_value_info("logits", logits_type, ["batch", 1, "vocab"])],
        [helper.make_tensor_value_info("token", onnx.TensorProto.INT64, ["batch", 1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


class DeviceArgmax:
    """Greedy's choice on the device: an ArgMax session on the backend's EP reads the logits' OrtValue where it
    lies and writes the token ids (batch x 8 bytes) into host memory."""

    def __init__(self, backend, logits_dtype):
        import onnx
        import onnxruntime as ort

        proto = argmax_model(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(logits_dtype)))
        self.session = ort.InferenceSession(proto.SerializeToString(), backend.session_options(),
                                            providers=list(backend.providers),
                                            provider_options=backend.session_provider_options(decoder=False))
        self.io = self.session.io_binding()

    def __call__(self, feeds: DeviceFeeds) -> np.ndarray:
        self.io.bind_ortvalue_input("logits", feeds.logits)
        self.io.bind_output("token", "cpu")
        self.session.run_with_iobinding(self.io)
        return self.io.get_outputs()[0].numpy()[:, 0]  # (batch,)


def rows_model(count: int, kv_type: int, gather: bool):
    """`count` KV buffers (batch, kv_heads, capacity, head_dim) -> the same, each Gather(buffer, rows, axis 0)
    with `gather`, else an Identity (a device-to-device copy into buffers bound as outputs)."""
    import onnx

    helper = onnx.helper
    shape = ["batch", "kv_heads", "capacity", "head_dim"]
    nodes = [helper.make_node("Gather", [f"kv{i}", "rows"], [f"out{i}"], axis=0) if gather else
             helper.make_node("Identity", [f"kv{i}"], [f"out{i}"]) for i in range(count)]
    inputs = [helper.make_tensor_value_info(f"kv{i}", kv_type, shape) for i in range(count)]
    if gather:
        inputs.append(helper.make_tensor_value_info("rows", onnx.TensorProto.INT64, ["batch"]))
    graph = helper.make_graph(nodes, "rows", inputs,
                              [helper.make_tensor_value_info(f"out{i}", kv_type, shape) for i in range(count)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


class DeviceRows:
    """Beam search's row reordering of a KV cache that lives on the device, where the host cannot edit it: one
    run gathers every buffer's rows into scratch buffers (as large as the cache), a second copies them back into
    the cache's own buffers, whose addresses a captured graph and the IO binding keep. Sessions and scratch are
    made on first use (most generations never reorder)."""

    def __init__(self, backend):
        self.backend, self.sessions, self.scratch = backend, None, []

    def _prepare(self, values: list) -> None:
        import onnx
        import onnxruntime as ort

        dtype = FLOAT_TYPES[values[0].data_type()]
        if self.sessions is None:
            kv_type = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
            b = self.backend
            self.sessions = [ort.InferenceSession(rows_model(len(values), kv_type, gather).SerializeToString(),
                                                  b.session_options(), providers=list(b.providers),
                                                  provider_options=b.session_provider_options(decoder=False))
                             for gather in (True, False)]
        if [s.shape() for s in self.scratch] != [v.shape() for v in values]:
            self.scratch = [device_value(tuple(v.shape()), dtype, self.backend.device) for v in values]

    def reorder(self, values: list, rows: np.ndarray) -> None:
        self._prepare(values)
        gather, copy = (s.io_binding() for s in self.sessions)
        for i, (value, scratch) in enumerate(zip(values, self.scratch)):
            gather.bind_ortvalue_input(f"kv{i}", value)
            gather.bind_ortvalue_output(f"out{i}", scratch)
            copy.bind_ortvalue_input(f"kv{i}", scratch)
            copy.bind_ortvalue_output(f"out{i}", value)
        gather.bind_cpu_input("rows", np.ascontiguousarray(rows, np.int64))  # (batch,)
        self.sessions[0].run_with_iobinding(gather)
        self.sessions[1].run_with_iobinding(copy)
