"""Tiny random checkpoints of every family onnxlm exports (2 layers, hidden 64, GQA 4/2 heads of 16), built from
transformers configs: the variants the family tests run, each with the feature that makes its family differ
switched on where a tiny model can show it (a sliding window shorter than the 16-token test prompt, soft-caps
that bite, multipliers away from 1)."""

from __future__ import annotations

# The shape every tiny model shares (conftest.write_tiny_llama's, so that the llama variant is that model).
BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)

# variant -> (model_type, config fields beyond BASE)
VARIANTS = {
    "llama": ("llama", {}),
    "llama3-rope": ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    "llama-yarn-rope": ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                   "original_max_position_embeddings": 256}}),
    "mistral-window": ("mistral", {"sliding_window": 8, "tie_word_embeddings": False}),
    "qwen2-untied": ("qwen2", {"tie_word_embeddings": False}),
    "qwen3": ("qwen3", {}),
    "phi3": ("phi3", {"pad_token_id": 0, "tie_word_embeddings": False}),
    "phi3-partial": ("phi3", {"pad_token_id": 0, "tie_word_embeddings": False, "partial_rotary_factor": 0.5,
                              "head_dim": 32}),  # RoPE on 16 of 32 dims: GQA's cos cache needs a multiple of 8
    "gemma": ("gemma", {"pad_token_id": 0}),
    "gemma2-softcap": ("gemma2", {"pad_token_id": 0, "attn_logit_softcapping": 2.0, "final_logit_softcapping": 1.5,
                                  "query_pre_attn_scalar": 24, "sliding_window": 8, "initializer_range": 0.1}),
    "gemma3-text": ("gemma3_text", {"pad_token_id": 0, "query_pre_attn_scalar": 24, "sliding_window": 8,
                                    "layer_types": ["sliding_attention", "full_attention"],
                                    "rope_local_base_freq": 10000.0, "rope_theta": 1000000.0}),
    "granite": ("granite", {"embedding_multiplier": 12.0, "attention_multiplier": 0.1, "residual_multiplier": 0.22,
                            "logits_scaling": 8.0}),
    "olmo2": ("olmo2", {"pad_token_id": 0, "tie_word_embeddings": False}),
    "smollm3": ("smollm3", {"pad_token_id": 0, "no_rope_layer_interval": 2}),
    # Mixtures of experts: 8 experts, 2 per token, so that a 16-token prompt routes tokens apart; the routers are
    # initialized wide (initializer_range) so that their choices are not near-ties that rounding could flip.
    "qwen2-moe": ("qwen2_moe", {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                "shared_expert_intermediate_size": 96, "decoder_sparse_step": 1,
                                "tie_word_embeddings": False}),
    "qwen3-moe-normed": ("qwen3_moe", {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                       "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [0]}),
    "mixtral": ("mixtral", {"num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": 8,
                            "tie_word_embeddings": False}),
}


def tiny_config(variant: str, layers: int = 2, **shape):
    import transformers

    model_type, fields = VARIANTS[variant]
    return transformers.AutoConfig.for_model(model_type, **{**BASE, "num_hidden_layers": layers, **fields, **shape})
