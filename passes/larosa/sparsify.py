"""`topk_sparsify`: La RoSA's per-token top-k activation sparsity in decode (Liu et al., arXiv 2507.01299).

At sparsity s each token keeps, by magnitude, k = int((1 - 0.8 s) d) entries of the rotated q/k/v and gate/up
inputs (RMSNorm(r) Q_l after `rotate_residual`), and k = int((1 - 1.2 s) d) of the unrotated o_proj and
down_proj inputs (the released code's split). Per site:
    Abs -> TopK(k) -> ReduceMin (the k-th largest |x|) -> GreaterOrEqual -> Where(keep, x, 0)
Ties at the k-th value may keep more than k.

Decode only: each site is an If on `Equal(seq_len, 1) Or sparsify_all_positions`; the else branch passes x on,
so a prefill runs the dense graph unchanged. `sparsify_all_positions` is a bool scalar initializer that is also
a graph input (default false, ORT lists it among the overridable initializers): feeding true turns the sparse
path on for every position. Top-k is per token, so a prefill with it on gives each position the logits that
decoding token by token gives: that is how the PPL cost is measured (this pass's `ppl_after`, and
`session_perplexity(..., extra={"sparsify_all_positions": np.array(True)})`).

Input: a float decoder (rotated by `rotate_residual` for La RoSA; without it this is plain top-k).
Lossy: reports PPL with the sparse path on all positions, and the weight bytes a decode token reads (dense, and
the rows selected by the kept entries, adapters and LM head counted dense). Speed: an accuracy mode; ORT has no
sparse-input GEMV (a Gather of the kept rows measured ~1.9x slower than the dense MatMul).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onnxlm.errors import OnnxlmError
from onnxlm.interface import Port
from onnxlm.passes.base import FLOAT_WEIGHTS, FOLDED, UNSLICED_HEAD, Pass, PassContext
from onnxlm.passes.constants import add_initializer, add_overridable_input
from onnxlm.passes.decoder_structure import constant_matmul_weight
from onnxlm.passes.larosa.rotate import float_decoder, refuse_experts

SWITCH = "sparsify_all_positions"
ROTATED_SHARE, PLAIN_SHARE = 0.8, 1.2  # of s: the rotated block inputs / the o_proj and down_proj inputs


def keep_count(d: int, sparsity: float) -> int:
    """Entries kept per token: the released code's k = int((1 - s) d), at least 1."""
    return max(1, int((1 - sparsity) * d))


@dataclasses.dataclass
class TopkSparsifyOptions:
    sparsity: float = 0.25


class TopkSparsify(Pass):
    name = "topk_sparsify"
    requires = (FOLDED, FLOAT_WEIGHTS, UNSLICED_HEAD)
    Options = TopkSparsifyOptions
    lossless = False

    def ports(self, info):
        return [Port(SWITCH, "input", "bool", (), feature="score_as_decoded", role="switch", default=False,
                     optional=True, meaning="top-k on every position, not only in decode: a prefill then scores "
                                            "what decoding token by token computes")]

    def validate(self) -> None:
        s = self.options.sparsity
        if not 0 < s < 1 / PLAIN_SHARE:
            raise OnnxlmError(f"topk_sparsify sparsity must be in (0, {1 / PLAIN_SHARE:.3f}), got {s}")

    def check_fits(self, info) -> None:
        refuse_experts(info, self.name)

    def run(self, model, ctx: PassContext):
        graph = model.graph
        if any(v.name == SWITCH for v in graph.inputs):
            raise OnnxlmError("topk_sparsify: the graph is already sparsified")
        decoder = float_decoder(graph, ctx.info)
        s = self.options.sparsity
        apply = sparse_condition(graph)
        keep = {}  # MatMul node -> share of its input entries kept
        sites = 0
        for block in decoder.blocks:
            for readers, share in ((block.linears, ROTATED_SHARE), ([block.out], PLAIN_SHARE)):
                x = readers[0].inputs[0]
                d = constant_matmul_weight(readers[0]).shape[0]  # the input width: the weight's K
                k = keep_count(d, share * s)
                y = topk_site(graph, apply, x, k, readers[0])
                for node in readers:
                    node.replace_input_with(0, y)
                    keep[node] = k / d
                sites += 1
        graph.sort()
        ctx.metrics.update(sparse_ppl(model, ctx))
        ctx.metrics["weight_bytes_per_token"] = weight_bytes(graph, keep)
        ctx.metrics["kept_per_token"] = {"rotated_inputs": round(1 - ROTATED_SHARE * s, 4),
                                         "o_down_inputs": round(1 - PLAIN_SHARE * s, 4)}
        return True, {"topk_sites": sites}, [
            f"top-k at {sites} sites, decode only; ppl_after is measured with {SWITCH}=true (every position sparse)"]


