"""OLMo 2: post-norms only (after attention and after the MLP, before each residual add), an RMSNorm over all query and
key heads at once."""

from onnxlm.frontend.families.base import Family, POST_ATTENTION, POST_MLP

# onnxruntime-genai 0.18 has no "olmo2" type; as "olmo" it runs the graph as written (same greedy tokens, tested).
FAMILY = Family("olmo2", block_norms=(POST_ATTENTION, POST_MLP), qk_norm="all_heads", genai_type="olmo")
