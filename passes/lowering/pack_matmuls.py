"""Pack MatMuls that read the same activation into one MatMul over concatenated weights (lossless).

`pack_qkv`: a GroupQueryAttention whose query, key and value are MatMul(x, Wq), MatMul(x, Wk), MatMul(x, Wv)
becomes GroupQueryAttention(MatMul(x, [Wq | Wk | Wv]), -, -): GQA's packed-QKV form, as the genai builder emits;
with q/k/v biases (Qwen2) each projection is Add(MatMul(x, W), b) and the packed one adds [bq | bk | bv].
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


def biased_matmul(node):
    """(MatMul, bias array or None) for MatMul(x, W) or Add(MatMul(x, W), constant 1-D bias), else None."""
    if node is not None and node.op_type == "Add" and node.domain in ("", "ai.onnx"):
        bias = node.inputs[1]
        matmul = node.inputs[0].producer() if node.inputs[0] is not None else None
        if matmul is None or matmul.op_type != "MatMul" or bias is None or bias.const_value is None:
            return None
        values = bias.const_value.numpy()
        return (matmul, values) if values.ndim == 1 and len(matmul.outputs[0].uses()) == 1 else None
    return (node, None) if node is not None and node.op_type == "MatMul" else None


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
        import onnx_ir as ir

        graph = model.graph
        packed = 0
        for gqa in [n for n in graph if n.op_type == "GroupQueryAttention"]:
            projections = [biased_matmul(v.producer() if v is not None else None) for v in gqa.inputs[:3]]
            if any(p is None for p in projections):
                continue
            producers = [matmul for matmul, _ in projections]
            weights = [constant_weight(p) for p in producers]
            biases = [bias for _, bias in projections]
            if any(w is None for w in weights) or len({p.inputs[0] for p in producers}) != 1 or (
                    any(b is None for b in biases) and any(b is not None for b in biases)):
                continue
            x = producers[0].inputs[0]
            node = packed_matmul(graph, x, weights, f"{gqa.name}.qkv_proj")
            graph.insert_before(producers[0], node)
            node.outputs[0].dtype = gqa.inputs[0].dtype
            packed_qkv = node.outputs[0]
            if biases[0] is not None:  # q/k/v biases (Qwen2): one Add of [bq | bk | bv]
                bias = add_initializer(graph, f"{gqa.name}.qkv_proj.bias", np.concatenate(biases))
                add = ir.node("Add", [packed_qkv, bias], name=f"{gqa.name}.qkv_proj.add")
                graph.insert_after(node, add)
                add.outputs[0].dtype = packed_qkv.dtype
                packed_qkv = add.outputs[0]
            old = [v.producer() for v in gqa.inputs[:3]]
            gqa.replace_input_with(0, packed_qkv)
            gqa.replace_input_with(1, None)
            gqa.replace_input_with(2, None)
            for p in [*old, *producers]:
                if p.graph is not None and not p.outputs[0].uses():
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
