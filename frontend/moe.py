"""Export a mixture-of-experts MLP block as one com.microsoft.MoE node (ONNX Runtime contrib op, CPU kernel in
ORT >= 1.22; checked here on 1.32).

transformers runs a sparse block as a Python loop over the experts that some token chose (`nonzero`, then
`index_add_`): a data-dependent shape that torch.export cannot trace. During the export each sparse block's
forward is replaced by

    router_logits = gate(x)                                   # a plain linear, kept in the graph
    y = MoE(x, router_logits, fc1, fc2, k=top_k, activation_type="swiglu", swiglu_fusion=1,
            normalize_routing_weights=normalize)              # softmax, top-k, experts, weighted sum
    y += sigmoid(x @ shared_gate) * shared_expert(x)          # Qwen2-MoE's shared expert, a plain MLP

The router, a linear on the flattened tokens, exports as a Gemm, which the weight quantizers leave in float: its
top-k choice is discontinuous, so a rounded router could send a token to other experts.

with fc1 [experts, 2 * inter, hidden] holding each expert's gate and up rows interleaved (the only SwiGLU layout
ORT's CPU kernel takes) and fc2 [experts, hidden, inter] its down projection. The op computes only the chosen
experts, so the graph costs what the loop does. A family whose experts are not SiLU-gated is refused.
"""

import contextlib
import functools

from onnxlm.errors import OnnxlmError


@functools.cache
def _moe_op():
    """The custom torch op the rewritten blocks call (torch.ops.onnxlm.moe, registered once, on first use: torch is
    a frontend-only import): eager math (the reference) and a fake for tracing."""
    import torch

    @torch.library.custom_op("onnxlm::moe", mutates_args=())
    def moe(x: torch.Tensor, router_logits: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor, top_k: int,
            normalize: bool) -> torch.Tensor:
        weights = torch.softmax(router_logits.float(), dim=-1)
        weights, chosen = torch.topk(weights, top_k, dim=-1)
        if normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for slot in range(top_k):
            for expert in chosen[:, slot].unique().tolist():
                rows = chosen[:, slot] == expert
                h = x[rows] @ fc1[expert].T
                h = torch.nn.functional.silu(h[:, 0::2]) * h[:, 1::2]
                out[rows] += weights[rows, slot, None].to(x.dtype) * (h @ fc2[expert].T)
        return out

    @moe.register_fake
    def _(x, router_logits, fc1, fc2, top_k, normalize):
        return torch.empty_like(x)

    return moe


def _moe_schema():
    """The part of com.microsoft.MoE's schema the export writes (onnx registers no com.microsoft schemas)."""
    from onnx.defs import OpSchema

    param = OpSchema.FormalParameter
    optional = OpSchema.FormalParameterOption.Optional
    attr = OpSchema.AttrType
    return OpSchema(
        "MoE", "com.microsoft", 1,
        inputs=[param("input", "T"), param("router_probs", "T"), param("fc1_experts_weights", "T"),
                param("fc1_experts_bias", "T", param_option=optional), param("fc2_experts_weights", "T")],
        outputs=[param("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float tensors")],
        attributes=[OpSchema.Attribute("k", attr.INT, "experts per token"),
                    OpSchema.Attribute("activation_type", attr.STRING, "swiglu"),
                    OpSchema.Attribute("swiglu_fusion", attr.INT, "1: gate and up rows interleaved"),
                    OpSchema.Attribute("normalize_routing_weights", attr.INT, "renormalize the top-k weights")])


def onnx_translations() -> dict:
    """{torch op: onnxscript function} for torch.onnx.export's custom_translation_table."""
    import onnxscript

    moe_op = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "MoE", _moe_schema())
    op = _moe_op()

    def moe_to_onnx(x, router_logits, fc1, fc2, top_k: int, normalize: bool):
        return moe_op(x, router_logits, fc1, None, fc2, k=top_k, activation_type="swiglu", swiglu_fusion=1,
                        normalize_routing_weights=int(normalize))

    return {op._opoverload: moe_to_onnx}


def _sparse_forward(block, moe: dict, names: tuple[str, str, str]):
    """A forward for one transformers sparse MoE block that calls the custom op on stacked expert weights."""
    import torch

    gate_name, up_name, down_name = names
    experts = block.experts
    fc1 = torch.stack([torch.stack([getattr(e, gate_name).weight, getattr(e, up_name).weight], dim=1).flatten(0, 1)
                       for e in experts]).detach().contiguous()
    fc2 = torch.stack([getattr(e, down_name).weight for e in experts]).detach().contiguous()
    block.register_buffer("moe_fc1", fc1, persistent=False)
    block.register_buffer("moe_fc2", fc2, persistent=False)
    op = _moe_op()
    top_k, normalize, shared = moe["top_k"], moe["normalize"], moe["shared_expert"]

    def forward(hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        router_logits = block.gate(x)
        y = op(x, router_logits, block.moe_fc1, block.moe_fc2, top_k, normalize)
        y = y.reshape(shape)
        if shared:  # on the 3-d states, so that its linears export as MatMuls the quantizers take
            y = y + torch.sigmoid(block.shared_expert_gate(hidden_states)) * block.shared_expert(hidden_states)
        return y, router_logits

    return forward


@contextlib.contextmanager
def sparse_blocks_as_moe_ops(model, family: dict):
    """Within the block, every sparse MLP block of `model` runs through the MoE op; afterwards the model is as it
    was (its forwards restored, the stacked weights dropped)."""
    moe = family.get("moe")
    if not moe:
        yield
        return
    if family.get("activation") != "silu":
        raise OnnxlmError(f"this {family['family']} model's experts use '{family.get('activation')}': ONNX Runtime's "
                          "MoE op (CPU) runs SiLU-gated experts only")
    attribute, *names = moe["module"]
    layers = model.model.layers
    blocks = [getattr(layer, attribute) for layer, sparse in zip(layers, moe["layers"]) if sparse]
    if any(not hasattr(b, "experts") or len(b.experts) != moe["experts"] for b in blocks):
        raise OnnxlmError(f"this {family['family']} model's layers do not hold the {moe['experts']} experts its config "
                          "names")
    for block in blocks:
        block.forward = _sparse_forward(block, moe, tuple(names))
    try:
        yield
    finally:
        for block in blocks:
            del block.forward, block.moe_fc1, block.moe_fc2