def sparse_condition(graph):
    """bool [1]: the sequence length is 1, or the `sparsify_all_positions` input is true."""
    import onnx_ir as ir

    ids = next(v for v in graph.inputs if v.name == "input_ids")
    switch = add_overridable_input(graph, SWITCH, np.array(False))  # () bool
    one = add_initializer(graph, "larosa.one", np.array([1], np.int64))
    seq = ir.node("Shape", [ids], {"start": 1, "end": 2}, name="larosa.seq_len")  # (1,)
    decode = ir.node("Equal", [seq.outputs[0], one], name="larosa.is_decode")
    apply = ir.node("Or", [decode.outputs[0], switch], name="larosa.sparse")  # (1,) bool
    graph.insert_before(graph.node(0), [seq, decode, apply])
    return apply.outputs[0]


def topk_site(graph, apply, x, k: int, before):
    """If(apply, x with all but its k largest |x| per token zeroed, x); returns the If's output."""
    import onnx_ir as ir

    k_value = shared_constant(graph, f"larosa.k_{k}", np.array([k], np.int64))
    last = shared_constant(graph, "larosa.last_axis", np.array([-1], np.int64))
    zero = shared_constant(graph, "larosa.zero", np.array(0, np.float32))
    magnitude = ir.node("Abs", [x])
    topk = ir.node("TopK", [magnitude.outputs[0], k_value], {"axis": -1, "largest": 1, "sorted": 1}, num_outputs=2)
    kth = ir.node("ReduceMin", [topk.outputs[0], last], {"keepdims": 1})  # (..., 1): the k-th largest |x|
    keep = ir.node("GreaterOrEqual", [magnitude.outputs[0], kth.outputs[0]])
    sparse = ir.node("Where", [keep.outputs[0], x, zero])
    passed = ir.node("Identity", [x])
    dtype = x.dtype or before.inputs[1].dtype  # a loaded graph may not carry x's type; the weight's is the same
    for out in (sparse.outputs[0], passed.outputs[0]):
        out.dtype, out.shape = dtype, x.shape
    name = f"{before.name}.larosa_topk"
    for node in (magnitude, topk, kth, keep, sparse, passed):  # subgraph names share the model's namespace
        node.name = f"{name}.{node.op_type}"
        for i, out in enumerate(node.outputs):
            out.name = f"{node.name}.output_{i}"
    then_branch = ir.Graph([], [sparse.outputs[0]], nodes=[magnitude, topk, kth, keep, sparse], name=f"{name}.sparse")
    else_branch = ir.Graph([], [passed.outputs[0]], nodes=[passed], name=f"{name}.dense")
    node = ir.node("If", [apply], {"then_branch": then_branch, "else_branch": else_branch}, name=name)
    node.outputs[0].name = f"{name}.output"
    node.outputs[0].dtype, node.outputs[0].shape = dtype, x.shape
    graph.insert_before(before, node)
    return node.outputs[0]


def shared_constant(graph, name: str, array: np.ndarray):
    """The initializer `name`, added once and read by every site (subgraphs read it from the outer scope)."""
    existing = graph.initializers.get(name)
    return existing if existing is not None else add_initializer(graph, name, array)


def weight_bytes(graph, keep: dict) -> dict:
    """Weight bytes one decode token reads: every float linear's [K, N] weight, or the rows of its kept inputs,
    plus one embedding row. Adapters (d x d) and the LM head are read dense."""
    dense = sparse = adapters = head = 0.0
    for node in graph:
        w = constant_matmul_weight(node)
        if w is None:
            if node.op_type == "Gather" and node.inputs[1] is not None and node.inputs[1].name == "input_ids":
                row = node.inputs[0].const_value.numpy()[0]
                dense += row.nbytes
                sparse += row.nbytes
            continue
        dense += w.nbytes
        sparse += w.nbytes * keep.get(node, 1.0)
        if node.name.startswith("larosa.adapter_"):
            adapters += w.nbytes
        if any(o.name == "logits" for o in node.outputs):
            head += w.nbytes
    return {"dense": int(dense), "sparse": int(sparse), "sparse_over_dense": round(sparse / dense, 4),
            "adapters": int(adapters), "lm_head": int(head), "dense_without_adapters": int(dense - adapters)}


def sparse_ppl(model, ctx: PassContext) -> dict:
    """PPL on the calibration text with every position on the sparse path (what decoding token by token
    scores); it is this pass's `ppl_after` (with the switch off, prefill is dense and the PPL is unchanged)."""
    import onnx_ir as ir

    from onnxlm.passes.evaluate import open_session, session_perplexity

    if not ctx.calibration_ids:
        return {}
    path = ctx.scratch / "larosa_sparse.onnx"
    ir.save(model, path, external_data="larosa_sparse.onnx.data")
    session = open_session(path)
    ppl = session_perplexity(session, ctx.info, ctx.calibration_ids, extra={SWITCH: np.array(True)},
                             interface=ctx.interface)
    return {"ppl_after": ppl, "ppl_after_feeds": {SWITCH: True}}
