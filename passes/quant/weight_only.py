"""`quant_weight_only`: block-wise weight-only quantization of every linear to com.microsoft.MatMulNBits.

Uses ONNX Runtime's own quantizer (onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer):
- method "rtn": round-to-nearest per block (DefaultWeightOnlyQuantConfig, ORT's C++ quantize_matmul_{4,8}bits);
- method "gptq": GPTQ (Frantar et al., arXiv 2210.17323) through ORT's GPTQWeightOnlyQuantConfig, calibrated on
  activations of the calibration text (4 bits only in ORT).
Input: any decoder graph whose linears are MatMul with constant weights (lowered or plain). The tied LM head is
untied first (the embedding Gather keeps the float table) unless lm_head=false, which keeps the head in float.
Guarantees: each linear becomes one MatMulNBits with the chosen bits/block/symmetry/accuracy_level (format "qdq":
a constant int4 DequantizeLinear, blocked along K, or per output channel with per_channel, feeding the MatMul),
and with format "nbits" each mixture of experts' com.microsoft.MoE a QMoE with symmetric weights of the same bits
(moe_experts.py); nothing else changes (the routers stay float: they export as Gemm). A qdq block must divide every
linear's input width (OpenVINO refuses a partial block; checked before the export). Lossy: the manager reports the
PPL cost; the pass reports the weight error and the sizes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onnxlm.errors import OnnxlmError
from onnxlm.passes.base import FLOAT_WEIGHTS, FOLDED, Pass, PassContext
from onnxlm.passes.quant.linears import (
    dequantized_matmul_nbits,
    drop_unused,
    initializer_bytes,
    is_lm_head,
    linear_weight,
    linears,
    untie_lm_head,
)
from onnxlm.passes.quant.moe_experts import moe_nodes, quantize_experts


MAX_BLOCK = 1 << 16  # far above any layer width; the model's own bound is in check_fits


@dataclasses.dataclass
class WeightOnlyOptions:
    bits: int = 4
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 4  # 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations (VNNI on CPU)
    method: str = "rtn"  # rtn | gptq
    lm_head: bool = True  # quantize the (untied) LM head too
    calibration_samples: int = 8  # gptq: windows of calibration_window tokens from the calibration text
    calibration_window: int = 128
    format: str = "nbits"  # nbits: com.microsoft.MatMulNBits; qdq: a blocked DequantizeLinear + MatMul (NPU EPs)
    per_channel: bool = False  # qdq, symmetric: one scale per output channel (block_size unused), ORT's Intel NPU form


class CalibrationReader:
    """ORT's CalibrationDataReader protocol over a list of feed dicts (ORT deep-copies it, so it is plain data)."""

    def __init__(self, feeds: list[dict]):
        self.feeds, self.i = feeds, 0

    def get_next(self):
        self.i += 1
        return self.feeds[self.i - 1] if self.i <= len(self.feeds) else None

    def __iter__(self):
        return iter(self.feeds)

    def rewind(self):
        self.i = 0


def calibration_feeds(model, ctx: PassContext, samples: int, window: int) -> list[dict]:
    """Prefill feeds (empty past) for `samples` windows of the calibration text."""
    import onnx_ir as ir

    from onnxlm.passes.evaluate import feeds_for, open_session, windows_of

    ids = windows_of(ctx.calibration_ids, window)[:samples]
    if not ids:
        raise OnnxlmError("gptq needs calibration text: the calibration token ids are empty")
    path = ctx.scratch / "calibration.onnx"
    ir.save(model, path, external_data="calibration.onnx.data")
    session = open_session(path)
    return [feeds_for(session, ctx.info, np.asarray([w], np.int64), 0, None, interface=ctx.interface) for w in ids]


def replace_graph(model, new_model) -> None:
    """Make `model` hold `new_model`'s graph: the in-place contract of a pass, across an ONNX proto round trip."""
    model.graph = new_model.graph
    model.ir_version = max(model.ir_version, new_model.ir_version)


def weight_report(ctx: PassContext, pairs: list[tuple[np.ndarray, np.ndarray]], graph, size_before: int) -> None:
    """Relative weight error ||W - Wq|| / ||W|| over all quantized linears together, and the initializer bytes."""
    num = sum(float(np.linalg.norm(w.astype(np.float64) - q)) ** 2 for w, q in pairs)
    den = sum(float(np.linalg.norm(w.astype(np.float64))) ** 2 for w, _ in pairs)
    ctx.metrics.update({"weight_rel_error": float(np.sqrt(num / den)) if den else None,
                        "bytes_before": size_before, "bytes_after": initializer_bytes(graph)})


