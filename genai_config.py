"""genai_config.json: the file that lets onnxruntime-genai run an artifact with no onnxlm installed.

Field names follow onnxruntime-genai's config (model.decoder inputs/outputs, search options). The KV buffer is
shared between past and present exactly when the graph can share it (model_info.shares_kv_buffer).

genai feeds a decoder's own inputs and nothing else. Inputs that passes added (the artifact's interface) are fine
when each is optional (an initializer holds its default, which ORT uses when genai leaves the input out); an
artifact with a required added input is not deployable there, and gets no genai_config.json.
"""

from __future__ import annotations

from onnxlm.interface import DECODE_SHAPES, Interface
from onnxlm.model_info import ModelInfo, shares_kv_buffer


def genai_support(interface: Interface) -> dict:
    """{"deployable": True}, or False with the reason: the added inputs genai would have to feed."""
    required = interface.required_inputs()
    if not required:
        return {"deployable": True}
    names = ", ".join(p.name for p in required)
    return {"deployable": False, "reason": f"onnxruntime-genai cannot feed the required input(s) {names}"}


def genai_providers(target: dict, interface: Interface, op_histogram: dict[str, int], info: ModelInfo) -> list:
    """genai's decoder `provider_options` for the artifact's target EP: none for the CPU; for cuda, `enable_cuda_graph`
    when decode steps can be captured (the decode_shapes lowering and a shared KV buffer; genai then binds an
    attention mask as wide as its buffer, whose width the graph reads as total_sequence_length). The KV cache and
    logits types genai reads from the graph (float16 after convert_float16)."""
    if target.get("ep") != "cuda":
        return []
    graphs = interface.has(DECODE_SHAPES) and shares_kv_buffer(op_histogram, info.num_layers)
    return [{"cuda": {"enable_cuda_graph": "1" if graphs else "0"}}]


def genai_config(info: ModelInfo, op_histogram: dict[str, int], model_file: str = "model.onnx",
                 generation: dict | None = None, provider_options: list | None = None) -> dict:
    """The config; `generation` (frontend/generation_defaults.py) sets genai's default search the way onnxlm's
    own default decoding is set: sampling with the model's recommended settings, or greedy. `provider_options`:
    genai_providers' (default: none, the CPU)."""
    eos = info.eos_token_ids
    sample = (generation or {}).get("mode") == "sample"
    sampling = {k: generation[k] for k in ("top_k", "top_p", "temperature", "repetition_penalty")
                if sample and k in generation}
    config = {
        "model": {
            "type": info.family.get("genai_type", info.architecture),
            "bos_token_id": info.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": eos[0] if eos else 0,
            "context_length": info.context_length,
            "vocab_size": info.vocab_size,
            "decoder": {
                "filename": model_file,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": provider_options or []},
                "head_size": info.head_dim,
                "hidden_size": info.hidden_size,
                "num_attention_heads": info.num_heads,
                "num_key_value_heads": info.num_kv_heads,
                "num_hidden_layers": info.num_layers,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "do_sample": False,
            "num_beams": 1,
            "num_return_sequences": 1,
            "min_length": 0,
            "max_length": info.context_length,
            "past_present_share_buffer": shares_kv_buffer(op_histogram, info.num_layers),
            "top_k": 1,
            "top_p": 1.0,
            "temperature": 1.0,
            "repetition_penalty": 1.0,
            "length_penalty": 1.0,
            "early_stopping": True,
            "no_repeat_ngram_size": 0,
        },
    }
    if sample:  # genai has no min_p; its top_k 0 means all tokens
        config["search"].update({"do_sample": True, "top_k": 0, **sampling})
        if "seed" in generation:
            config["search"]["random_seed"] = generation["seed"]
    return config
