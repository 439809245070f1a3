"""The decoder families onnxlm exports: one module each, holding its `Family` (plain data, base.py).

    family = family_for(config.model_type)   # one-line OnnxlmError naming the supported families otherwise
    ModelInfo.family = describe(family, config)
"""

from __future__ import annotations

from onnxlm.errors import OnnxlmError
from onnxlm.frontend.families import (gemma, gemma2, gemma3_text, granite, llama, mistral, mixtral, olmo2, phi3,
                                      qwen2, qwen2_moe, qwen3, qwen3_moe, smollm3)
from onnxlm.frontend.families.base import (Family, attention_implementation, config_fields_missing, describe,
                                           layer_windows, rope_type)

FAMILIES: dict[str, Family] = {m.FAMILY.name: m.FAMILY for m in (
    llama, mistral, qwen2, qwen3, phi3, granite, olmo2, smollm3, gemma, gemma2, gemma3_text, qwen2_moe, qwen3_moe,
    mixtral)}

__all__ = ["FAMILIES", "Family", "attention_implementation", "check_config", "describe", "family_for", "layer_windows"]


def family_for(model_type: str | None, gguf: bool = False) -> Family:
    """The family of an HF model_type (or a GGUF's general.architecture with `gguf`)."""
    known = {f.gguf: f for f in FAMILIES.values() if f.gguf} if gguf else FAMILIES
    if model_type not in known:
        what = "from GGUF files " if gguf else ""
        raise OnnxlmError(f"unsupported architecture '{model_type}': onnxlm exports {what}{', '.join(known)}")
    return known[model_type]


def check_config(config_json: dict, where: str = "config.json") -> Family:
    """The family of a checkpoint's config.json, checked for the fields the family needs (before any weight)."""
    family = family_for(config_json.get("model_type"))
    missing = config_fields_missing(family, config_json)
    if missing:
        raise OnnxlmError(f"{where} of this {family.name} checkpoint lacks {', '.join(repr(m) for m in missing)}, "
                          "which the family needs")
    rope_type(family, config_json.get("rope_scaling"))
    return family
