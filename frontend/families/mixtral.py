"""Mixtral: Mistral's attention (a sliding window on every layer when config.sliding_window is set), and on every
layer a sparse MLP of num_local_experts SwiGLU experts (w1 gate, w3 up, w2 down), top-k weights renormalized."""

from onnxlm.frontend.families.base import Family

FAMILY = Family("mixtral", qkv_bias="never", windows="all", moe_experts="num_local_experts",
                moe_module=("block_sparse_moe", "w1", "w3", "w2"), required=("num_local_experts",
                                                                             "num_experts_per_tok"),
                genai_type="mistral")
