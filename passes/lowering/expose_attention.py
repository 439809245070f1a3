"""GroupQueryAttention I/O for KV-cache eviction: positions apart from cache slots, and attention probabilities.

After eviction the cache holds fewer slots than the tokens seen, so the slot count (what GQA attends over) and
the rotary position of a new token differ. The lowered graph derives both from position_ids; this pass makes
GQA read them separately:
- seqlens_k = sum(attention_mask) - 1 and total_sequence_length = attention_mask's length: the slots in use;
- GQA's own `position_ids` input = the graph's position_ids: the rotary position of each new token.
With `probs`, each GQA also returns its post-softmax attention (qk_output=2) as the graph output
`attention_probs.{layer}`, (batch, num_heads, seq, total): the column sums and per-row statistics that H2O's and
VEDA's eviction scores are made of (methods.md 6.4).

Lossless: with a mask of ones as long as the positions the logits are those of the graph before (the manager's
check). Input: a graph lowered by `fuse_gqa` (one GroupQueryAttention per layer).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onnxlm.errors import OnnxlmError
from onnxlm.interface import Port
from onnxlm.passes.base import FUSED, Pass, PassContext
from onnxlm.passes.constants import add_initializer

SEQLENS_K, TOTAL_LENGTH, POSITION_IDS = 5, 6, 9  # GroupQueryAttention input indices (ORT 1.32 schema)
PROBS_OUTPUT = "attention_probs.{}"


@dataclasses.dataclass
class ExposeAttentionOptions:
    probs: bool = True  # also return each layer's attention probabilities (H2O / VEDA scores)


class ExposeAttention(Pass):
    name = "expose_attention"
    requires = (FUSED,)
    Options = ExposeAttentionOptions

    def features(self):
        return ["kv_positions"]  # position_ids are rotary positions, apart from the cache slots in use

    def ports(self, info):
        if not self.options.probs:
            return []
        return [Port(PROBS_OUTPUT.replace("{}", "{layer}"), "output", "float32", ("batch", "heads", "seq", "total"),
                     feature="attention_probs", role="probs",
                     meaning="each layer's post-softmax attention over the cache slots (H2O / VEDA scores)")]

    def run(self, model, ctx: PassContext):
        import onnx_ir as ir

        graph = model.graph
        gqas = [n for n in graph if n.op_type == "GroupQueryAttention"]
        inputs = {v.name: v for v in graph.inputs}
        if not gqas:
            return False, {"gqa": 0}, ["no GroupQueryAttention: run the lowering (fuse_gqa) first"]
        if len(gqas) != ctx.info.num_layers:
            raise OnnxlmError(f"expose_attention found {len(gqas)} GroupQueryAttention nodes for "
                              f"{ctx.info.num_layers} layers")
        if "attention_mask" not in inputs or "position_ids" not in inputs:
            raise OnnxlmError("expose_attention needs the graph inputs attention_mask and position_ids")
        seqlens, total = _lengths_from_mask(graph, inputs["attention_mask"])
        for layer, node in enumerate(gqas):
            node.replace_input_with(SEQLENS_K, seqlens)
            node.replace_input_with(TOTAL_LENGTH, total)
            while len(node.inputs) <= POSITION_IDS:
                node.resize_inputs(len(node.inputs) + 1)
            node.replace_input_with(POSITION_IDS, inputs["position_ids"])
            if self.options.probs:
                node.attributes["qk_output"] = ir.AttrInt64("qk_output", 2)  # after softmax
                node.resize_outputs(4)
                probs = node.outputs[3]
                probs.name = PROBS_OUTPUT.format(layer)
                probs.dtype = ir.DataType.FLOAT
                probs.shape = ir.Shape(["batch", ctx.info.num_heads, "seq", "total"])
                graph.outputs.append(probs)
        import onnx_ir.passes.common as common

        common.RemoveUnusedNodesPass()(model)  # the old position_ids -> seqlens computation
        return True, {"gqa": len(gqas), "probs_outputs": len(gqas) if self.options.probs else 0}, []


def _lengths_from_mask(graph, mask):
    """seqlens_k (batch,) int32 = sum(mask) - 1, and total_sequence_length () int32 = mask.shape[1]."""
    import onnx_ir as ir

    axis = add_initializer(graph, "expose_attention.axis", np.array([1], np.int64))
    one = add_initializer(graph, "expose_attention.one", np.array(1, np.int32))
    nodes = []

    def op(op_type, *args, **attrs):
        node = ir.node(op_type, list(args), attributes=attrs)
        nodes.append(node)
        return node.outputs[0]

    slots = op("Cast", op("ReduceSum", mask, axis, keepdims=0), to=ir.DataType.INT32)  # (batch,)
    seqlens = op("Sub", slots, one)
    total = op("Cast", op("Squeeze", op("Shape", mask, start=1, end=2)), to=ir.DataType.INT32)  # ()
    first = next(iter(graph))
    graph.insert_before(first, nodes)
    seqlens.name, total.name = "expose_attention.seqlens_k", "expose_attention.total_length"
    return seqlens, total
