"""`quant_gguf_exact`: lower a GGUF's own quantized blocks to com.microsoft.MatMulNBits, bit for bit.

Input: a graph exported from a GGUF source (its linears hold the GGUF's dequantized weights, in any order or
packing: q/k rows permuted by the HF conversion, q|k|v and gate|up concatenated by the lowering) and the GGUF's
block tensors (ctx.quantized_tensors, read by the frontend). Each weight column is matched to a GGUF row by the
bytes of its float32 values, so the mapping is found, not assumed, and a linear is converted only when every
column matches exactly. No second rounding happens:
    Q8_0: w = d * (q - 128)  -> MatMulNBits(bits=8, block=32, scales=d), default zero point 128
    Q4_0: w = d * (q - 8)    -> MatMulNBits(bits=4, block=32, scales=d), default zero point 8
    Q4_1: w = d * q + m      -> MatMulNBits(bits=4, block=32, scales=d, zero_points=0)
                                + (per-block sums of x) @ m: ReduceSum(Reshape(x, [.., K/32, 32])) @ M[K/32, N]
The uint8 zero point keeps MatMulNBits on ORT's prepacked fast path (a float zero point -m/d would not, and
would not be exact). Guarantees: the dequantized weight of every converted linear equals the graph's weight
exactly (checked); lossy only through accuracy_level (4 = int8 activations).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onnxlm.errors import OnnxlmError
from onnxlm.passes.base import Pass, PassContext
from onnxlm.passes.constants import add_initializer
from onnxlm.passes.quant.linears import (
    OFFSET_SUFFIX,
    dequantized_matmul_nbits,
    drop_unused,
    initializer_bytes,
    is_lm_head,
    linear_weight,
    linears,
    matmul_nbits,
    replace_linear,
    untie_lm_head,
)

BLOCK = 32


@dataclasses.dataclass
class GgufExactOptions:
    accuracy_level: int = 0  # 4-bit blocks: 0 keeps float activations (exact); 4 quantizes them to int8 per block
    head_accuracy_level: int = 4  # 8-bit blocks (Q8_0): ORT's CPU kernel is fast only with int8 activations
    lm_head: bool = True  # import the (untied) LM head from the token embedding's blocks


def row_index(tensors: dict) -> tuple[dict[int, tuple[str, int]], dict[str, np.ndarray]]:
    """hash(bytes of a dequantized row) -> (tensor name, row); and the dequantized tensors."""
    index, dense = {}, {}
    for name, t in tensors.items():
        dense[name] = t.dequantize()
        for r, row in enumerate(dense[name]):
            index.setdefault(hash(row.tobytes()), (name, r))
    return index, dense


def match_columns(w: np.ndarray, index: dict, dense: dict) -> list[tuple[str, int]] | None:
    """For W [K, N]: the (tensor, row) holding each column's exact values, or None if one has none."""
    rows = []
    for column in np.ascontiguousarray(w.T):
        hit = index.get(hash(column.tobytes()))
        if hit is None or not np.array_equal(dense[hit[0]][hit[1]].view(np.uint32), column.view(np.uint32)):
            return None
        rows.append(hit)
    return rows


def gather_blocks(rows: list[tuple[str, int]], tensors: dict):
    """Codes [N, K], scales and offsets [N, K/32] of the matched rows, in column order, or None if their block
    formats differ."""
    kinds = {(tensors[name].qtype) for name, _ in rows}
    if len(kinds) != 1:
        return None
    names = [name for name, _ in rows]
    idx = np.asarray([r for _, r in rows])
    pick = lambda attr: np.stack([getattr(tensors[n], attr)[i] for n, i in zip(names, idx)])  # noqa: E731
    first = tensors[names[0]]
    offsets = pick("offsets") if first.offsets is not None else None
    return first, pick("codes"), pick("scales"), offsets


