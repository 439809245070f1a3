"""`quant_gguf_exact`: lower a GGUF's own quantized blocks to com.microsoft.MatMulNBits, bit for bit.

Input: a graph exported from a GGUF source (its linears hold the GGUF's dequantized weights, in any order or
packing: q/k rows permuted by the HF conversion, q|k|v and gate|up concatenated by the lowering) and the GGUF's
block tensors (ctx.quantized_tensors, read by the frontend: frontend/gguf_blocks.py lists the formats). Each
weight column is matched to a GGUF row by the bytes of its float32 values, so the mapping is found, not assumed,
and a linear is converted only when every column matches exactly. No second rounding happens. Every format is
w = d (q - z) or w = d q + m per block of 32 (Q6_K: 16), and becomes a MatMulNBits with scales d and codes
shifted onto its default zero point Z = 2^(bits-1) (bits 4 for 4-bit codes, 8 for 5-, 6- and 8-bit ones):
    w = d (q - z)            -> codes q + Z - z
    w = d q + m = d (q - c) + (m + c d), c the middle code (8, or 16 for 5-bit codes)
                             -> codes q + Z - c, plus the offset term
                                (per-block sums of x) @ m': ReduceSum(Reshape(x, [.., K/B, B])) @ M'[K/B, N]
A packed linear whose parts come in different formats (a Q4_K_M file's Q4_K q/k and Q6_K v) becomes one
MatMulNBits per run of same-format columns, concatenated. Centring the codes matters once activations are int8
(accuracy_level 4): the kernel's error is then sum (q - c) d e over the activation rounding errors e, not
sum q d e, whose codes (0..15, mean 7.5) turn every block's summed rounding error into a large biased term;
llama.cpp's Q4_1 x Q8_1 dot product has the same centred error, (d q + m) e. m' = m + c d is checked to be exact
in float32 (m and d are fp16, or exact products of an fp16 and a 6-bit integer); a run where it is not keeps the
uncentred form (explicit zero point 0). Guarantees: every converted linear's weight equals the GGUF's exactly in
real arithmetic, and the graph's weight is its float32 rounding (checked); lossy only through accuracy_level
(4 = int8 activations).
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
from onnxlm.passes.quant.moe_experts import moe_nodes


MEASURE = -1  # accuracy_level: choose 0 or 4 by measurement on this machine (choose_accuracy_level)
MIN_GAIN = 0.05  # int8 activations are chosen only when a decode step is at least this much faster


@dataclasses.dataclass
class GgufExactOptions:
    # 4-bit blocks: 0 keeps float activations (exact); 4 quantizes them to int8 per block; -1 measures both here
    # and keeps the faster one whose calibration PPL is within max_ppl_increase percent of the exact one
    accuracy_level: int = 0
    max_ppl_increase: float = 0.5
    head_accuracy_level: int = 4  # 8-bit MatMulNBits (Q8_0, and Q5_*/Q6_K's codes): ORT's CPU kernel is fast only
    # with int8 activations
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


def runs(rows: list[tuple[str, int]], tensors: dict) -> list[tuple[int, int]]:
    """[start, stop) column ranges whose matched rows share one block format."""
    bounds = [0] + [i for i in range(1, len(rows)) if tensors[rows[i][0]].qtype != tensors[rows[i - 1][0]].qtype]
    return list(zip(bounds, bounds[1:] + [len(rows)]))


def gather_blocks(rows: list[tuple[str, int]], tensors: dict):
    """The first tensor (its format), and codes [N, K], scales and offsets [N, K/B] of the matched rows (one
    format), in column order."""
    names = [name for name, _ in rows]
    idx = np.asarray([r for _, r in rows])
    pick = lambda attr: np.stack([getattr(tensors[n], attr)[i] for n, i in zip(names, idx)])  # noqa: E731
    first = tensors[names[0]]
    offsets = pick("offsets") if first.offsets is not None else None
    return first, pick("codes"), pick("scales"), offsets


class GgufExact(Pass):
    """Linears whose weights are a GGUF's blocks (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, Q4_K/Q5_K/Q6_K) -> MatMulNBits
    reproducing those blocks exactly."""

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
            rows = match_columns(w, index, dense)
            if rows is None or any(w.shape[0] % tensors[name].block for name, _ in rows):
                skipped.append(node.name)
                continue
            parts, emitted = [], []
            for start, stop in runs(rows, tensors):
                first, codes, scales, offsets = gather_blocks(rows[start:stop], tensors)
                part = f"{node.name}.cols{start}" if (start, stop) != (0, len(rows)) else node.name
                nodes, q, shifted = self.convert(graph, node.inputs[0], part, first, codes, scales, offsets)
                weight = dequantized_matmul_nbits(q).astype(np.float64)  # exact: small integers times scales
                if shifted is not None:
                    weight = weight + np.repeat(shifted.T.astype(np.float64), first.block, axis=0)
                parts.append(nodes)
                emitted.append(weight)
                counts[first.qtype] = counts.get(first.qtype, 0) + 1
                centred += shifted is not None and len(q.inputs) == 3  # no explicit zero points
                if first.bits == 4:
                    four_bit.append(q)
            emitted = np.concatenate(emitted, axis=1)
            if not np.array_equal(emitted.astype(np.float32).view(np.uint32), w.view(np.uint32)):
                raise OnnxlmError(f"quant_gguf_exact: {node.name}'s emitted blocks do not reproduce its weight")
            new_nodes = [n for nodes in parts for n in nodes]
            if len(parts) > 1:
                new_nodes.append(ir.node("Concat", [nodes[-1].outputs[0] for nodes in parts],
                                         attributes={"axis": -1}, name=f"{node.name}.concat"))
            replace_linear(graph, node, new_nodes, new_nodes[-1].outputs[0])
        drop_unused(model)
        if self.options.accuracy_level == MEASURE and four_bit:
            ctx.metrics["accuracy_choice"] = choose_accuracy_level(model, four_bit, ctx, self.options.max_ppl_increase)
        ctx.metrics.update({"weight_rel_error": 0.0, "weights_bit_identical": True, "bytes_before": size_before,
                            "bytes_after": initializer_bytes(graph), "gguf_types": sorted(counts),
                            "offsets_centred": centred})
        notes = [f"{len(skipped)} linears have no exact GGUF blocks and stay float: {', '.join(skipped[:4])}"
                 ] if skipped else []
        experts = moe_nodes(graph)
        ctx.metrics["moe_not_imported"] = experts
        if experts:  # a MoE node holds every expert's weights in one tensor, which QMoE's layout cannot take exactly
            notes.append(f"{experts} mixture-of-experts nodes are not imported from their blocks: a later "
                         "quant_weight_only requantizes them (QMoE, symmetric)")
        return bool(counts), {f"matmul_nbits_{k.lower()}": v for k, v in counts.items()}, notes

    def convert(self, graph, x, name, first, codes, scales, offsets):
        """The MatMulNBits form of one format's blocks over input x: its nodes (the last one's output is x @ W),
        the MatMulNBits node, and the per-block offsets [N, K/B] the correction adds (None for the formats
        without offsets)."""
        import onnx_ir as ir

        n, k = codes.shape
        bits, block, default_zero = first.bits, first.block, 1 << (first.bits - 1)
        level = self.options.accuracy_level if bits == 4 else self.options.head_accuracy_level
        level = 4 if level == MEASURE else level  # set for good by choose_accuracy_level
        if offsets is None:  # w = d (q - z): shift the codes onto the default zero point
            shifted_codes = (codes.astype(np.int16) + default_zero - first.zero_point).astype(np.uint8)
            q = matmul_nbits(graph, x, shifted_codes, scales, bits, block, f"{name}.q{bits}", level)
            return [q], q, None
        # w = d q + m: centre the codes where m + c d is exact in float32 (see the docstring)
        centre = first.levels // 2
        shifted = (offsets + centre * scales).astype(np.float32)
        exact = np.array_equal(shifted.astype(np.float64),
                               offsets.astype(np.float64) + centre * scales.astype(np.float64))
        if exact:
            q = matmul_nbits(graph, x, (codes + (default_zero - centre)).astype(np.uint8), scales, bits, block,
                             f"{name}.q{bits}", level)
        else:
            shifted = offsets.astype(np.float32)
            q = matmul_nbits(graph, x, codes, scales, bits, block, f"{name}.q{bits}", level,
                             np.zeros((n, k // block), np.uint8))
        # the per-block offset m': x @ (m' broadcast over its block) = (sum of x over each block) @ M'
        shape = add_initializer(graph, f"{name}.block_shape", np.array([0, 0, k // block, block], np.int64))
        axes = add_initializer(graph, f"{name}.block_axis", np.array([-1], np.int64))
        m = add_initializer(graph, f"{name}.offsets", shifted.T)  # [K/B, N]
        blocks = ir.node("Reshape", [x, shape], name=f"{name}.blocks")
        sums = ir.node("ReduceSum", [blocks.outputs[0], axes], attributes={"keepdims": 0}, name=f"{name}.block_sums")
        correction = ir.node("MatMul", [sums.outputs[0], m], name=f"{name}{OFFSET_SUFFIX}")
        total = ir.node("Add", [q.outputs[0], correction.outputs[0]], name=f"{name}.add_offsets")
        return [q, blocks, sums, correction, total], q, shifted


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
