"""`rotate_residual`: La RoSA's layerwise rotation of the residual stream (Liu et al., arXiv 2507.01299).

Layer l's residual stream lives in the basis Q_l (calibrate.py). RMSNorm commutes with a rotation once its
gamma is folded into the linears that read it (RMSNorm(r Q) = RMSNorm(r) Q), so with W stored [in, out]:
    embed' = E Q_0                      W_qkv', W_gate/up' = Q_l^T diag(gamma) W
    W_o'   = W_o Q_l                    W_down' = W_down Q_{l+1} (Q_l for the last layer)
    adapter Q_l^T Q_{l+1} on the stream edge that skips layer l's MLP, into the residual addition that ends it
    lm_head' = Q_{L-1}^T diag(gamma_final) W_lm (untied from the embedding)
so layer l+1 starts from (r + mlp(r)) Q_{l+1} with one d x d GEMV per boundary. Putting the adapter on the skip
edge and Q_{l+1} into W_down (rather than on the sum) keeps the fused SkipSimplifiedLayerNormalization whole:
its sum and its normalized output are both in the next layer's basis.

Input: a float decoder of a pre-norm family (every block opens with an RMSNorm and has no post-norm: llama,
mistral, qwen2/3, phi3, gemma, granite, smollm3; a post-norm's gamma multiplies the block's output, where no linear
can take it), dense MLPs, the plain export (`fp32-plain`) or the fused graph (`fp32`: Skip/
SimplifiedLayerNormalization, packed QKV and gate/up, GroupQueryAttention); the sub-blocks come from the
decoder-structure analysis (passes/decoder_structure.py). A constant scale on the embedding or on a block's output
(Gemma, Granite) commutes with the rotation. Needs calibration text.
Guarantees: the same logits (the manager checks them against the graph before); every norm's gamma is 1 (or
gone); the block inputs of layer l are RMSNorm(r) Q_l, ready for `topk_sparsify`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onnxlm.errors import OnnxlmError
from onnxlm.passes.base import FLOAT_WEIGHTS, FOLDED, PLAIN, UNSLICED_HEAD, Pass, PassContext
from onnxlm.passes.constants import add_initializer
from onnxlm.passes.decoder_structure import Decoder, Norm, constant_matmul_weight, find_decoder
from onnxlm.passes.larosa.calibrate import rotation, second_moments


@dataclasses.dataclass
class RotateResidualOptions:
    calibration_tokens: int = 2048
    damping: float = 0.01  # times mean(diag H), added to H's diagonal before eigh


class RotateResidual(Pass):
    name = "rotate_residual"
    requires = (FOLDED, FLOAT_WEIGHTS, UNSLICED_HEAD)
    removes = (PLAIN,)  # the gamma Muls go and adapters sit on the residual edges
    Options = RotateResidualOptions

    def validate(self) -> None:
        if self.options.calibration_tokens < 16:
            raise OnnxlmError("rotate_residual needs calibration_tokens >= 16")
        if not self.options.damping > 0:
            raise OnnxlmError("rotate_residual needs damping > 0")

    def check_fits(self, info) -> None:
        refuse_unrotatable(info, self.name)

    def run(self, model, ctx: PassContext):
        import onnx_ir.passes.common as common

        graph = model.graph
        layers = ctx.info.num_layers
        decoder = float_decoder(graph, ctx.info)
        if any(b.adapter is not None for b in decoder.blocks):
            raise OnnxlmError("rotate_residual: the graph is already rotated")
        # 1. gamma into the readers of each norm (lossless alone); the block inputs become RMSNorm(r).
        gammas = [fold_gamma(graph, b.norm) for b in decoder.blocks]
        gamma_final = fold_gamma(graph, decoder.final_norm)
        decoder = float_decoder(graph, ctx.info)
        # 2. Q_l: eigenbasis of the second moment of the attention input as the paper takes it, after the norm
        # with gamma (x = RMSNorm(r) * gamma, so H = diag(gamma) H_normed diag(gamma)). On SmolLM2 this measured
        # better than the moment of RMSNorm(r) itself (the vector top-k sees): PPL 25.0 against 25.7 at s=0.25.
        moments, count = second_moments(model, [decoder.blocks[2 * l].norm.normed for l in range(layers)], ctx,
                                        self.options.calibration_tokens)
        moments = [gammas[2 * l][:, None] * h * gammas[2 * l][None, :] for l, h in enumerate(moments)]
        rotations, spectra = zip(*(rotation(h, self.options.damping) for h in moments))
        # 3. rotate the weights, insert the adapters, untie the head.
        rotate_weights(graph, decoder, gammas, gamma_final, rotations)
        common.RemoveUnusedNodesPass()(model)
        graph.sort()
        energy = [float(s[: len(s) // 2].sum() / s.sum()) for s in spectra]  # share in the top d/2 directions
        form = "fused" if decoder.fused else "plain"
        return True, {"layers_rotated": layers, "adapters": layers - 1}, [
            f"residual stream rotated per layer ({form} graph), lm_head untied",
            f"Q_l from {count} calibration tokens; the top half of the eigenvectors holds "
            f"{min(energy):.1%}..{max(energy):.1%} of the attention inputs' energy"]


def refuse_experts(info, pass_name: str) -> None:
    """La RoSA rotates and sparsifies dense MLPs (gate/up/down linears on one normed input); a mixture of experts'
    MoE node holds its experts' weights inside one op, which neither pass rewrites."""
    if info.moe:
        raise OnnxlmError(f"{pass_name}: La RoSA rewrites dense MLPs, and this {info.architecture} model's MLPs are "
                          "mixtures of experts")


