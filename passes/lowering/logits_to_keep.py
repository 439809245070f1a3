"""`logits_to_keep`: let the caller ask for the LM head on the last k positions only.

A prefill runs the LM head on every prompt position, although generation reads only the last row: on SmolLM2 a
512-token prefill spends ~16% of its time in that (49152 x 576) head and writes a 100 MB logits tensor. This is
transformers' `logits_to_keep` argument as a graph input: an int64 scalar `logits_to_keep` that is also an
initializer with the default 0 (an input a caller may leave out, as ORT and onnxruntime-genai do), and a
Slice(hidden, -k, end, axis 1) in front of the LM head. 0 keeps every position (-0 = 0), k > 0 the last k.

Input: any decoder graph whose LM head is the node writing `logits` (plain, lowered or quantized).
Guarantees: with the default the logits are those of the graph before (the manager checks it); with k = 1 the
single row is the last row of the full logits.
"""

from __future__ import annotations

import numpy as np

from onnxlm.errors import OnnxlmError
from onnxlm.interface import Port
from onnxlm.passes.base import UNSLICED_HEAD, Pass, PassContext
from onnxlm.passes.constants import add_initializer, add_overridable_input
from onnxlm.passes.quant.linears import is_lm_head

INPUT = "logits_to_keep"


class LogitsToKeep(Pass):
    name = "logits_to_keep"
    removes = (UNSLICED_HEAD,)

    def ports(self, info):
        return [Port(INPUT, "input", "int64", (), feature="logits_to_keep", role="count", default=0, optional=True,
                     meaning="the LM head runs on the last k positions only; 0: on every position")]

    def run(self, model, ctx: PassContext):
        import onnx_ir as ir

        graph = model.graph
        if any(v.name == INPUT for v in graph.inputs):
            return False, {"lm_head_slice": 0}, ["the graph already has a logits_to_keep input"]
        heads = [n for n in graph if is_lm_head(n)]
        if len(heads) != 1:
            raise OnnxlmError(f"logits_to_keep needs one node writing `logits`, found {len(heads)}")
        head = heads[0]
        keep = add_overridable_input(graph, INPUT, np.array(0, np.int64))  # () int64
        one = add_initializer(graph, "logits_to_keep.shape", np.array([1], np.int64))
        ends = add_initializer(graph, "logits_to_keep.ends", np.array([np.iinfo(np.int64).max], np.int64))
        axes = add_initializer(graph, "logits_to_keep.axes", np.array([1], np.int64))
        count = ir.node("Reshape", [keep, one], name="logits_to_keep.count")  # (1,)
        starts = ir.node("Neg", [count.outputs[0]], name="logits_to_keep.starts")  # (1,): -k
        hidden = head.inputs[0]  # (batch, seq, hidden)
        kept = ir.node("Slice", [hidden, starts.outputs[0], ends, axes], name="logits_to_keep.slice")
        graph.insert_before(head, [count, starts, kept])
        head.replace_input_with(0, kept.outputs[0])  # (batch, k or seq, hidden)
        return True, {"lm_head_slice": 1}, []