class GgufExact(Pass):
    """Linears whose weights are a GGUF's Q4_0/Q4_1/Q8_0 blocks -> MatMulNBits reproducing those blocks exactly."""

    name = "quant_gguf_exact"
    Options = GgufExactOptions
    lossless = False

    def validate(self) -> None:
        for key in ("accuracy_level", "head_accuracy_level"):
            if getattr(self.options, key) not in (0, 1, 2, 3, 4):
                raise OnnxlmError(f"quant_gguf_exact: {key} must be 0..4, got {getattr(self.options, key)}")

    def run(self, model, ctx: PassContext):
        import onnx_ir as ir

        tensors = ctx.quantized_tensors() if ctx.quantized_tensors else None
        if not tensors:
            return False, {}, ["the source has no GGUF block tensors: nothing to import"]
        ir.external_data.load_to_model(model)
        graph, o = model.graph, self.options
        size_before = initializer_bytes(graph)
        if o.lm_head:
            untie_lm_head(graph)
        index, dense = row_index(tensors)
        counts: dict[str, int] = {}
        skipped = []
        for node in linears(graph):
            if is_lm_head(node) and not o.lm_head:
                continue
            w = linear_weight(node)
            rows = match_columns(w, index, dense) if w.shape[0] % BLOCK == 0 else None
            found = gather_blocks(rows, tensors) if rows else None
            if found is None:
                skipped.append(node.name)
                continue
            first, codes, scales, offsets = found
            q = self.convert(graph, node, first, codes, scales, offsets)
            emitted = dequantized_matmul_nbits(q)
            if offsets is not None:
                emitted = emitted + np.repeat(offsets.T, BLOCK, axis=0)
            if not np.array_equal(emitted.view(np.uint32), w.view(np.uint32)):
                raise OnnxlmError(f"quant_gguf_exact: {node.name}'s emitted blocks do not reproduce its weight")
            counts[first.qtype] = counts.get(first.qtype, 0) + 1
        drop_unused(model)
        ctx.metrics.update({"weight_rel_error": 0.0, "weights_bit_identical": True, "bytes_before": size_before,
                            "bytes_after": initializer_bytes(graph), "gguf_types": sorted(counts)})
        notes = [f"{len(skipped)} linears have no exact GGUF blocks and stay float: {', '.join(skipped[:4])}"
                 ] if skipped else []
        return bool(counts), {f"matmul_nbits_{k.lower()}": v for k, v in counts.items()}, notes

    def convert(self, graph, node, first, codes, scales, offsets):
        """Replace `node` by the MatMulNBits form of its blocks; return the MatMulNBits node."""
        import onnx_ir as ir

        x, name = node.inputs[0], node.name
        n, k = codes.shape
        zero = None if offsets is None else np.zeros((n, k // BLOCK), np.uint8)
        level = self.options.accuracy_level if first.bits == 4 else self.options.head_accuracy_level
        q = matmul_nbits(graph, x, codes, scales, first.bits, BLOCK, f"{name}.q{first.bits}", level, zero)
        if offsets is None:
            replace_linear(graph, node, [q], q.outputs[0])
            return q
        # Q4_1's per-block offset m: x @ (m broadcast over its block) = (sum of x over each block) @ M
        shape = add_initializer(graph, f"{name}.block_shape", np.array([0, 0, k // BLOCK, BLOCK], np.int64))
        axes = add_initializer(graph, f"{name}.block_axis", np.array([-1], np.int64))
        m = add_initializer(graph, f"{name}.offsets", offsets.T.astype(np.float32))  # [K/32, N]
        blocks = ir.node("Reshape", [x, shape], name=f"{name}.blocks")
        sums = ir.node("ReduceSum", [blocks.outputs[0], axes], attributes={"keepdims": 0}, name=f"{name}.block_sums")
        correction = ir.node("MatMul", [sums.outputs[0], m], name=f"{name}{OFFSET_SUFFIX}")
        total = ir.node("Add", [q.outputs[0], correction.outputs[0]], name=f"{name}.add_offsets")
        replace_linear(graph, node, [q, blocks, sums, correction, total], total.outputs[0])
        return q
