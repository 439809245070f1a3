"""OLMo 2: post-norms only (after attention and after the MLP, before each residual add), an RMSNorm over all query and key heads at once."""

from onnxlm.frontend.families.base import Family, POST_ATTENTION, POST_MLP

FAMILY = Family("olmo2", block_norms=(POST_ATTENTION, POST_MLP), qk_norm="all_heads")
