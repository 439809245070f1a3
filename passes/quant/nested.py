"""`quant_nested`: Matryoshka nested quantization (MatQuant, arXiv 2502.06786) with a per-layer bit choice.

Every decoder linear is quantized once to symmetric int8 codes per block (zero point 128, s8 = absmax / 127).
Its int4 and int2 models are the most significant bits of those codes, with MatQuant's rounding slice
    q_r = clamp((q8 >> (8 - r)) + ((q8 >> (7 - r)) & 1), 0, 2^r - 1),   scale_r = s8 * 2^(8 - r)
which MatMulNBits(bits=r) runs with its default zero point 2^(r-1) (shared/research/methods.md section 7.3).
This pass is training-free: "MSB-sliced int8 with RTN codes", not MatQuant's co-trained weights.

Bit choice (QuickSilver's adaptive Matryoshka idea, made static; Mix'n'Match in MatQuant): each layer's
sensitivity is *measured*: the calibration NLL with all linears at int8 and only that layer's linears sliced to
r bits, for r in {4, 2} (one ORT session with the weights as inputs, so each measurement is one prefill).
Under `budget_bits` (average code bits per decoder-linear weight; the fp32 block scale adds 32/block_size more)
a greedy multiple-choice knapsack lowers, step by step, the layer with the smallest NLL increase per bit saved,
assuming per-layer costs add. Output: one MatMulNBits per linear with its chosen bits. The LM head is kept at
`lm_head_bits` and the embedding in float; neither counts in the budget.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onnxlm.errors import OnnxlmError
from onnxlm.passes.base import FLOAT_WEIGHTS, FOLDED, Pass, PassContext
from onnxlm.passes.quant.linears import (
    drop_unused,
    initializer_bytes,
    is_lm_head,
    linear_weight,
    linears,
    matmul_nbits,
    replace_linear,
    untie_lm_head,
)

WIDTHS = (8, 4, 2)


@dataclasses.dataclass
class NestedOptions:
    budget_bits: float = 4.0
    block_size: int = 32
    accuracy_level: int = 4
    lm_head_bits: int = 8  # 8 or 4
    calibration_samples: int = 2  # windows of calibration_window tokens for the sensitivity measurement
    calibration_window: int = 256


def int8_codes(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """W [K, N] -> (codes uint8 [N, K] with zero point 128, s8 float32 [N, K / block])."""
    k, n = w.shape
    blocks = w.T.reshape(n, k // block, block).astype(np.float32)
    s8 = np.abs(blocks).max(axis=-1) / 127.0
    s8 = np.where(s8 == 0, 1.0, s8).astype(np.float32)
    q = np.clip(np.rint(blocks / s8[..., None]), -127, 127) + 128
    return q.astype(np.uint8).reshape(n, k), s8


def slice_codes(q8: np.ndarray, s8: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """MatQuant's r-bit slice of int8 codes: (codes [N, K] in 0..2^r-1, scales [N, K / block])."""
    if r == 8:
        return q8, s8
    q = q8.astype(np.int16)
    sliced = np.clip((q >> (8 - r)) + ((q >> (7 - r)) & 1), 0, (1 << r) - 1)
    return sliced.astype(np.uint8), (s8 * (1 << (8 - r))).astype(np.float32)


