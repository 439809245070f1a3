"""QuickSilver dynamic token halting with KV skipping (Khanna et al., arXiv 2506.22396), as in-graph masking.

Input: a lowered graph (one GroupQueryAttention per layer), of any family: the residual stream and its joins come
from the decoder-structure analysis (passes/decoder_structure.py).
The pass adds:
- input `halt_threshold` (float scalar; 0 = never halt);
- input `past_halted` (batch, layers, past) bool: which cached tokens skipped which layers;
- output `halted` (batch, layers, seq) bool: which layers each new token skipped.
A token halts before layer l (l >= min_layer) once its relative drift ||r_l - r_{l-1}|| / ||r_{l-1}|| over the
previous layer fell below the threshold (a normalised drift: the stream's norm grows with depth, methods.md 2g);
it stays halted. A halted token's attention and MLP updates are dropped (its residual stays r_l, so the head
reads its last state: the early exit), and its K/V at the layers it skipped are masked out of every query's
attention with an additive bias (masked, not zeroed: a zero key still takes softmax weight). The first position
of a sequence never halts. With skip_kv=False a halted token still writes K/V at the deeper layers, computed
from its frozen residual (CALM's propagation; the layer's K/V projections still run on it in this dense graph).

Dense graph: every token still runs every GEMM, so the FLOPs that halting would save are counted from `halted`
(runtime), not saved in wall-clock; that needs per-layer gathers of the live tokens (dynamic shapes).
Guarantee: at threshold 0 the logits equal the graph before (the manager's lossless check).
Contextual token fusion is not implemented (it changes the sequence length mid-network).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onnxlm.errors import OnnxlmError
from onnxlm.interface import Port
from onnxlm.passes.base import FUSED, Pass, PassContext
from onnxlm.passes.constants import add_initializer
from onnxlm.passes.decoder_structure import find_decoder

ATTENTION_BIAS = 10  # GroupQueryAttention input index (ORT 1.32 schema)
MASKED = -1e9  # additive bias of a skipped key: exp underflows to 0, and a row never becomes all -inf


@dataclasses.dataclass
class HaltingOptions:
    min_layer: int = 4  # no token halts before this layer
    skip_kv: bool = True  # QuickSilver's KV skipping; False: a halted token's K/V come from its frozen state (CALM)


class QuickSilverHalting(Pass):
    name = "quicksilver_halting"
    requires = (FUSED,)
    Options = HaltingOptions

    def ports(self, info):
        feature = "token_halting"
        return [
            Port("halt_threshold", "input", "float32", (), feature, "threshold", default=0.0,
                 meaning="a token halts once a layer moves its residual by less than this x its norm; 0: never"),
            Port("past_halted", "input", "bool", ("batch", "layers", "past"), feature, "past", default=False,
                 meaning="which cached tokens skipped which layers"),
            Port("halted", "output", "bool", ("batch", "layers", "seq"), feature, "halted",
                 meaning="which layers each new token skipped"),
        ]

    def validate(self) -> None:
        if self.options.min_layer < 1:
            raise OnnxlmError(f"pass 'quicksilver_halting' option 'min_layer' must be >= 1, got {self.options.min_layer}")

    def run(self, model, ctx: PassContext):
        import onnx_ir as ir

        graph, layers = model.graph, ctx.info.num_layers
        if self.options.min_layer >= layers:
            raise OnnxlmError(f"min_layer {self.options.min_layer} leaves no layer to halt in a {layers}-layer model")
        decoder = find_decoder(graph, ctx.info)
        gqas = [decoder.attn(layer).attention for layer in range(layers)]
        if any(n is None for n in gqas):
            raise OnnxlmError("quicksilver_halting needs the lowered graph (recipe fp32 or a quantized one): "
                              f"{gqas.count(None)} of {layers} layers have no GroupQueryAttention")
        if any(len(n.inputs) > ATTENTION_BIAS and n.inputs[ATTENTION_BIAS] is not None for n in gqas):
            raise OnnxlmError("the GroupQueryAttention nodes already have an attention bias")
        b = _Builder(graph)
        inputs = {v.name: v for v in graph.inputs}
        threshold = ir.Value(name="halt_threshold", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([]))
        graph.inputs.append(threshold)
        past = ir.Value(name="past_halted", type=ir.TensorType(ir.DataType.BOOL),
                        shape=ir.Shape(["batch", layers, "past"]))
        graph.inputs.append(past)
        positions = inputs["position_ids"]  # (batch, seq)
        zero = b.const("zero", np.array(0.0, np.float32))
        halted = b.op("Less", positions, b.const("pos0", np.array(0, np.int64)))  # all false: nobody halts yet
        movable = b.op("Greater", positions, b.const("pos0", np.array(0, np.int64)))  # the first token never halts
        bias_shape = b.op("Concat", b.const("ones2", np.array([1, 1], np.int64)),
                          b.op("Shape", positions, start=1, end=2), b.const("one", np.array([1], np.int64)), axis=0)
        per_layer = []
        for layer in range(layers):
            attn, mlp = decoder.attn(layer), decoder.mlp(layer)
            if layer >= self.options.min_layer:  # halt before this layer if the previous one barely moved r
                after, before = attn.stream_in, decoder.attn(layer - 1).stream_in  # r entering l and l-1
                drift = b.op("Div", b.op("ReduceL2", b.op("Sub", after, before), b.axis_last, keepdims=0),
                             b.op("ReduceL2", before, b.axis_last, keepdims=0))  # (batch, seq)
                halted = b.op("Or", halted, b.op("And", b.op("Less", drift, threshold), movable))
            per_layer.append(halted)
            skip = b.op("Unsqueeze", halted, b.axis_last)  # (batch, seq, 1)
            for block in (attn, mlp):  # drop the layer's two updates: the residual passes through
                branch = block.join.inputs[block.branch_index]
                block.join.replace_input_with(block.branch_index, b.op("Where", skip, zero, branch))
            if not self.options.skip_kv:
                continue
            layer_past = b.op("Squeeze", b.op("Slice", past, b.const(f"at{layer}", np.array([layer], np.int64)),
                                              b.const(f"at{layer + 1}", np.array([layer + 1], np.int64)),
                                              b.const("one", np.array([1], np.int64))),
                              b.const("one", np.array([1], np.int64)))  # (batch, past)
            keys = b.op("Concat", layer_past, halted, axis=1)  # (batch, total): which keys skipped this layer
            bias = b.op("Where", keys, b.const("masked", np.array(MASKED, np.float32)), zero)
            bias = b.op("Expand", b.op("Unsqueeze", bias, b.const("axes12", np.array([1, 2], np.int64))), bias_shape)
            node = gqas[layer]
            while len(node.inputs) <= ATTENTION_BIAS:
                node.resize_inputs(len(node.inputs) + 1)
            node.replace_input_with(ATTENTION_BIAS, bias)  # (batch, 1, seq, total)
        stacked = b.op("Concat", *[b.op("Unsqueeze", h, b.const("one", np.array([1], np.int64))) for h in per_layer],
                       axis=1)  # (batch, layers, seq)
        stacked.name, stacked.dtype, stacked.shape = "halted", ir.DataType.BOOL, ir.Shape(["batch", layers, "seq"])
        graph.outputs.append(stacked)
        graph.extend(b.nodes)
        graph.sort()
        return True, {"layers_with_halting": layers - self.options.min_layer}, []


class _Builder:
    """New nodes for the pass, inserted together before the graph's first node; constants as initializers."""

    def __init__(self, graph):
        self.graph, self.nodes, self.consts = graph, [], {}
        self.axis_last = self.const("axis_last", np.array([-1], np.int64))

    def const(self, name: str, array: np.ndarray):
        if name not in self.consts:
            self.consts[name] = add_initializer(self.graph, f"halting.{name}", array)
        return self.consts[name]

    def op(self, op_type: str, *args, **attrs):
        import onnx_ir as ir

        node = ir.node(op_type, list(args), attributes=attrs)
        self.nodes.append(node)
        return node.outputs[0]
