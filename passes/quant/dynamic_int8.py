"""`quant_dynamic_int8`: ONNX Runtime dynamic int8 quantization of the linears (quantize_dynamic).

Each selected linear becomes DynamicQuantizeLinear(x) -> MatMulInteger(x_q, W_q) -> Cast -> Mul, which ORT's
CPU optimizer fuses into com.microsoft.DynamicQuantizeMatMul / MatMulIntegerToFloat when the session loads
(shared/research/methods.md section 7.4). Activations are uint8 with one scale per tensor per call: for a
decode step that is one scale for the single row, the known cause of Optimum's PPL 73 on this model.
Input: any decoder graph. Options: per_channel weights, and `keep_float`, a comma list of the sensitive linears
to leave in float: lm_head, down_proj (the MLP output, whose input has the largest outliers), o_proj; the roles
come from the decoder-structure analysis (passes/decoder_structure.py), so they hold for every family.
The attention score MatMuls have no constant weight and are never quantized (MatMulConstBOnly); rotary has no
linear. Lossy: the manager reports the PPL cost; the pass reports weight error and sizes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onnxlm.errors import OnnxlmError
from onnxlm.passes.base import FLOAT_WEIGHTS, FOLDED, Pass, PassContext
from onnxlm.passes.decoder_structure import find_decoder
from onnxlm.passes.quant.linears import drop_unused, initializer_bytes, linear_weight, linears, untie_lm_head
from onnxlm.passes.quant.moe_experts import moe_nodes

KEEPABLE = ("lm_head", "down_proj", "o_proj")


@dataclasses.dataclass
class DynamicInt8Options:
    per_channel: bool = True
    keep_float: str = "lm_head"  # comma list from KEEPABLE, or "" to quantize every linear
    reduce_range: bool = False


def linear_roles(graph, info) -> dict:
    """The keepable linears by role, from the decoder-structure analysis: {node: "lm_head" | "down_proj" (each
    dense MLP's output linear) | "o_proj" (each attention's output linear)}; every other linear is "other"."""
    decoder = find_decoder(graph, info)
    roles = {b.out: "o_proj" if b.kind == "attn" else "down_proj" for b in decoder.blocks if b.out is not None}
    roles[decoder.head] = "lm_head"
    return roles


def int8_pairs(graph, originals: dict[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(original, dequantized) per quantized weight, from quantize_dynamic's `{W}_quantized/_scale/_zero_point`."""
    init = graph.initializers
    pairs = []
    for name, w in originals.items():
        q = init.get(f"{name}_quantized")
        if q is None:
            continue
        scale = init[f"{name}_scale"].const_value.numpy().astype(np.float64)
        zero = init[f"{name}_zero_point"].const_value.numpy().astype(np.float64)
        pairs.append((w, (q.const_value.numpy().astype(np.float64) - zero) * scale))
    return pairs


class QuantDynamicInt8(Pass):
    """Linears -> ORT dynamic int8 (quantize_dynamic: int8 weights, uint8 per-tensor dynamic activations)."""

    name = "quant_dynamic_int8"
    requires = (FOLDED,)
    removes = (FLOAT_WEIGHTS,)
    Options = DynamicInt8Options
    lossless = False

    def validate(self) -> None:
        keep = [k for k in self.options.keep_float.split(",") if k]
        bad = [k for k in keep if k not in KEEPABLE]
        if bad:
            raise OnnxlmError(f"quant_dynamic_int8: keep_float takes {', '.join(KEEPABLE)}; got {', '.join(bad)}")

    def run(self, model, ctx: PassContext):
        import onnx_ir as ir
        from onnxruntime.quantization import QuantType, quantize_dynamic

        from onnxlm.passes.quant.weight_only import replace_graph, weight_report

        ir.external_data.load_to_model(model)
        keep = {k for k in self.options.keep_float.split(",") if k}
        size_before = initializer_bytes(model.graph)
        if "lm_head" not in keep:
            untie_lm_head(model.graph)
        roles = linear_roles(model.graph, ctx.info)
        targets = [n for n in linears(model.graph) if roles.get(n, "other") not in keep]
        if not targets:
            return False, {}, ["no linear left to quantize"]
        originals = {n.inputs[1].name: linear_weight(n) for n in targets}
        out = ctx.scratch / "dynamic_int8.onnx"
        quantize_dynamic(ir.to_proto(model), out, op_types_to_quantize=["MatMul"],
                         nodes_to_quantize=[n.name for n in targets], per_channel=self.options.per_channel,
                         reduce_range=self.options.reduce_range, weight_type=QuantType.QInt8,
                         use_external_data_format=True)
        replace_graph(model, ir.load(out))
        ir.external_data.load_to_model(model)
        drop_unused(model)
        done = sum(1 for n in model.graph if n.op_type == "MatMulInteger")
        weight_report(ctx, int8_pairs(model.graph, originals), model.graph, size_before)
        experts = moe_nodes(model.graph)
        notes = [f"{experts} mixture-of-experts nodes left in float: ORT has no dynamic int8 MoE"] if experts else []
        return done > 0, {"matmul_integer": done, "kept_float": len(linears(model.graph))}, notes