def nbits_pairs(graph, originals: dict[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(original, dequantized) for each MatMulNBits whose output name is in `originals`."""
    return [(originals[n.outputs[0].name], dequantized_matmul_nbits(n)) for n in graph
            if n.op_type == "MatMulNBits" and n.outputs[0].name in originals]


def _only_these_quantizer():
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    class OnlyThese(mnq.MatMulNBitsQuantizer):
        """ORT's GPTQ path takes every MatMul with an initializer input (the rotary frequency product too) and
        ignores nodes_to_include; mark every other node "fp32", the quantizer's own word for "leave it"."""

        def _generate_q4_node_config(self):
            config = super()._generate_q4_node_config()
            return {k: (v if k in self.nodes_to_include else "fp32") for k, v in config.items()}

    return OnlyThese


class QuantWeightOnly(Pass):
    """Every linear -> com.microsoft.MatMulNBits(bits, block_size), by ORT's MatMulNBitsQuantizer (RTN or GPTQ)."""

    name = "quant_weight_only"
    requires = (FOLDED,)  # quantizes the linears still float (those quant_gguf_exact left)
    removes = (FLOAT_WEIGHTS,)
    Options = WeightOnlyOptions
    lossless = False

    def validate(self) -> None:
        o = self.options
        if o.bits not in (4, 8):
            raise OnnxlmError(f"quant_weight_only: bits must be 4 or 8, got {o.bits}")
        if o.block_size < 16 or o.block_size & (o.block_size - 1):
            raise OnnxlmError(f"quant_weight_only: block_size must be a power of 2 >= 16, got {o.block_size}")
        if o.block_size > MAX_BLOCK:
            raise OnnxlmError(f"quant_weight_only: block_size must be at most {MAX_BLOCK}, got {o.block_size}")
        if o.accuracy_level not in (0, 1, 2, 3, 4):
            raise OnnxlmError(f"quant_weight_only: accuracy_level must be 0..4, got {o.accuracy_level}")
        if o.method not in ("rtn", "gptq"):
            raise OnnxlmError(f"quant_weight_only: method must be rtn or gptq, got {o.method!r}")
        if o.method == "gptq" and o.bits != 4:
            raise OnnxlmError("quant_weight_only: ORT's GPTQ quantizes to 4 bits only")
        if o.format not in ("nbits", "qdq") or (o.format == "qdq" and o.method != "rtn"):
            raise OnnxlmError(f"quant_weight_only: format must be nbits, or qdq with method rtn; got {o.format!r} "
                              f"with {o.method}")
        if o.per_channel and (o.format != "qdq" or not o.symmetric or o.bits != 4):
            raise OnnxlmError("quant_weight_only: per_channel needs format qdq, symmetric and 4 bits")

    def check_fits(self, info) -> None:
        # A block wider than every layer only pads rows with zeros (K is padded to a multiple of the block).
        width = max(info.hidden_size, info.intermediate_size)
        widest = 1 << max(width - 1, 1).bit_length()  # the widest linear's K, rounded up to a power of 2
        if self.options.block_size > widest:
            raise OnnxlmError(f"quant_weight_only: block_size {self.options.block_size} is wider than the model's "
                              f"layers (at most {width} wide): use at most {widest}")
        if self.options.format == "qdq" and not self.options.per_channel:
            # ONNX allows a partial last block along K; OpenVINO's DequantizeLinear refuses one (SmolLM2's 576)
            block = self.options.block_size
            widths = sorted({w for w in (info.hidden_size, info.intermediate_size, info.num_heads * info.head_dim)
                             if w and w % block})
            if widths:
                fits = [b for b in range(4, block.bit_length() - 1) if all(w % (1 << b) == 0 for w in widths)]
                use = (f"--block-size {1 << max(fits)}, or " if fits else "") + "the pass's per_channel option"
                raise OnnxlmError(f"quant_weight_only: block_size {block} does not divide the linears' input width "
                                  f"{', '.join(map(str, widths))}, and OpenVINO refuses a partial DequantizeLinear "
                                  f"block: use {use}")

    def run(self, model, ctx: PassContext):
        import onnx_ir as ir
        from onnxruntime.quantization import QuantFormat
        from onnxruntime.quantization import matmul_nbits_quantizer as mnq

        OnlyTheseQuantizer = _only_these_quantizer()
        o = self.options
        ir.external_data.load_to_model(model)  # ORT's quantizer reads a proto with every tensor inline
        size_before = initializer_bytes(model.graph)
        if o.lm_head:
            untie_lm_head(model.graph)
        targets = [n for n in linears(model.graph) if o.lm_head or not is_lm_head(n)]
        experts, expert_notes = quantize_experts(model, o.bits, o.block_size) if o.format == "nbits" else ([], [])
        if not targets:
            return bool(experts), {"qmoe": len(experts) // 2} if experts else {}, [
                "no linear MatMul with a constant weight", *expert_notes]
        originals = {n.outputs[0].name: linear_weight(n) for n in targets}
        names = [n.name for n in targets]
        unused = [v for v in model.graph.inputs if not v.uses()]  # e.g. attention_mask beside GroupQueryAttention
        if o.method == "gptq":
            # ORT's GPTQ code cannot sort a graph with an unused input: hide those inputs while it runs
            feeds = calibration_feeds(model, ctx, o.calibration_samples, o.calibration_window)
            reader = CalibrationReader([{k: v for k, v in f.items() if k not in {u.name for u in unused}}
                                        for f in feeds])
            config = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=reader, op_types_to_quantize=("MatMul",))
        else:
            config = mnq.DefaultWeightOnlyQuantConfig(
                block_size=o.block_size, is_symmetric=o.symmetric, accuracy_level=o.accuracy_level, bits=o.bits,
                op_types_to_quantize=("MatMul",))
        if o.format == "qdq":
            from onnxlm.passes.quant.qdq import raise_opset

            raise_opset(model)  # blocked 4-bit DequantizeLinear is standard from opset 21
            config.quant_format = QuantFormat.QDQ
            # per channel, ORT writes the codes as [N, K] with one scale per row, then a Transpose (its Intel NPU form)
            config.channel_wised_quantize = o.per_channel
        others = [n.name for n in model.graph if n.name not in set(names)]  # ORT would take every MatMul
        proto = ir.to_proto(model)
        if o.method == "gptq":
            kept = [i for i in proto.graph.input if i.name not in {u.name for u in unused}]
            del proto.graph.input[:]
            proto.graph.input.extend(kept)
        quantizer = OnlyTheseQuantizer(
            proto, bits=o.bits, block_size=o.block_size, is_symmetric=o.symmetric,
            accuracy_level=o.accuracy_level, nodes_to_include=names, nodes_to_exclude=others, algo_config=config,
            quant_format=QuantFormat.QDQ if o.format == "qdq" else QuantFormat.QOperator)
        quantizer.process()
        inputs = list(model.graph.inputs)
        replace_graph(model, ir.from_proto(quantizer.model.model))
        if any(n.domain == "com.microsoft" for n in model.graph):  # ORT's GPTQ path does not import the domain
            model.opset_imports.setdefault("com.microsoft", 1)
            model.graph.opset_imports.setdefault("com.microsoft", 1)
        present = {v.name for v in model.graph.inputs}
        for index, value in enumerate(inputs):  # restore the interface (inputs hidden from GPTQ, in their order)
            if value.name not in present:
                model.graph.inputs.insert(index, ir.Value(name=value.name, type=value.type, shape=value.shape))
        drop_unused(model)
        if o.format == "qdq":
            from onnxlm.passes.quant.qdq import qdq_pairs

            pairs = qdq_pairs(model.graph, originals)
            done = len(pairs)
        else:
            pairs = nbits_pairs(model.graph, originals)
            done = sum(1 for n in model.graph if n.op_type == "MatMulNBits")
        weight_report(ctx, pairs + experts, model.graph, size_before)
        notes = [] if done == len(targets) else [f"{len(targets) - done} of {len(targets)} linears left in float"]
        notes += expert_notes
        moe = moe_nodes(model.graph)
        if moe and o.format == "qdq":
            notes.append(f"{moe} mixture-of-experts nodes left in float: the QDQ form has no MoE op")
        elif experts and not o.symmetric:
            notes.append("the experts' weights are symmetric: QMoE takes no zero points")
        matched = {"dequantize_linear" if o.format == "qdq" else "matmul_nbits": done}
        if experts:
            matched["qmoe"] = len(experts) // 2
        return done > 0, matched, notes