def dequant(codes: np.ndarray, scales: np.ndarray, r: int, block: int) -> np.ndarray:
    """(codes - 2^(r-1)) * scale, as the [K, N] weight MatMulNBits multiplies by."""
    n, k = codes.shape
    w = (codes.reshape(n, k // block, block).astype(np.float32) - (1 << (r - 1))) * scales[..., None]
    return np.ascontiguousarray(w.reshape(n, k).T)


def choose_bits(costs: dict[int, dict[int, float]], sizes: dict[int, int], budget: float) -> dict[int, int]:
    """Greedy multiple-choice knapsack: unit -> bits, average (weighted by size) <= budget, lowest added cost."""
    bits = {u: 8 for u in costs}
    total = sum(sizes.values())
    while sum(bits[u] * sizes[u] for u in bits) / total > budget + 1e-9:
        moves = []
        for u, b in bits.items():
            lower = WIDTHS[WIDTHS.index(b) + 1] if b != WIDTHS[-1] else None
            if lower is not None:
                saved = (b - lower) * sizes[u]
                moves.append(((costs[u][lower] - costs[u][b]) / saved, u, lower))
        if not moves:
            break
        _, u, lower = min(moves)
        bits[u] = lower
    return bits


class QuantNested(Pass):
    """Decoder linears -> MatMulNBits at 8/4/2 bits sliced from one set of int8 codes, bits chosen per layer."""

    name = "quant_nested"
    requires = (FOLDED,)
    removes = (FLOAT_WEIGHTS,)
    Options = NestedOptions
    lossless = False

    def validate(self) -> None:
        o = self.options
        if not 2.0 <= o.budget_bits <= 8.0:
            raise OnnxlmError(f"quant_nested: budget_bits must be between 2 and 8, got {o.budget_bits}")
        if o.block_size < 16 or o.block_size & (o.block_size - 1):
            raise OnnxlmError(f"quant_nested: block_size must be a power of 2 >= 16, got {o.block_size}")
        if o.lm_head_bits not in (4, 8):
            raise OnnxlmError(f"quant_nested: lm_head_bits must be 4 or 8, got {o.lm_head_bits}")

    def run(self, model, ctx: PassContext):
        import onnx_ir as ir

        from onnxlm.passes.quant.weight_only import nbits_pairs, weight_report

        o = self.options
        ir.external_data.load_to_model(model)
        graph = model.graph
        size_before = initializer_bytes(graph)
        untie_lm_head(graph)
        nodes = [n for n in linears(graph) if linear_weight(n).shape[0] % o.block_size == 0]
        body = [n for n in nodes if not is_lm_head(n)]
        if not body:
            return False, {}, ["no linear whose K is a multiple of block_size"]
        per_layer = len(body) // ctx.info.num_layers if len(body) % ctx.info.num_layers == 0 else 0
        unit_of = {n.name: (i // per_layer if per_layer else i) for i, n in enumerate(body)}
        originals = {n.outputs[0].name: linear_weight(n) for n in nodes}
        codes = {n.name: int8_codes(originals[n.outputs[0].name], o.block_size) for n in nodes}
        costs = self.sensitivity(model, ctx, body, unit_of, codes)
        sizes: dict[int, int] = {}
        for n in body:
            sizes[unit_of[n.name]] = sizes.get(unit_of[n.name], 0) + originals[n.outputs[0].name].size
        bits = choose_bits(costs, sizes, o.budget_bits)
        chosen = {n.name: bits[unit_of[n.name]] for n in body}
        chosen.update({n.name: o.lm_head_bits for n in nodes if is_lm_head(n)})
        for n in nodes:
            r = chosen[n.name]
            q, s = slice_codes(*codes[n.name], r)
            new = matmul_nbits(graph, n.inputs[0], q, s, r, o.block_size, f"{n.name}.q{r}", o.accuracy_level)
            replace_linear(graph, n, [new], new.outputs[0])
        drop_unused(model)
        weight_report(ctx, nbits_pairs(graph, originals), graph, size_before)
        total = sum(sizes.values())
        avg = sum(bits[u] * sizes[u] for u in bits) / total
        ctx.metrics.update({"average_bits": round(avg, 4), "layer_bits": [bits[u] for u in sorted(bits)],
                            "layer_nll_increase": {str(u): {str(r): round(c, 5) for r, c in costs[u].items()}
                                                   for u in sorted(costs)}})
        counts = {f"bits_{r}": sum(1 for v in chosen.values() if v == r) for r in WIDTHS}
        return True, counts, [f"average {avg:.3f} code bits per decoder weight (budget {o.budget_bits})"]

    def sensitivity(self, model, ctx: PassContext, body, unit_of, codes) -> dict[int, dict[int, float]]:
        """unit -> bits -> mean calibration NLL with every body linear at int8 and only that unit at `bits`."""
        import onnx_ir as ir

        from onnxlm.metrics import perplexity
        from onnxlm.passes.evaluate import feeds_for, open_session, windows_of

        o = self.options
        windows = windows_of(ctx.calibration_ids, o.calibration_window)[:o.calibration_samples]
        if not windows:
            raise OnnxlmError("quant_nested needs calibration text: the calibration token ids are empty")
        probe = model.clone()
        names = {}
        for node in [n for n in probe.graph if n.name in unit_of]:
            weight = node.inputs[1]
            weight.type, weight.shape = ir.TensorType(weight.const_value.dtype), weight.const_value.shape
            probe.graph.initializers.pop(weight.name)
            probe.graph.inputs.append(weight)
            weight.const_value = None
            names[node.name] = weight.name
        path = ctx.scratch / "nested_probe.onnx"
        ir.save(probe, path, external_data="nested_probe.onnx.data")
        session = open_session(path)
        base = {names[n]: dequant(*codes[n], 8, o.block_size) for n in names}
        token_feeds = {id(w): feeds_for(session, ctx.info, np.asarray([w], np.int64), 0, None, set(base),
                                        ctx.interface) for w in windows}

        def nll(weights: dict) -> float:
            def window_logits(w):
                yield session.run(["logits"], {**token_feeds[id(w)], **weights})[0][0]  # (seq, vocab)

            return perplexity(windows, window_logits)["nll"]

        reference = nll(base)
        costs = {}
        for unit in sorted(set(unit_of.values())):
            members = [n for n, u in unit_of.items() if u == unit]
            costs[unit] = {8: 0.0}
            for r in WIDTHS[1:]:
                trial = dict(base)
                for n in members:
                    trial[names[n]] = dequant(*slice_codes(*codes[n], r), r, o.block_size)
                costs[unit][r] = nll(trial) - reference
        return costs
