"""`quant_qdq`: static QDQ quantization for NPU execution providers, by ONNX Runtime's `quantize_static`.

QNN's HTP and OpenVINO's NPU take quantized models as QuantizeLinear/DequantizeLinear pairs around float ops (the
QDQ format) and fuse them into integer kernels themselves. The defaults are QNN's usual config: uint16
activations, uint8 weights per output channel, MinMax ranges calibrated on prefill windows of the calibration
text. The graph's opset goes to 21 first, so that 16-bit Q/DQ are standard ONNX ops (at opset 20 ORT writes
com.microsoft ones, which shape inference and NPU EPs do not know); nothing else in the plain graph changed
meaning between 20 and 21.

Input: the portable graph (plain export after cleanup): MatMul linears with constant weights. `ops` picks which
op types get Q/DQ (default MatMul: the linears and both attention products). Lossy: the manager reports the PPL
cost; the pass reports the weight error and the sizes. On the CPU EP the QDQ graph runs as float ops between
Q/DQ pairs (a simulation of the integer kernels an NPU runs), so its speed here says nothing about an NPU's.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from onnxlm.errors import OnnxlmError, first_line
from onnxlm.passes.base import FLOAT_WEIGHTS, FOLDED, Pass, PassContext
from onnxlm.passes.quant.linears import drop_unused, initializer_bytes, linear_weight, linears, untie_lm_head

QDQ_OPSET = 21  # 16-bit and 4-bit (blocked) Q/DQ are standard ONNX from opset 21
ACTIVATIONS = {"uint8": "QUInt8", "uint16": "QUInt16", "int8": "QInt8", "int16": "QInt16"}
WEIGHTS = {"uint8": "QUInt8", "int8": "QInt8", "uint16": "QUInt16", "int16": "QInt16"}


@dataclasses.dataclass
class QdqOptions:
    activations: str = "uint16"
    weights: str = "uint8"
    per_channel: bool = True
    ops: str = "MatMul"  # comma-separated op types to quantize
    calibration_samples: int = 8  # windows of calibration_window tokens from the calibration text
    calibration_window: int = 128


def raise_opset(model, version: int = QDQ_OPSET) -> None:
    """Set the default-domain opset to at least `version` (the plain graph's ops mean the same there)."""
    model.opset_imports[""] = max(model.opset_imports.get("", version), version)
    model.graph.opset_imports[""] = model.opset_imports[""]


def dequantized(node) -> np.ndarray:
    """The float64 value of a DequantizeLinear of a constant: per tensor, per channel (`axis`) or per block."""
    x, scale = node.inputs[0].const_value.numpy(), node.inputs[1].const_value.numpy().astype(np.float64)
    zero = node.inputs[2] if len(node.inputs) > 2 else None
    zero = zero.const_value.numpy().astype(np.float64) if zero is not None else np.zeros_like(scale)
    q = x.astype(np.float64)
    if scale.size == 1:
        return (q - zero.reshape(())) * scale.reshape(())
    axis = node.attributes.get_int("axis", 1) % q.ndim
    block = node.attributes.get_int("block_size", 0)
    if block:  # blocked: scale has the shape of q with axis divided into blocks
        scale = np.repeat(scale, block, axis=axis).take(range(q.shape[axis]), axis=axis)
        zero = np.repeat(zero, block, axis=axis).take(range(q.shape[axis]), axis=axis)
        return (q - zero) * scale
    shape = [1] * q.ndim
    shape[axis] = -1
    return (q - zero.reshape(shape)) * scale.reshape(shape)


def qdq_pairs(graph, originals: dict[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(original, dequantized) per MatMul (by output name, as in `originals`) whose weight is now a constant
    DequantizeLinear, or its transpose."""
    pairs = []
    for node in graph:
        if node.op_type != "MatMul" or node.outputs[0].name not in originals or node.inputs[1] is None:
            continue
        dq, transposed = node.inputs[1].producer(), False
        if dq is not None and dq.op_type == "Transpose" and list(dq.attributes.get_ints("perm", [])) == [1, 0]:
            dq, transposed = dq.inputs[0].producer(), True  # per-channel int4: DequantizeLinear [N, K] -> Transpose
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.inputs[0].const_value is not None:
            weight = dequantized(dq)
            pairs.append((originals[node.outputs[0].name], weight.T if transposed else weight))
    return pairs


def rotary_products(graph) -> list[str]:
    """The MatMuls that read position_ids (through anything but another MatMul): the rotary frequency product.
    Quantizing it would clip positions to the calibration windows' range (MinMax on 128-token windows made every
    position past 127 equal to 127: SmolLM2's PPL went from 26.7 to 113 on 512-token windows)."""
    start = [v for v in graph.inputs if v.name == "position_ids"]
    found, seen = [], set()
    while start:
        value = start.pop()
        for node, _ in value.uses():
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type == "MatMul":
                found.append(node.name)
            else:
                start.extend(node.outputs)
    return found


class QuantQdq(Pass):
    """Static QDQ quantization (ORT quantize_static, MinMax on calibration text): QNN-style by default."""

    name = "quant_qdq"
    requires = (FOLDED, FLOAT_WEIGHTS)
    removes = (FLOAT_WEIGHTS,)
    Options = QdqOptions
    lossless = False

    def validate(self) -> None:
        o = self.options
        if o.activations not in ACTIVATIONS:
            raise OnnxlmError(f"quant_qdq: activations must be one of {', '.join(ACTIVATIONS)}, got {o.activations!r}")
        if o.weights not in WEIGHTS:
            raise OnnxlmError(f"quant_qdq: weights must be one of {', '.join(WEIGHTS)}, got {o.weights!r}")
        if o.calibration_samples < 1 or o.calibration_window < 2:
            raise OnnxlmError("quant_qdq: calibration_samples must be >= 1 and calibration_window >= 2")

    def run(self, model, ctx: PassContext):
        import onnx_ir as ir
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        from onnxlm.passes.quant.weight_only import CalibrationReader, calibration_feeds, replace_graph, weight_report

        o = self.options
        ir.external_data.load_to_model(model)
        size_before = initializer_bytes(model.graph)
        untie_lm_head(model.graph)
        originals = {n.outputs[0].name: linear_weight(n) for n in linears(model.graph)}
        raise_opset(model)
        reader = CalibrationReader(calibration_feeds(model, ctx, o.calibration_samples, o.calibration_window))
        source, out = ctx.scratch / "qdq_float.onnx", ctx.scratch / "qdq.onnx"
        ir.save(model, source, external_data=source.name + ".data")
        quiet = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # quantize_static warns on the root logger about pre-processing
        try:
            quantize_static(str(source), str(out), reader, quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=[op for op in o.ops.split(",") if op],
                            nodes_to_exclude=rotary_products(model.graph),
                            per_channel=o.per_channel, activation_type=getattr(QuantType, ACTIVATIONS[o.activations]),
                            weight_type=getattr(QuantType, WEIGHTS[o.weights]),
                            calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True)
        except Exception as exc:
            raise OnnxlmError(f"quant_qdq: ORT's quantize_static failed: {first_line(exc)}") from None
        finally:
            logging.getLogger().setLevel(quiet)
        replace_graph(model, ir.load(out))
        ir.external_data.load_to_model(model)
        drop_unused(model)
        counts = {op: sum(1 for n in model.graph if n.op_type == op) for op in ("QuantizeLinear", "DequantizeLinear")}
        pairs = qdq_pairs(model.graph, originals)
        weight_report(ctx, pairs, model.graph, size_before)
        notes = [f"{len(pairs)} of {len(originals)} linears have {o.weights} weights"
                 f"{' per channel' if o.per_channel else ''}; activations {o.activations}"]
        return counts["QuantizeLinear"] > 0, counts, notes
