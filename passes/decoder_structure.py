"""The decoder's structure in its graph: one analysis, read from the model's family description.

Every pass that edits the decoder by its parts (remove_layers, La RoSA, the dynamic int8 roles, QuickSilver
halting, early exit) asks `find_decoder(graph, info)` where those parts are, instead of walking the graph itself.
The description (`ModelInfo.family`, frontend/families) says how a block is built, and the walk expects just that:
- `block_norms`: which sub-blocks open with a pre-norm (pre_attention, pre_mlp) and which close with a post-norm
  (post_attention, post_mlp: Gemma 2 and 3 have both, OLMo 2 only the post-norms);
- `moe`: which layers' MLPs are mixtures of experts (one MoE / QMoE node, no output linear of their own);
- `embedding_scale`, `residual_multiplier`: a constant Mul on the embedding and on each sub-block's output.
A graph without a description (an older artifact, an ONNX source) is read as llama's.

The residual stream r_0 .. r_2L is found without node names. r_0 is the embedding Gather's output (times its
scale); sub-block j reads r_j through its pre-norm (or directly), and its join adds its output to r_j:
- plain export: the join is an Add; an RMSNorm is Mul(x, Reciprocal(Sqrt(... x ...))) then Mul(., gamma);
- lowered (`fuse_skip_rms_norm`): the join is a SkipSimplifiedLayerNormalization(branch, r_j, gamma) whose
  output 0 is the next pre-norm's and output 3 is r_{j+1}; a norm with no Add in front of it is a
  SimplifiedLayerNormalization. A residual Add that no norm reads (a post-norm family's) stays an Add.
After La RoSA's `rotate_residual` an adapter MatMul(r, Q_l^T Q_{l+1}) may sit on the stream edge into a join,
and gamma may be folded (plain: the gamma Mul is gone; fused: gamma is ones); the walk takes both.
"""

from __future__ import annotations

import dataclasses

from onnxlm.errors import OnnxlmError

SKIP_NORM = "SkipSimplifiedLayerNormalization"
NORM = "SimplifiedLayerNormalization"
LLAMA_BLOCK = ("pre_attention", "pre_mlp")
KINDS = ("attn", "mlp")
NORM_ROLE = {"attn": "attention", "mlp": "mlp"}  # block_norms name the sub-blocks so: pre_attention, post_mlp
RSQRT = ("Reciprocal", "Div", "Rsqrt")  # the last op of an RMSNorm's 1 / sqrt(mean(x^2) + eps)
NORM_CHAIN = 6  # nodes between x and its rsqrt in the plain RMSNorm (Pow, ReduceMean, Add, Sqrt, Reciprocal)


@dataclasses.dataclass
class Norm:
    """An RMSNorm: `node` holds gamma at input `gamma_index` (None once folded away in a plain graph); `normed`
    is the value its readers read."""

    node: object | None
    gamma_index: int | None
    normed: object


@dataclasses.dataclass
class SubBlock:
    """Attention or MLP of one layer: r_{j+1} = r_j + scale * post_norm(f(pre_norm(r_j)))."""

    layer: int
    kind: str  # "attn" | "mlp"
    stream_in: object  # r_j
    norm: Norm | None  # the pre-norm; None where the block reads r_j itself (OLMo 2)
    linears: list  # the nodes reading the block's input: q/k/v (or packed qkv), gate/up, a router, a MoE
    out: object | None  # o_proj / down_proj: what the post-norm and scale read (None: a mixture of experts)
    post_norm: Norm | None
    scale: object | None  # Mul(., residual_multiplier) (Granite)
    join: object  # Add (plain) or SkipSimplifiedLayerNormalization (fused)
    skip_index: int  # the input of `join` through which the stream (or its adapter) enters
    adapter: object | None  # MatMul(stream, Q_l^T Q_{l+1}) on that edge, after rotate_residual
    stream_out: object | None  # r_{j+1} (None: the last join of a fused graph that no one reads past)
    attention: object | None = None  # the layer's GroupQueryAttention (attn blocks of a lowered graph)

    @property
    def branch_index(self) -> int:
        """The input of `join` through which the sub-block's output enters."""
        return 1 - self.skip_index


@dataclasses.dataclass
class Decoder:
    fused: bool  # the joins are SkipSimplifiedLayerNormalization (the lowered graph)
    embedding: object  # Gather(table, input_ids)
    blocks: list[SubBlock]  # attn_0, mlp_0, attn_1, ...
    final_norm: Norm
    head: object  # the node reading the final norm (through logits_to_keep's Slice): the LM head

    @property
    def stream(self) -> list:
        """[r_0, ..., r_2L]: the value entering each sub-block, and the last layer's output."""
        return [b.stream_in for b in self.blocks] + [self.blocks[-1].stream_out]

    def attn(self, layer: int) -> SubBlock:
        return self.blocks[2 * layer]

    def mlp(self, layer: int) -> SubBlock:
        return self.blocks[2 * layer + 1]


