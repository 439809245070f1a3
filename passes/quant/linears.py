"""What the quantization passes share: finding the linear layers, untying the LM head, packing MatMulNBits.

A *linear* is MatMul(x, W) with W a constant [K, N] initializer, K and N >= 16 (which leaves out the rotary
frequency product [1, head_dim/2]). com.microsoft.MatMulNBits (ORT contrib op; spec in shared/research/methods.md
section 7.2) computes Y = X @ dequant(B), dequant = (q - zero_point) * scale per block of `block_size` along K:
    B        uint8 [N, ceil(K / block), block * bits / 8]   column n of W, element j of a block in bits
                                                           [bits*j, bits*(j+1)) of its bytes, low bits first
    scales   float [N, ceil(K / block)]
    zero_points (optional) packed uint8 [N, ceil(blocks * bits / 8)]; absent = 2^(bits-1)
"""

from __future__ import annotations

import numpy as np

from onnxlm.passes.constants import add_initializer

OFFSET_SUFFIX = ".offset_matmul"


def linear_weight(node) -> np.ndarray | None:
    """The [K, N] weight of a linear MatMul node, else None."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    if node.name.endswith(OFFSET_SUFFIX):  # quant_gguf_exact's exact Q4_1 offset term, not a weight to quantize
        return None
    w = node.inputs[1]
    if w is None or w.const_value is None or len(w.const_value.shape) != 2 or min(w.const_value.shape) < 16:
        return None
    return w.const_value.numpy()


def linears(graph) -> list:
    return [n for n in graph if linear_weight(n) is not None]


# Elementwise ops a family applies to the head's output: final soft-capping (Gemma 2), a logit divisor (Granite).
HEAD_EPILOGUE = ("Mul", "Div", "Tanh")


def lm_head(graph):
    """The node computing the logits: the one writing `logits`, or the MatMul that the family's elementwise
    epilogue (a soft-cap, a divisor) reads from."""
    writer = next((v.producer() for v in graph.outputs if v.name == "logits"), None)
    node = writer
    while node is not None and node.op_type in HEAD_EPILOGUE:
        node = node.inputs[0].producer() if node.inputs[0] is not None else None
    return node if node is not None and node.op_type.startswith("MatMul") else writer


def is_lm_head(node) -> bool:
    return node.graph is not None and node is lm_head(node.graph)


def untie_lm_head(graph) -> bool:
    """MatMul(x, Transpose(E)) with E the tied embedding becomes MatMul(x, E^T as its own initializer), so that
    the head is a linear the quantizers can see. The embedding Gather keeps E. Returns whether it changed."""
    for node in graph:
        if not is_lm_head(node) or node.op_type != "MatMul":
            continue
        producer = node.inputs[1].producer()
        if producer is None or producer.op_type != "Transpose" or producer.inputs[0].const_value is None:
            return False
        table = producer.inputs[0]
        head = add_initializer(graph, f"{table.name}.T", table.const_value.numpy().T)
        node.replace_input_with(1, head)
        if not producer.outputs[0].uses():
            graph.remove(producer, safe=True)
        return True
    return False


def pack_bits(codes: np.ndarray, bits: int, block: int) -> np.ndarray:
    """uint8 codes [N, K] (K a multiple of block) -> MatMulNBits B [N, K / block, block * bits / 8]."""
    n, k = codes.shape
    per_byte = 8 // bits
    groups = codes.reshape(n, k // per_byte, per_byte).astype(np.uint8)
    packed = np.zeros((n, k // per_byte), np.uint8)
    for j in range(per_byte):
        packed |= (groups[:, :, j] & ((1 << bits) - 1)) << (bits * j)
    return packed.reshape(n, k // block, block * bits // 8)


def matmul_nbits(graph, x, codes: np.ndarray, scales: np.ndarray, bits: int, block: int, name: str,
                 accuracy_level: int = 0, zero_points: np.ndarray | None = None):
    """A com.microsoft.MatMulNBits node computing x @ W with W[k, n] = (codes[n, k] - zp) * scales[n, k // block].
    K need not be a multiple of block (scales [N, ceil(K / block)]). `zero_points` are per-block uint8 codes [N, K / block] (absent: 2^(bits-1)). Initializers are added to
    `graph`; the node is returned, not inserted."""
    import onnx_ir as ir

    n, k = codes.shape
    if k % block:  # MatMulNBits pads K up to whole blocks; the padding's codes dequantize to zero
        codes = np.concatenate([codes, np.full((n, -k % block), 1 << (bits - 1), np.uint8)], axis=1)
    inputs = [x, add_initializer(graph, f"{name}.B", pack_bits(codes, bits, block)),
              add_initializer(graph, f"{name}.scales", scales.astype(np.float32))]
    if zero_points is not None:
        blocks = zero_points.shape[1]
        padded = np.zeros((n, -(-blocks * bits // 8) * (8 // bits)), np.uint8)
        padded[:, :blocks] = zero_points
        inputs.append(add_initializer(graph, f"{name}.zero_points",
                                      pack_bits(padded, bits, padded.shape[1]).reshape(n, -1)))
    return ir.node("MatMulNBits", inputs, domain="com.microsoft", name=name,
                   attributes={"K": k, "N": n, "bits": bits, "block_size": block, "accuracy_level": accuracy_level})


def replace_linear(graph, node, new_nodes: list, output) -> None:
    """Insert `new_nodes` before the linear `node`, route its uses (graph outputs too, by name) to `output`,
    and remove it."""
    import onnx_ir as ir

    ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, [node.outputs[0]], [output])


def dequantized_matmul_nbits(node) -> np.ndarray:
    """The [K, N] float weight a MatMulNBits node multiplies by (for the weight-error report)."""
    bits, block = node.attributes["bits"].as_int(), node.attributes["block_size"].as_int()
    k, n = node.attributes["K"].as_int(), node.attributes["N"].as_int()
    packed = node.inputs[1].const_value.numpy().reshape(n, -1)
    codes = np.stack([(packed >> (bits * j)) & ((1 << bits) - 1) for j in range(8 // bits)], axis=-1)
    codes = codes.reshape(n, -1, block).astype(np.float32)
    scales = node.inputs[2].const_value.numpy().reshape(n, -1, 1)
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        zp_packed = node.inputs[3].const_value.numpy().reshape(n, -1)
        zp = np.stack([(zp_packed >> (bits * j)) & ((1 << bits) - 1) for j in range(8 // bits)], axis=-1)
        zp = zp.reshape(n, -1)[:, :codes.shape[1], None].astype(np.float32)
    else:
        zp = np.float32(1 << (bits - 1))
    return ((codes - zp) * scales).reshape(n, -1)[:, :k].T


def drop_unused(model) -> None:
    """Remove nodes and initializers nothing reads any more (the float weights a pass replaced)."""
    import onnx_ir.passes.common as common

    common.RemoveUnusedNodesPass()(model)


def initializer_bytes(graph) -> int:
    return sum(v.const_value.nbytes for v in graph.initializers.values() if v.const_value is not None)