def refuse_unrotatable(info, pass_name: str) -> None:
    """The rotation folds each norm's gamma into the linears that read it; a post-norm's gamma scales the block's
    output on its way into the residual stream, which no linear reads, so it cannot commute with Q_l."""
    refuse_experts(info, pass_name)
    norms = (info.family or {}).get("block_norms", [])
    post = [n for n in norms if n.startswith("post_")]
    if post:
        raise OnnxlmError(f"{pass_name}: La RoSA rotates pre-norm blocks, and this {info.architecture} model's blocks "
                          f"have {', '.join(post)} norms, whose gamma no linear can take")


def float_decoder(graph, info) -> Decoder:
    """The decoder, checked for what the rotation rewrites: each block's input read only by float MatMuls with
    constant weights, and its output written by one."""
    decoder = find_decoder(graph, info)
    for b in decoder.blocks:
        where = f"layer {b.layer} {b.kind}"
        if not b.linears or any(constant_matmul_weight(n) is None for n in b.linears):
            raise OnnxlmError(f"the {where} norm output must feed only float MatMuls with constant weights: "
                              "La RoSA passes run on fp32 graphs, before quantization")
        if constant_matmul_weight(b.out) is None:
            raise OnnxlmError(f"{where}: the residual addition does not add a MatMul's output")
    if constant_matmul_weight(decoder.head) is None:
        raise OnnxlmError("the final norm must feed one float LM head MatMul")
    return decoder


def rotate_weights(graph, decoder: Decoder, gammas: list, gamma_final: np.ndarray, rotations: list) -> None:
    """The weights of a gamma-folded decoder rewritten so that layer l's stream is in basis rotations[l]."""
    layers = len(rotations)
    for l in range(layers):
        q, q_next = rotations[l], rotations[min(l + 1, layers - 1)]
        attn, mlp = decoder.blocks[2 * l], decoder.blocks[2 * l + 1]
        for block, gamma in ((attn, gammas[2 * l]), (mlp, gammas[2 * l + 1])):
            for linear in block.linears:
                set_weight(graph, linear, q.T @ (gamma[:, None] * weight(linear)))
        set_weight(graph, attn.out, weight(attn.out) @ q)
        set_weight(graph, mlp.out, weight(mlp.out) @ q_next)
        if l + 1 < layers:
            insert_adapter(graph, mlp, q.T @ q_next, f"larosa.adapter_{l}")
    set_weight(graph, decoder.head, rotations[-1].T @ (gamma_final[:, None] * weight(decoder.head)))
    table = decoder.embedding.inputs[0]
    embed = add_initializer(graph, "larosa.embed_tokens", (table.const_value.numpy() @ rotations[0]).astype(np.float32))
    decoder.embedding.replace_input_with(0, embed)


def weight(node) -> np.ndarray:
    return constant_matmul_weight(node).astype(np.float64)


def set_weight(graph, node, w: np.ndarray) -> None:
    """A new float32 initializer as `node`'s weight (the old one may be shared, e.g. the tied table)."""
    value = add_initializer(graph, f"{node.name}.larosa_weight", w.astype(np.float32))
    node.replace_input_with(1, value)


def fold_gamma(graph, norm: Norm) -> np.ndarray:
    """Take gamma out of the norm (plain: bypass its Mul; fused: gamma := 1) and return it (d,) as float64;
    the caller multiplies it into the readers' weights."""
    if norm.node is None:
        raise OnnxlmError("rotate_residual: a norm has no gamma (the graph is already rotated?)")
    gamma = norm.node.inputs[norm.gamma_index].const_value.numpy().astype(np.float64)
    if norm.node.op_type == "Mul":
        x = norm.node.inputs[1 - norm.gamma_index]
        norm.node.outputs[0].replace_all_uses_with(x)
        graph.remove(norm.node, safe=True)
    else:
        ones = graph.initializers.get("larosa.ones")
        if ones is None:
            ones = add_initializer(graph, "larosa.ones", np.ones(gamma.shape, np.float32))
        norm.node.replace_input_with(norm.gamma_index, ones)
    return gamma


def insert_adapter(graph, mlp, adapter: np.ndarray, name: str) -> None:
    """MatMul(stream, Q_l^T Q_{l+1}) on the stream edge into the addition that ends layer l."""
    import onnx_ir as ir

    join, index = mlp.join, mlp.skip_index
    stream = join.inputs[index]
    node = ir.node("MatMul", [stream, add_initializer(graph, f"{name}.weight", adapter.astype(np.float32))],
                   name=name)
    node.outputs[0].name = f"{name}.output"
    node.outputs[0].dtype, node.outputs[0].shape = stream.dtype, stream.shape
    graph.insert_before(join, node)
    join.replace_input_with(index, node.outputs[0])

