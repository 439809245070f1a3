"""`decode_shapes`: make a decode step's shapes and host-side values independent of the step, so that the CUDA EP
can capture it once and replay it (the CUDA backend's lowering; backends/cuda.py).

The lowered graph derives two things from `position_ids` on every step:
- GroupQueryAttention's `total_sequence_length`, an int32 scalar that ORT's CUDA kernel reads on the host: a
  device value there costs a copy to the host inside the step, which graph capture does not allow;
- the rotary cos/sin caches, `Range(0, max(position) + 1)` long: a shape that changes every step.

After the pass, `total_sequence_length` is the attention mask's width (`Cast(Gather(Shape(attention_mask), 1))`,
the form onnxruntime-genai's builder uses: a shape, computed on the host without reading the device), and the
caches are constants over the whole context, computed here by ORT from the graph's own rotary subgraph. GQA still
reads each row's length from seqlens_k (the positions), so a runtime that binds a mask as wide as its KV buffer
gets a step whose every shape and address is fixed (runtime/session.py's device path).

Input: a lowered graph (GroupQueryAttention) with an `attention_mask` input.
Guarantees: lossless for every caller that feeds a mask of the total length (ORT, genai, onnxlm's runtime): the
manager checks it. Feature `decode_shapes` tells the runtime that decode steps may be captured.
"""

from __future__ import annotations

import numpy as np

from onnxlm.interface import DECODE_SHAPES
from onnxlm.passes.base import FOLDED, FUSED, Pass, PassContext
from onnxlm.passes.constants import add_initializer
from onnxlm.passes.quant.linears import drop_unused

TOTAL, COS, SIN = 6, 7, 8  # GroupQueryAttention's inputs


def evaluate_subgraph(graph, outputs: list, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Compute `outputs` (values of `graph`) from the graph inputs in `feeds`, by ORT on the CPU, on a copy of
    just the nodes they depend on."""
    import onnx
    import onnx_ir as ir
    import onnxruntime as ort

    nodes, seen, stack = [], set(), [v.producer() for v in outputs]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        nodes.append(node)
        stack.extend(v.producer() for v in node.inputs if v is not None)
    order = {id(n): i for i, n in enumerate(graph)}
    nodes.sort(key=lambda n: order[id(n)])
    inputs = {v.name for n in nodes for v in n.inputs if v is not None}
    initializers = [ir.serde.serialize_tensor(v.const_value) for n in nodes for v in n.inputs
                    if v is not None and v.producer() is None and v.const_value is not None]
    proto = onnx.helper.make_model(
        onnx.helper.make_graph(
            [ir.serde.serialize_node(n) for n in nodes], "subgraph",
            [onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
             for name, a in feeds.items() if name in inputs],
            [onnx.helper.make_empty_tensor_value_info(v.name) for v in outputs],
            initializer=list({t.name: t for t in initializers}.values())),
        opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in graph.opset_imports.items()], ir_version=10)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run([v.name for v in outputs], {k: v for k, v in feeds.items() if k in inputs})


class DecodeShapes(Pass):
    name = "decode_shapes"
    requires = (FOLDED, FUSED)

    def features(self):
        return [DECODE_SHAPES]

    def run(self, model, ctx: PassContext):
        import onnx_ir as ir

        graph = model.graph
        attention = [n for n in graph if n.op_type == "GroupQueryAttention"]
        mask = next((v for v in graph.inputs if v.name == "attention_mask"), None)
        if not attention or mask is None:
            return False, {}, ["no GroupQueryAttention and attention_mask: decode steps run uncaptured"]
        # total_sequence_length: the mask's width, computed from its shape on the host
        width = ir.node("Shape", [mask], attributes={"start": 1, "end": 2}, name="decode_shapes.mask_width")  # (1,)
        total = ir.node("Squeeze", [width.outputs[0]], name="decode_shapes.total_int64")  # ()
        cast = ir.node("Cast", [total.outputs[0]], attributes={"to": ir.DataType.INT32},
                       name="decode_shapes.total")  # () int32
        graph.insert_before(attention[0], [width, total, cast])
        for node in attention:
            node.replace_input_with(TOTAL, cast.outputs[0])
        # the rotary caches: the graph's own cos/sin at every position of the context, as constants
        caches = {(n.inputs[COS], n.inputs[SIN]) for n in attention
                  if len(n.inputs) > SIN and n.inputs[COS] is not None and n.inputs[COS].const_value is None}
        last = np.array([[ctx.info.context_length - 1]], np.int64)  # (1, 1): positions 0..context-1 in the cache
        for i, (cos, sin) in enumerate(sorted(caches, key=lambda pair: pair[0].name)):
            values = evaluate_subgraph(graph, [cos, sin], {"position_ids": last})
            constants = [add_initializer(graph, f"decode_shapes.{kind}_cache.{i}", value)
                         for kind, value in zip(("cos", "sin"), values)]  # (context, rotary_dim / 2) each
            for node in attention:
                if (node.inputs[COS], node.inputs[SIN]) == (cos, sin):
                    node.replace_input_with(COS, constants[0])
                    node.replace_input_with(SIN, constants[1])
        drop_unused(model)
        return True, {"total_sequence_length": len(attention), "rotary_caches": len(caches)}, []
