"""The decoding a user gets without asking for one: the model's own recommendation, as plain data.

Recorded in the artifact (manifest "generation", genai_config "search"), read back by the runtime's default
`Decoding` (runtime/decoding.py). Where a source says nothing, onnxlm samples as llama.cpp does by default.
Always seeded, so that the same prompt gives the same text until the user passes another --seed.
"""

from __future__ import annotations

SEED = 0
# llama.cpp's sampling defaults (common/common.h: temp 0.8, top_k 40, top_p 0.95, min_p 0.05).
LLAMA_CPP = {"mode": "sample", "temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "seed": SEED,
             "origin": "llama.cpp's defaults (the source recommends none)"}
# The embedded model: SmolLM2-135M-Instruct's model card generates with temperature 0.2, top_p 0.9.
SMOLLM2_CARD = {"mode": "sample", "temperature": 0.2, "top_p": 0.9, "seed": SEED,
                "origin": "SmolLM2-135M-Instruct's model card"}
GREEDY = {"mode": "greedy", "origin": "generation_config.json (do_sample is false)"}

_HF_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
# GGUF's optional sampling keys (llama.cpp's LLM_KV_GENERAL_SAMPLING_*) -> ours.
_GGUF_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_k": "top_k",
              "general.sampling.top_p": "top_p", "general.sampling.min_p": "min_p",
              "general.sampling.penalty_repeat": "repetition_penalty"}


def _numbers(pairs) -> dict:
    return {k: v for k, v in pairs if isinstance(v, (int, float)) and not isinstance(v, bool)}


def from_hf_generation_config(config: dict | None) -> dict:
    """An HF checkpoint's generation_config.json: sampling with its settings when do_sample says so, else greedy
    (transformers' own reading of the same file)."""
    if not isinstance(config, dict) or not config.get("do_sample"):
        return dict(GREEDY)
    found = _numbers((k, config.get(k)) for k in _HF_KEYS)
    return {"mode": "sample", **found, "seed": SEED, "origin": "generation_config.json"}


def from_gguf_metadata(meta: dict) -> dict:
    found = _numbers((ours, meta.get(key)) for key, ours in _GGUF_KEYS.items())
    if not found:
        return dict(LLAMA_CPP)
    return {"mode": "sample", **found, "seed": SEED, "origin": "the GGUF's general.sampling keys"}
