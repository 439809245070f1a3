"""`quant_gguf_exact`: lower a GGUF's own quantized blocks to com.microsoft.MatMulNBits, bit for bit.

Input: a graph exported from a GGUF source (its linears hold the GGUF's dequantized weights, in any order or
packing: q/k rows permuted by the HF conversion, q|k|v and gate|up concatenated by the lowering) and the GGUF's
block tensors (ctx.quantized_tensors, read by the frontend). Each weight column is matched to a GGUF row by the
bytes of its float32 values, so the mapping is found, not assumed, and a linear is converted only when every
column matches exactly. No second rounding happens:
    Q8_0: w = d * (q - 128)  -> MatMulNBits(bits=8, block=32, scales=d), default zero point 128
    Q4_0: w = d * (q - 8)    -> MatMulNBits(bits=4, block=32, scales=d), default zero point 8
    Q4_1: w = d * q + m = d * (q - 8) + (m + 8d)
                             -> MatMulNBits(bits=4, block=32, scales=d), default zero point 8
                                + (per-block sums of x) @ m': ReduceSum(Reshape(x, [.., K/32, 32])) @ M'[K/32, N]
Centring Q4_1's codes on MatMulNBits's default zero point matters once activations are int8 (accuracy_level 4):
the kernel's error is then sum (q - 8) d e over the activation rounding errors e, not sum q d e, whose codes
(0..15, mean 7.5) turn every block's summed rounding error into a large biased term; llama.cpp's Q4_1 x Q8_1 dot
product has the same centred error, (d q + m) e. m' = m + 8d is checked to be exact in float32 (m and d are
fp16); a linear where it is not keeps the uncentred form (explicit zero point 0). Guarantees: every converted
linear's weight, d (q - 8) + m', equals the GGUF's d q + m exactly in real arithmetic, and the graph's weight is
its float32 rounding (checked); lossy only through accuracy_level (4 = int8 activations).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onnxlm.errors import OnnxlmError
from onnxlm.passes.base import FLOAT_WEIGHTS, FOLDED, Pass, PassContext
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


MEASURE = -1  # accuracy_level: choose 0 or 4 by measurement on this machine (choose_accuracy_level)
MIN_GAIN = 0.05  # int8 activations are chosen only when a decode step is at least this much faster


@dataclasses.dataclass
class GgufExactOptions:
    # 4-bit blocks: 0 keeps float activations (exact); 4 quantizes them to int8 per block; -1 measures both here
    # and keeps the faster one whose calibration PPL is within max_ppl_increase percent of the exact one
    accuracy_level: int = 0
    max_ppl_increase: float = 0.5
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
    requires = (FOLDED, FLOAT_WEIGHTS)  # matches every float linear to the GGUF's rows
    removes = (FLOAT_WEIGHTS,)
    Options = GgufExactOptions
    lossless = False

    def validate(self) -> None:
        o = self.options
        if o.accuracy_level not in (MEASURE, 0, 1, 2, 3, 4):
            raise OnnxlmError(f"quant_gguf_exact: accuracy_level must be 0..4, or -1 to measure, got "
                              f"{o.accuracy_level}")
        if o.head_accuracy_level not in (0, 1, 2, 3, 4):
            raise OnnxlmError(f"quant_gguf_exact: head_accuracy_level must be 0..4, got {o.head_accuracy_level}")
        if not o.max_ppl_increase >= 0:
            raise OnnxlmError(f"quant_gguf_exact: max_ppl_increase must be >= 0, got {o.max_ppl_increase}")

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
        skipped, centred, four_bit = [], 0, []
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
            q, shifted, is_centred = self.convert(graph, node, first, codes, scales, offsets)
            emitted = dequantized_matmul_nbits(q).astype(np.float64)  # exact: small integers times fp16 scales
            if shifted is not None:
                emitted = emitted + np.repeat(shifted.T.astype(np.float64), BLOCK, axis=0)
            if not np.array_equal(emitted.astype(np.float32).view(np.uint32), w.view(np.uint32)):
                raise OnnxlmError(f"quant_gguf_exact: {node.name}'s emitted blocks do not reproduce its weight")
            counts[first.qtype] = counts.get(first.qtype, 0) + 1
            centred += is_centred
            if first.bits == 4:
                four_bit.append(q)
        drop_unused(model)
        if self.options.accuracy_level == MEASURE and four_bit:
            ctx.metrics["accuracy_choice"] = choose_accuracy_level(model, four_bit, ctx, self.options.max_ppl_increase)
        ctx.metrics.update({"weight_rel_error": 0.0, "weights_bit_identical": True, "bytes_before": size_before,
                            "bytes_after": initializer_bytes(graph), "gguf_types": sorted(counts),
                            "q4_1_centred": centred})
        notes = [f"{len(skipped)} linears have no exact GGUF blocks and stay float: {', '.join(skipped[:4])}"
                 ] if skipped else []
        return bool(counts), {f"matmul_nbits_{k.lower()}": v for k, v in counts.items()}, notes

    def convert(self, graph, node, first, codes, scales, offsets):
        """Replace `node` by the MatMulNBits form of its blocks. Return the MatMulNBits node, the per-block
        offsets [N, K/32] its correction adds (None for the formats without offsets), and whether Q4_1's codes
        were centred on the default zero point."""
        import onnx_ir as ir

        x, name = node.inputs[0], node.name
        n, k = codes.shape
        level = self.options.accuracy_level if first.bits == 4 else self.options.head_accuracy_level
        level = 4 if level == MEASURE else level  # set for good by choose_accuracy_level
        if offsets is None:
            q = matmul_nbits(graph, x, codes, scales, first.bits, BLOCK, f"{name}.q{first.bits}", level)
            replace_linear(graph, node, [q], q.outputs[0])
            return q, None, False
        # Q4_1: centre the codes on the default zero point 8 where m + 8d is exact in float32 (see the docstring)
        shifted = (offsets + 8 * scales).astype(np.float32)
        exact = np.array_equal(shifted.astype(np.float64), offsets.astype(np.float64) + 8 * scales.astype(np.float64))
        if not exact:
            shifted = offsets.astype(np.float32)
        zero = None if exact else np.zeros((n, k // BLOCK), np.uint8)
        q = matmul_nbits(graph, x, codes, scales, first.bits, BLOCK, f"{name}.q{first.bits}", level, zero)
        # the per-block offset m': x @ (m' broadcast over its block) = (sum of x over each block) @ M'
        shape = add_initializer(graph, f"{name}.block_shape", np.array([0, 0, k // BLOCK, BLOCK], np.int64))
        axes = add_initializer(graph, f"{name}.block_axis", np.array([-1], np.int64))
        m = add_initializer(graph, f"{name}.offsets", shifted.T)  # [K/32, N]
        blocks = ir.node("Reshape", [x, shape], name=f"{name}.blocks")
        sums = ir.node("ReduceSum", [blocks.outputs[0], axes], attributes={"keepdims": 0}, name=f"{name}.block_sums")
        correction = ir.node("MatMul", [sums.outputs[0], m], name=f"{name}{OFFSET_SUFFIX}")
        total = ir.node("Add", [q.outputs[0], correction.outputs[0]], name=f"{name}.add_offsets")
        replace_linear(graph, node, [q, blocks, sums, correction, total], total.outputs[0])
        return q, shifted, bool(exact)


def cpu_features() -> list[str]:
    """The x86 features that decide MLAS's int4 kernels (Linux's /proc/cpuinfo; empty elsewhere)."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return [f for f in ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]