def find_decoder(graph, info) -> Decoder:
    """The decoder of `graph` as `info.family` describes it; a graph that does not match is a one-line error."""
    family = info.family or {}
    norms = set(family.get("block_norms", LLAMA_BLOCK))
    sparse = (info.moe or {}).get("layers") or [False] * info.num_layers
    embedding = _embedding(graph)
    r = _after_scale(embedding.outputs[0])
    blocks, prev_join = [], None
    for j in range(2 * info.num_layers):
        layer, kind = j // 2, KINDS[j % 2]
        where, role = f"layer {layer} {kind}", NORM_ROLE[kind]
        if r is None:
            raise OnnxlmError(f"{where}: the residual stream ends early (found {layer} of {info.num_layers} layers)")
        norm = _pre_norm(r, prev_join, where) if f"pre_{role}" in norms else None
        join, skip_index, adapter = _join_of(r, where)
        scale, branch = _scale_of(join.inputs[1 - skip_index])
        post = None
        if f"post_{role}" in norms:
            post, branch = _post_norm(branch, where)
        out = None if kind == "mlp" and sparse[layer] else (branch.producer() if branch is not None else None)
        normed = norm.normed if norm is not None else r
        linears = [u.node for u in normed.uses() if u.node is not join and u.node is not adapter
                   and not _reads_for_norm(u.node, normed)]
        if join.op_type == SKIP_NORM:
            stream_out = join.outputs[3] if len(join.outputs) > 3 else None
        else:
            stream_out = join.outputs[0]
        blocks.append(SubBlock(layer, kind, r, norm, linears, out, post, scale, join, skip_index, adapter,
                               stream_out, _attention(graph, layer) if kind == "attn" else None))
        prev_join, r = join, stream_out
    final = _final_norm(blocks[-1], prev_join)
    return Decoder(any(b.join.op_type == SKIP_NORM for b in blocks), embedding, blocks, final, _head(final))


def _embedding(graph):
    ids = next((v for v in graph.inputs if v.name == "input_ids"), None)
    gathers = [u.node for u in ids.uses() if u.node.op_type == "Gather"] if ids is not None else []
    if len(gathers) != 1 or not _is_const(gathers[0].inputs[0]):
        raise OnnxlmError("cannot find the embedding Gather of input_ids with a constant table")
    return gathers[0]


def _is_const(value) -> bool:
    return value is not None and value.const_value is not None


def _is_var(value) -> bool:
    return value is not None and value.const_value is None


def _scalar_const(value) -> bool:
    return _is_const(value) and value.const_value.size == 1


def _after_scale(r):
    """The embedding times its constant scale (Gemma, Granite), where the family scales it."""
    uses = r.uses()
    if len(uses) == 1 and uses[0].node.op_type == "Mul" and any(_scalar_const(v) for v in uses[0].node.inputs):
        return uses[0].node.outputs[0]
    return r


def _scale_of(branch):
    """(the Mul by a constant scalar on a sub-block's output, its input), or (None, branch)."""
    node = branch.producer() if branch is not None else None
    if node is not None and node.op_type == "Mul":
        scalars = [i for i, v in enumerate(node.inputs) if _scalar_const(v)]
        if len(scalars) == 1:
            return node, node.inputs[1 - scalars[0]]
    return None, branch


def _depends_on(value, x, depth: int = NORM_CHAIN) -> bool:
    """Whether `value` is computed from `x` within `depth` nodes."""
    if value is x:
        return True
    node = value.producer() if value is not None else None
    if node is None or depth == 0:
        return False
    return any(v is not None and _depends_on(v, x, depth - 1) for v in node.inputs)


def _rms_scale(node):
    """x of a plain RMSNorm's Mul(x, rsqrt(mean(x^2) + eps)), else None. The rsqrt is Reciprocal(Sqrt(..)) in
    the export (or a Div of it); a Mul(x, Sigmoid(x)) (SiLU) or a gamma Mul is none."""
    if node is None or node.op_type != "Mul" or len(node.inputs) != 2 or any(not _is_var(v) for v in node.inputs):
        return None
    for x, rsqrt in (node.inputs, reversed(node.inputs)):
        producer = rsqrt.producer()
        if x is not rsqrt and producer is not None and producer.op_type in RSQRT and _depends_on(rsqrt, x):
            return x
    return None


