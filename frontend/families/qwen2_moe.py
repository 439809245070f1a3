"""Qwen1.5/2-MoE: Qwen2's attention (q/k/v biases), a sparse MLP of routed experts on every
decoder_sparse_step-th layer, plus a shared expert gated by a sigmoid; top-k weights renormalized only with
norm_topk_prob."""

from onnxlm.frontend.families.base import Family

FAMILY = Family("qwen2_moe", qkv_bias="qkv_bias", moe_experts="num_experts", moe_normalize="norm_topk_prob",
                moe_shared_expert="shared_expert_intermediate_size", moe_layers="sparse_step",
                required=("num_experts", "num_experts_per_tok", "moe_intermediate_size"), genai_type="qwen2")
