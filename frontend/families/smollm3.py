"""SmolLM3: llama's block without RoPE on every no_rope_layer_interval-th layer (NoPE), sliding windows with
use_sliding_window."""

from onnxlm.frontend.families.base import Family

FAMILY = Family("smollm3", rope_layers="no_rope_layers", windows="layer_types_gated")
