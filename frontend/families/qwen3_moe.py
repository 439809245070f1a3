"""Qwen3-MoE: Qwen3's attention (an RMSNorm on each query and key head), a sparse MLP of routed experts on every
decoder_sparse_step-th layer; top-k weights renormalized with norm_topk_prob."""

from onnxlm.frontend.families.base import Family

FAMILY = Family("qwen3_moe", qk_norm="head", moe_experts="num_experts", moe_normalize="norm_topk_prob",
                moe_layers="sparse_step", required=("num_experts", "num_experts_per_tok", "moe_intermediate_size"),
                gguf="qwen3moe", genai_type="qwen3")
