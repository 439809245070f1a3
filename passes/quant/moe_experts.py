"""Quantize a mixture of experts' weights: com.microsoft.MoE -> com.microsoft.QMoE (ONNX Runtime contrib ops, CPU
kernels in ORT 1.32), round to nearest, symmetric.

QMoE reads the experts' fc1 [experts, 2 * inter, hidden] and fc2 [experts, hidden, inter] as unsigned codes
q = round(w / scale) + 2^(bits-1) along each row's input axis, the 4-bit codes two to a byte (low nibble first),
with one float scale per row (bits 8) or per block of `block` inputs (bits 4). Everything else about the node
(k, activation, routing) is kept. Used by quant_weight_only, which quantizes the plain linears around it.
"""

from __future__ import annotations

import numpy as np

from onnxlm.passes.constants import add_initializer

MSFT = "com.microsoft"


def moe_nodes(graph) -> int:
    """How many com.microsoft.MoE nodes (float experts) the graph holds."""
    return sum(1 for n in graph if n.op_type == "MoE" and n.domain == MSFT)


def _quantize(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes as QMoE stores them, scales, the dequantized weight) of w [experts, rows, K]."""
    experts, rows, k = w.shape
    per_row, block = not block, block or k
    blocks = w.astype(np.float32).reshape(experts, rows, k // block, block)
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(blocks).max(axis=-1, keepdims=True) / qmax
    scale[scale == 0] = 1.0
    codes = np.clip(np.rint(blocks / scale), -qmax - 1, qmax)
    dequantized = (codes * scale).reshape(w.shape).astype(np.float32)
    stored = (codes + 2 ** (bits - 1)).astype(np.uint8).reshape(w.shape)
    if bits == 4:
        stored = (stored[..., 0::2] | (stored[..., 1::2] << 4)).astype(np.uint8)
    scale = scale.reshape(experts, rows, k // block)
    return stored, (scale[..., 0] if per_row else scale).astype(np.float32), dequantized


def quantize_experts(model, bits: int, block: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[str]]:
    """Every MoE node with constant expert weights becomes a QMoE; returns (original, dequantized) per weight, and
    notes on the nodes left float.
    ORT 1.32's CPU QMoE renormalizes the top-k routing weights even with normalize_routing_weights=0 (measured:
    its output matched the renormalized reference to 2.4e-4 and missed the plain one by 331, on outputs of ~1.5e3),
    so a MoE that does not renormalize (Qwen2-MoE, Qwen3-MoE without norm_topk_prob) keeps float experts.
    4-bit weights take blocks of `block` inputs when it divides both widths, else one scale per row; 8-bit weights
    always one per row (the only 8-bit layout whose results this module was checked against on ORT 1.32)."""
    import onnx_ir as ir

    pairs, unnormalized = [], 0
    for node in list(model.graph):
        if node.op_type != "MoE" or node.domain != MSFT:
            continue
        if not node.attributes.get_int("normalize_routing_weights", 0):
            unnormalized += 1
            continue
        fc1, bias1, fc2 = (node.inputs[i] if len(node.inputs) > i else None for i in (2, 3, 4))
        if fc1 is None or fc2 is None or fc1.const_value is None or fc2.const_value is None or bias1 is not None:
            continue
        w1, w2 = fc1.const_value.numpy(), fc2.const_value.numpy()
        per_block = block if bits == 4 and w1.shape[2] % block == 0 and w2.shape[2] % block == 0 else 0
        inputs = list(node.inputs[:2])
        for name, w in ((fc1.name, w1), (fc2.name, w2)):
            stored, scale, dequantized = _quantize(w, bits, per_block)
            inputs += [add_initializer(model.graph, f"{name}.q{bits}", stored),
                       add_initializer(model.graph, f"{name}.scales", scale)]
            pairs.append((w, dequantized))
        inputs.insert(4, None)  # fc1_experts_bias, between fc1's scales and fc2
        attributes = {a.name: a for a in node.attributes.values()}
        attributes["expert_weight_bits"] = ir.AttrInt64("expert_weight_bits", bits)
        if per_block:
            attributes["block_size"] = ir.AttrInt64("block_size", per_block)
        qmoe = ir.Node(MSFT, "QMoE", inputs, attributes=list(attributes.values()), name=f"{node.name}.q",
                       num_outputs=1)
        model.graph.insert_after(node, qmoe)
        name = node.outputs[0].name
        node.outputs[0].replace_all_uses_with(qmoe.outputs[0], replace_graph_outputs=True)
        node.outputs[0].name, qmoe.outputs[0].name = f"{name}.float", name
        model.graph.remove(node, safe=True)
    notes = [f"{unnormalized} mixture-of-experts nodes left in float: their routing does not renormalize the top-k "
             "weights, which ORT's CPU QMoE always does"] if unnormalized else []
    return pairs, notes
