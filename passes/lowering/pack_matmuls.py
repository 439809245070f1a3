"""Pack MatMuls that read the same activation into one MatMul over concatenated weights (lossless).

`pack_qkv`: a GroupQueryAttention whose query, key and value are MatMul(x, Wq), MatMul(x, Wk), MatMul(x, Wv)
becomes GroupQueryAttention(MatMul(x, [Wq | Wk | Wv]), -, -): GQA's packed-QKV form, as the genai builder emits.
`pack_gate_up`: two MatMuls of the same x with constant weights (the SwiGLU gate and up projections) become one
MatMul and a Split.

A decode step is a GEMV per weight matrix; one wider GEMV instead of two or three saves a pass over x and the
per-op overhead. Weights must be constant 2-D [K, N] initializers; anything else is left alone.
"""

from __future__ import annotations

import collections

import numpy as np

from onnxlm.passes.base import FLOAT_WEIGHTS, FOLDED, FUSED, Pass, PassContext
from onnxlm.passes.constants import add_initializer


def constant_weight(node):
    """The [K, N] numpy weight of MatMul(x, W) when W is a constant, else None."""
    if node is None or node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
        return None
    w = node.inputs[1]
    if w is None or w.const_value is None or len(w.shape or ()) != 2:
        return None
    return w.const_value.numpy()


def packed_matmul(graph, x, weights: list[np.ndarray], name: str):
    """Append MatMul(x, concat(weights, axis=1)) to the graph and return its node."""
    import onnx_ir as ir

    packed = add_initializer(graph, f"{name}.weight", np.concatenate(weights, axis=1))
    node = ir.node("MatMul", [x, packed], name=name)
    return node


class PackQKV(Pass):
    """Feed GroupQueryAttention one packed QKV MatMul (com.microsoft GroupQueryAttention, packed-QKV form)."""

    name = "pack_qkv"
    requires = (FUSED, FLOAT_WEIGHTS)

    def run(self, model, ctx: PassContext):
        graph = model.graph
        packed = 0
        for gqa in [n for n in graph if n.op_type == "GroupQueryAttention"]:
            producers = [v.producer() if v is not None else None for v in gqa.inputs[:3]]
            weights = [constant_weight(p) for p in producers]
            if any(w is None for w in weights) or len({p.inputs[0] for p in producers}) != 1:
                continue
            x = producers[0].inputs[0]
            node = packed_matmul(graph, x, weights, f"{gqa.name}.qkv_proj")
            graph.insert_before(producers[0], node)
            node.outputs[0].dtype = gqa.inputs[0].dtype
            gqa.replace_input_with(0, node.outputs[0])
            gqa.replace_input_with(1, None)
            gqa.replace_input_with(2, None)
            for p in producers:
                if not p.outputs[0].uses():
                    graph.remove(p, safe=True)
            packed += 1
        return packed > 0, {"packed_qkv": packed}, []


class PackGateUp(Pass):
    """Pack pairs of MatMuls that share their input and have constant weights into one MatMul + Split."""

    name = "pack_gate_up"
    requires = (FOLDED, FLOAT_WEIGHTS)

    def run(self, model, ctx: PassContext):
        import onnx_ir as ir

        graph = model.graph
        groups = collections.defaultdict(list)
        for node in graph:
            if constant_weight(node) is not None:
                groups[node.inputs[0]].append(node)
        packed = 0
        for x, nodes in groups.items():
            if len(nodes) != 2:
                continue
            weights = [constant_weight(n) for n in nodes]
            if weights[0].shape[0] != weights[1].shape[0]:
                continue
            matmul = packed_matmul(graph, x, weights, f"{nodes[0].name}.gate_up_proj")
            widths = add_initializer(graph, f"{matmul.name}.split", np.array([w.shape[1] for w in weights], np.int64))
            split = ir.node("Split", [matmul.outputs[0], widths], attributes={"axis": -1}, num_outputs=2)
            graph.insert_before(nodes[0], [matmul, split])
            for old, new in zip(nodes, split.outputs):
                new.dtype, new.shape = old.outputs[0].dtype, old.outputs[0].shape
                old.outputs[0].replace_all_uses_with(new)
                graph.remove(old, safe=True)
            packed += 1
        return packed > 0, {"packed_gate_up": packed}, []
