"""The decoder as La RoSA sees it: per layer an attention and an MLP sub-block, each a norm whose output feeds
some linears, and one output linear whose result joins the residual stream.

Found without node names, in both graph forms:
- plain export: the stream r_j is read by its RMSNorm (Pow .. Mul(r, rsqrt), then Mul(., gamma)) and by one
  residual Add; the Add's other input is the sub-block's output MatMul (o_proj / down_proj).
- fused (`fp32` recipe): SimplifiedLayerNormalization(r_0, gamma) opens layer 0; every later norm is the
  SkipSimplifiedLayerNormalization(out, r_j, gamma) that also adds the sub-block output to the stream (its 4th
  output is r_{j+1}).
After `rotate_residual` an adapter MatMul(r, Q_l^T Q_{l+1}) may sit on the stream edge into a join; the walk
passes through it, and gamma may already be folded (plain: the gamma Mul is gone; fused: gamma is ones).
"""

from __future__ import annotations

import dataclasses

from onnxlm.errors import OnnxlmError

SKIP_NORM = "SkipSimplifiedLayerNormalization"
NORM = "SimplifiedLayerNormalization"


@dataclasses.dataclass
class Norm:
    """An RMSNorm: `node` holds gamma at input `gamma_index` (None once folded away in a plain graph);
    `normed` is the value the consumers read."""

    node: object | None
    gamma_index: int | None
    normed: object


@dataclasses.dataclass
class SubBlock:
    layer: int
    kind: str  # "attn" | "mlp"
    norm: Norm
    linears: list  # MatMul(normed, W) nodes: q/k/v (or packed qkv), gate/up (or packed gate_up)
    out: object  # the MatMul whose output joins the stream: o_proj / down_proj
    join: object  # Add (plain) or SkipSimplifiedLayerNormalization (fused)
    skip_index: int  # the input of `join` through which the stream (or its adapter) enters
    adapter: object | None  # MatMul(stream, Q_l^T Q_{l+1}) on that edge, after rotate_residual


@dataclasses.dataclass
class Decoder:
    fused: bool
    embedding: object  # Gather(table, input_ids)
    blocks: list[SubBlock]  # attn_0, mlp_0, attn_1, ...
    final_norm: Norm
    head: object  # MatMul(normed, W) or MatMul(normed, Transpose(table)) -> logits


def refuse_experts(info, pass_name: str) -> None:
    """La RoSA rotates and sparsifies dense MLPs (gate/up/down linears on one normed input); a mixture of experts'
    MoE node holds its experts' weights inside one op, which neither pass rewrites."""
    if info.moe:
        raise OnnxlmError(f"{pass_name}: La RoSA rewrites dense MLPs, and this {info.architecture} model's MLPs are "
                          "mixtures of experts")


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


def _is_const(value) -> bool:
    return value is not None and value.const_value is not None


def _plain_norm(r) -> Norm:
    """RMSNorm of the stream value r in the plain export: Mul(r, rsqrt(mean(r^2) + eps)), then Mul(gamma)."""
    scaled = [u.node for u in r.uses() if u.node.op_type == "Mul"
              and not any(v is r or _is_const(v) for v in _others(u.node, u.idx))]
    if len(scaled) != 1:
        raise OnnxlmError("cannot find an RMSNorm on the residual stream: La RoSA needs a llama-style decoder")
    normed = scaled[0].outputs[0]
    uses = list(normed.uses())
    if len(uses) == 1 and uses[0].node.op_type == "Mul":
        gamma_mul = uses[0].node
        const = [i for i, v in enumerate(gamma_mul.inputs) if _is_const(v)]
        if len(const) == 1 and len(gamma_mul.inputs[const[0]].shape or ()) == 1:
            return Norm(gamma_mul, const[0], gamma_mul.outputs[0])
    return Norm(None, None, normed)


def _others(node, idx):
    return [v for i, v in enumerate(node.inputs) if i != idx]


def _is_join(node, idx) -> bool:
    return (node.op_type == "Add" and node.domain in ("", "ai.onnx")) or (node.op_type == SKIP_NORM and idx in (0, 1))


def _join_of(r):
    """(join node, input index, adapter or None): where the stream value r is added to a sub-block output."""
    joins = [(u.node, u.idx, None) for u in r.uses() if _is_join(u.node, u.idx)]
    for u in r.uses():
        node = u.node
        w = constant_matmul_weight(node) if u.idx == 0 else None
        if w is not None and w.shape[0] == w.shape[1]:
            joins += [(v.node, v.idx, node) for v in node.outputs[0].uses() if _is_join(v.node, v.idx)]
    if len(joins) != 1:
        raise OnnxlmError(f"cannot follow the residual stream at '{r.name}': found {len(joins)} residual additions")
    return joins[0]


def _linears(norm: Norm, what: str) -> list:
    nodes = [u.node for u in norm.normed.uses()]
    if not nodes or any(constant_matmul_weight(n) is None or n.inputs[0] is not norm.normed for n in nodes):
        raise OnnxlmError(f"the {what} norm output must feed only float MatMuls with constant weights: "
                          "La RoSA passes run on fp32 graphs, before quantization")
    return nodes


def find_decoder(graph, num_layers: int) -> Decoder:
    ids = next((v for v in graph.inputs if v.name == "input_ids"), None)
    gathers = [u.node for u in ids.uses() if u.node.op_type == "Gather"] if ids is not None else []
    if len(gathers) != 1 or not _is_const(gathers[0].inputs[0]):
        raise OnnxlmError("cannot find the embedding Gather of input_ids with a constant table")
    embedding = gathers[0]
    r = embedding.outputs[0]
    first = [u.node for u in r.uses() if u.node.op_type == NORM]
    fused = bool(first)
    fused_norm = first[0] if fused else None
    blocks = []
    for j in range(2 * num_layers):
        if fused:
            norm = Norm(fused_norm, 1 if fused_norm.op_type == NORM else 2, fused_norm.outputs[0])
        else:
            norm = _plain_norm(r)
        kind = "attn" if j % 2 == 0 else "mlp"
        linears = _linears(norm, f"layer {j // 2} {kind}")
        join, skip_index, adapter = _join_of(r)
        branch = join.inputs[1 - skip_index]
        out = branch.producer() if branch is not None else None
        if constant_matmul_weight(out) is None:
            raise OnnxlmError(f"layer {j // 2} {kind}: the residual addition does not add a MatMul's output")
        blocks.append(SubBlock(j // 2, kind, norm, linears, out, join, skip_index, adapter))
        if fused:
            if join.op_type != SKIP_NORM or len(join.outputs) < 4:
                raise OnnxlmError("a fused graph must add the residual in SkipSimplifiedLayerNormalization")
            fused_norm, r = join, join.outputs[3]
        else:
            r = join.outputs[0]
    final = Norm(fused_norm, 2, fused_norm.outputs[0]) if fused else _plain_norm(r)
    heads = [u.node for u in final.normed.uses()]
    if len(heads) == 1 and heads[0].op_type == "Slice":  # logits_to_keep: the head reads the last k rows
        heads = [u.node for u in heads[0].outputs[0].uses()]
    if len(heads) != 1 or constant_matmul_weight(heads[0]) is None:
        raise OnnxlmError("the final norm must feed one float LM head MatMul")
    return Decoder(fused, embedding, blocks, final, heads[0])
