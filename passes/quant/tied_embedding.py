"""`share_tied_embedding`: the embedding Gather reads the quantized LM head's blocks (GatherBlockQuantized).

Input: a graph whose LM head is a MatMulNBits without zero points (symmetric: `quant_weight_only` with
symmetric=true, `quant_nested`, or `quant_gguf_exact`'s Q8_0 head) and whose embedding is
Gather(float table [vocab, hidden], input_ids), the table being the head's weight before quantization (checked
numerically: the dequantized head must match the table to within the quantization error). Output:
Gather -> GatherBlockQuantized(Reshape(head.B, [vocab, hidden * bits / 8]), input_ids, head.scales), as the
onnxruntime-genai builder emits; the float table is dropped, so the tied weights are stored once. When the block
size does not divide hidden (block 128 on 576), the gathered rows keep the head's zero padding and a Slice cuts
them back to hidden.
Guarantees: each embedding row equals the head's dequantized column; lossy (the embedding is now quantized).
"""

from __future__ import annotations

import numpy as np

from onnxlm.metrics import relative_error
from onnxlm.passes.base import FLOAT_WEIGHTS, Pass, PassContext
from onnxlm.passes.constants import add_initializer
from onnxlm.passes.quant.linears import dequantized_matmul_nbits, drop_unused, initializer_bytes, is_lm_head

MAX_TIE_ERROR = 0.2  # a 2-bit head of the same table is about 0.4; an unrelated table about 1.4


class ShareTiedEmbedding(Pass):
    """Embedding Gather -> GatherBlockQuantized on the LM head's MatMulNBits blocks (tied weights stored once)."""

    name = "share_tied_embedding"
    removes = (FLOAT_WEIGHTS,)  # the embedding table becomes the head's blocks
    lossless = False

    def run(self, model, ctx: PassContext):
        import onnx_ir as ir

        graph = model.graph
        head = next((n for n in graph if n.op_type == "MatMulNBits" and is_lm_head(n)), None)
        gather = next((n for n in graph if n.op_type == "Gather" and n.inputs[0].const_value is not None
                       and n.inputs[1].name == "input_ids"), None)
        if head is None or gather is None:
            return False, {}, ["needs a MatMulNBits LM head and a float embedding Gather"]
        if len(head.inputs) > 3 and head.inputs[3] is not None:
            return False, {}, ["the LM head has zero points; GatherBlockQuantized would need them repacked"]
        table = gather.inputs[0].const_value.numpy()
        dequant = dequantized_matmul_nbits(head).T  # [vocab, hidden]
        if dequant.shape != table.shape or relative_error(table, dequant) > MAX_TIE_ERROR:
            return False, {}, ["the embedding table is not the LM head's weight: not tied"]
        size_before = initializer_bytes(graph)
        bits = head.attributes["bits"].as_int()
        block = head.attributes["block_size"].as_int()
        vocab, hidden = table.shape
        padded = -(-hidden // block) * block  # MatMulNBits pads K up to whole blocks
        shape = add_initializer(graph, f"{gather.name}.packed_shape", np.array([vocab, padded * bits // 8], np.int64))
        packed = ir.node("Reshape", [head.inputs[1], shape], name=f"{gather.name}.packed")
        quantized = ir.node("GatherBlockQuantized", [packed.outputs[0], gather.inputs[1], head.inputs[2]],
                            domain="com.microsoft", name=f"{gather.name}.quantized",
                            attributes={"bits": bits, "block_size": block, "gather_axis": 0, "quantize_axis": 1})
        nodes = [packed, quantized]
        if padded != hidden:  # (batch, seq, padded) -> (batch, seq, hidden)
            bounds = [add_initializer(graph, f"{gather.name}.{k}", np.array([v], np.int64))
                      for k, v in (("starts", 0), ("ends", hidden), ("axes", -1))]
            nodes.append(ir.node("Slice", [quantized.outputs[0], *bounds], name=f"{gather.name}.unpadded"))
        ir.convenience.replace_nodes_and_values(graph, gather, [gather], nodes, [gather.outputs[0]],
                                                [nodes[-1].outputs[0]])
        drop_unused(model)
        ctx.metrics.update({"weight_rel_error": relative_error(table, dequant), "bytes_before": size_before,
                            "bytes_after": initializer_bytes(graph)})
        return True, {"gather_block_quantized": 1}, []