def choose_accuracy_level(model, nodes: list, ctx: PassContext, max_ppl_increase: float) -> dict:
    """Time a decode step and score the calibration text with the 4-bit MatMulNBits `nodes` at accuracy_level 0
    (float activations: exact) and 4 (int8 activations), on this machine; keep the faster of those within
    max_ppl_increase percent of the exact PPL (int8 only when at least MIN_GAIN faster). Returns what was
    measured and chosen, for the manifest."""
    import onnx_ir as ir

    from onnxlm.passes.evaluate import decode_step_seconds, open_session, session_perplexity

    sessions, ppl = {}, {}
    ctx.scratch.mkdir(parents=True, exist_ok=True)
    for level in (0, 4):
        for node in nodes:
            node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", level)
        path = ctx.scratch / f"accuracy_level_{level}.onnx"
        ir.save(model, path, external_data=path.name + ".data")
        sessions[level] = open_session(path)
        ppl[level] = session_perplexity(sessions[level], ctx.info, ctx.calibration_ids, interface=ctx.interface)
    seconds = dict(zip(sessions, decode_step_seconds(list(sessions.values()), ctx.info)))
    # int8 activations only within the PPL budget, and only when clearly faster: a choice that flips with the
    # machine's noise would make the same recipe give different artifacts from one build to the next
    accurate_enough = ppl[4] <= ppl[0] * (1 + max_ppl_increase / 100)
    chosen = 4 if accurate_enough and seconds[4] < seconds[0] * (1 - MIN_GAIN) else 0
    for node in nodes:
        node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", chosen)
    return {"chosen": chosen, "cpu_features": cpu_features(), "max_ppl_increase": max_ppl_increase,
            "min_gain": MIN_GAIN,
            "decode_step_ms": {str(k): round(v * 1000, 3) for k, v in seconds.items()},
            "calibration_ppl": {str(k): round(v, 4) for k, v in ppl.items()}}
