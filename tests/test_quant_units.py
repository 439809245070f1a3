"""Quantization building blocks, checked against their references: gguf-py's dequantization, ORT's
MatMulNBits kernel, MatQuant's slicing rule, and the knapsack's budget."""

from __future__ import annotations

import numpy as np
import pytest

from onnxlm.frontend.gguf_blocks import decode_blocks
from onnxlm.passes.quant.linears import matmul_nbits
from onnxlm.passes.quant.nested import choose_bits, dequant, int8_codes, slice_codes


def run_single_node(build, x: np.ndarray) -> np.ndarray:
    """Build a one-input graph with onnx-ir (`build(graph, x_value) -> output value`) and run it in ORT."""
    import onnx_ir as ir
    import onnxruntime as ort

    x_value = ir.Value(name="x", shape=ir.Shape(x.shape), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x_value], [], nodes=[], opset_imports={"": 20, "com.microsoft": 1}, name="g")
    y = build(graph, x_value)
    y.name = "y"
    graph.outputs.append(y)
    model = ir.Model(graph, ir_version=10)
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x})[0]


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_dequantize_bit_for_bit_like_gguf_py(qtype):
    import gguf

    w = np.random.default_rng(1).standard_normal((6, 96)).astype(np.float32)
    kind = gguf.GGMLQuantizationType[qtype]
    raw = gguf.quants.quantize(w, kind)
    ours = decode_blocks("t", qtype, raw, 6, 96).dequantize()
    theirs = gguf.quants.dequantize(raw, kind)
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("with_zero_points", [False, True])
def test_matmul_nbits_packing_round_trips_through_ort(bits, with_zero_points):
    """Pack codes, run ORT's MatMulNBits, compare with x @ numpy dequantization (methods.md 7.5's pitfall)."""
    rng = np.random.default_rng(bits)
    n, k, block = 24, 96, 32
    codes = rng.integers(0, 1 << bits, (n, k), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.1, (n, k // block)).astype(np.float32)
    zero = rng.integers(0, 1 << bits, (n, k // block), dtype=np.uint8) if with_zero_points else None
    zp = zero.astype(np.float32) if zero is not None else np.float32(1 << (bits - 1))
    if zero is not None:
        zp = np.repeat(zp, block, axis=1)
    w = ((codes.astype(np.float32) - zp) * np.repeat(scales, block, axis=1)).T  # [K, N]
    x = rng.standard_normal((1, 3, k)).astype(np.float32)

    def build(graph, x_value):
        node = matmul_nbits(graph, x_value, codes, scales, bits, block, "q", 0, zero)
        graph.append(node)
        return node.outputs[0]

    y = run_single_node(build, x)
    np.testing.assert_allclose(y, x @ w, rtol=1e-4, atol=1e-4)


def test_matquant_slices_are_the_rounded_top_bits_and_run_in_ort():
    w = np.random.default_rng(2).standard_normal((64, 16)).astype(np.float32)
    q8, s8 = int8_codes(w, 32)
    assert np.abs(dequant(q8, s8, 8, 32) - w).max() <= s8.max() / 2 + 1e-6  # int8 RTN: half a step
    for r in (4, 2):
        q, s = slice_codes(q8, s8, r)
        expect = np.clip((q8.astype(int) >> (8 - r)) + ((q8.astype(int) >> (7 - r)) & 1), 0, 2**r - 1)
        assert np.array_equal(q, expect)
        # same zero point in 8-bit units: (q_r * 2^(8-r) - 128) * s8 == (q_r - 2^(r-1)) * s_r
        assert np.allclose(dequant(q, s, r, 32), ((q.astype(np.float32) * 2 ** (8 - r) - 128) *
                                                   np.repeat(s8, 32, axis=1)).T)
    errors = [np.linalg.norm(dequant(*slice_codes(q8, s8, r), r, 32) - w) for r in (8, 4, 2)]
    assert errors[0] < errors[1] < errors[2]


def test_knapsack_meets_the_budget_and_spends_bits_where_they_matter():
    costs = {0: {8: 0.0, 4: 0.5, 2: 3.0}, 1: {8: 0.0, 4: 0.01, 2: 0.05}, 2: {8: 0.0, 4: 0.02, 2: 1.0}}
    sizes = {0: 100, 1: 100, 2: 100}
    bits = choose_bits(costs, sizes, 4.0)
    assert sum(bits[u] * sizes[u] for u in bits) / 300 <= 4.0
    assert bits[0] >= bits[1] and bits[1] == 2  # the insensitive unit goes lowest first
    assert choose_bits(costs, sizes, 8.0) == {0: 8, 1: 8, 2: 8}


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("hidden,block", [(64, 32), (96, 64)])
def test_shared_embedding_rows_equal_the_heads_dequantized_columns(bits, hidden, block, tmp_path):
    """share_tied_embedding's GatherBlockQuantized reads MatMulNBits' blocks with the same default zero point,
    also when the block does not divide hidden (the head's padded blocks are gathered, then sliced off)."""
    import onnx_ir as ir
    import onnxruntime as ort

    from onnxlm.passes.base import PassContext
    from onnxlm.passes.quant.tied_embedding import ShareTiedEmbedding

    rng = np.random.default_rng(5)
    vocab, padded = 48, -(-hidden // block) * block
    codes = rng.integers(0, 1 << bits, (vocab, padded), dtype=np.uint8)  # head weight [hidden, vocab] as codes
    scales = rng.uniform(0.01, 0.1, (vocab, padded // block)).astype(np.float32)
    table = np.ascontiguousarray(dequant(codes, scales, bits, block).T[:, :hidden])  # the tied float table
    codes = codes[:, :hidden]
    ids = ir.Value(name="input_ids", shape=ir.Shape([1, 5]), type=ir.TensorType(ir.DataType.INT64))
    table_value = ir.Value(name="table", shape=ir.Shape(table.shape), type=ir.TensorType(ir.DataType.FLOAT),
                           const_value=ir.tensor(table))
    gather = ir.node("Gather", [table_value, ids], name="embed")
    graph = ir.Graph([ids], [], nodes=[gather], initializers=[table_value],
                     opset_imports={"": 20, "com.microsoft": 1})
    head = matmul_nbits(graph, gather.outputs[0], codes, scales, bits, block, "head", 0)
    graph.append(head)
    head.outputs[0].name = "logits"
    graph.outputs.append(head.outputs[0])
    embedded = ir.node("Identity", [gather.outputs[0]], name="show")
    graph.append(embedded)
    embedded.outputs[0].name = "embedded"
    graph.outputs.append(embedded.outputs[0])
    model = ir.Model(graph, ir_version=10)
    ctx = PassContext(info=None, source={}, scratch=tmp_path)
    assert ShareTiedEmbedding().run(model, ctx)[0]
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    tokens = np.array([[0, 7, 47, 3, 7]], np.int64)
    rows = session.run(["embedded"], {"input_ids": tokens})[0][0]
    np.testing.assert_allclose(rows, table[tokens[0]], rtol=1e-6, atol=1e-6)