def _with_gamma(normed) -> Norm:
    """The plain RMSNorm whose rsqrt Mul writes `normed`, with its gamma Mul if one reads it."""
    uses = list(normed.uses())
    if len(uses) == 1 and uses[0].node.op_type == "Mul":
        gamma_mul = uses[0].node
        const = [i for i, v in enumerate(gamma_mul.inputs) if _is_const(v)]
        if len(const) == 1 and len(gamma_mul.inputs[const[0]].shape or ()) == 1:
            return Norm(gamma_mul, const[0], gamma_mul.outputs[0])
    return Norm(None, None, normed)


def _pre_norm(r, prev_join, where: str) -> Norm:
    if prev_join is not None and prev_join.op_type == SKIP_NORM:
        return Norm(prev_join, 2, prev_join.outputs[0])
    fused = [u.node for u in r.uses() if u.node.op_type == NORM and u.idx == 0]
    if len(fused) == 1:
        return Norm(fused[0], 1, fused[0].outputs[0])
    plain = [u.node for u in r.uses() if _rms_scale(u.node) is r]
    if len(plain) != 1:
        raise OnnxlmError(f"{where}: cannot find the RMSNorm its family description puts on the residual stream")
    return _with_gamma(plain[0].outputs[0])


def _post_norm(branch, where: str) -> tuple[Norm, object]:
    """(the post-norm writing `branch`, the value it normalizes)."""
    node = branch.producer() if branch is not None else None
    if node is not None and node.op_type == NORM:
        return Norm(node, 1, branch), node.inputs[0]
    gamma, scaled = None, node
    if node is not None and node.op_type == "Mul" and _rms_scale(node) is None:
        const = [i for i, v in enumerate(node.inputs) if _is_const(v)]
        if len(const) == 1:
            gamma, scaled = const[0], node.inputs[1 - const[0]].producer()
    x = _rms_scale(scaled)
    if x is None:
        raise OnnxlmError(f"{where}: cannot find the post-norm its family description puts on the block's output")
    return Norm(node if gamma is not None else None, gamma, branch), x


def _reads_for_norm(node, x) -> bool:
    """Whether `node` is part of a plain RMSNorm of x (its Pow, or its rsqrt Mul)."""
    return _rms_scale(node) is x or (node.op_type == "Pow" and node.inputs[0] is x)


def _is_join(node, idx) -> bool:
    return (node.op_type == "Add" and node.domain in ("", "ai.onnx")) or (node.op_type == SKIP_NORM and idx in (0, 1))


def _join_of(r, where: str):
    """(join node, input index, adapter or None): where the stream value r is added to a sub-block output."""
    joins = [(u.node, u.idx, None) for u in r.uses() if _is_join(u.node, u.idx)]
    for u in r.uses():
        node = u.node
        w = constant_matmul_weight(node) if u.idx == 0 else None
        if w is not None and w.shape[0] == w.shape[1]:
            joins += [(v.node, v.idx, node) for v in node.outputs[0].uses() if _is_join(v.node, v.idx)]
    if len(joins) != 1:
        raise OnnxlmError(f"{where}: cannot follow the residual stream at '{r.name}': found {len(joins)} residual "
                          "additions")
    return joins[0]


def _attention(graph, layer: int):
    """The GroupQueryAttention that reads layer `layer`'s past keys, if the graph has one."""
    past = next((v for v in graph.inputs if v.name == f"past_key_values.{layer}.key"), None)
    nodes = [u.node for u in past.uses() if u.node.op_type == "GroupQueryAttention"] if past is not None else []
    return nodes[0] if len(nodes) == 1 else None


def _final_norm(last: SubBlock, join) -> Norm:
    if join.op_type == SKIP_NORM:
        return Norm(join, 2, join.outputs[0])
    return _pre_norm(last.stream_out, None, "the final norm")


def _head(final: Norm):
    heads = [u.node for u in final.normed.uses()]
    if len(heads) == 1 and heads[0].op_type == "Slice":  # logits_to_keep: the head reads the last k rows
        heads = [u.node for u in heads[0].outputs[0].uses()]
    if len(heads) != 1:
        raise OnnxlmError(f"the final norm must feed one LM head, it feeds {len(heads)} nodes")
    return heads[0]


def constant_matmul_weight(node):
    """The [K, N] numpy weight of MatMul(x, W) with W a constant (or Transpose of one, the tied head)."""
    if node is None or node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
        return None
    w = node.inputs[1]
    if w is None:
        return None
    if w.const_value is not None and len(w.shape or ()) == 2:
        return w.const_value.numpy()
    producer = w.producer()
    if producer is not None and producer.op_type == "Transpose" and producer.inputs[0].const_value is not None:
        perm = producer.attributes.get_ints("perm", None)
        if (perm is None or list(perm) == [1, 0]) and len(producer.inputs[0].shape or ()) == 2:
            return producer.inputs[0].const_value.numpy().T
    return None
