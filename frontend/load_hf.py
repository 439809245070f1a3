"""Load a Hugging Face checkpoint directory (config.json, safetensors weights, tokenizer.json) as an fp32 torch
model. Every small file is read and checked before the (slow) weight load, so bad input fails fast."""

from __future__ import annotations

from pathlib import Path

from onnxlm.errors import OnnxlmError, first_line
from onnxlm.frontend.generation_defaults import from_hf_generation_config
from onnxlm.frontend.source import Source, sha256_of
from onnxlm.frontend.families import attention_implementation, check_config
from onnxlm.model_info import ModelInfo
from onnxlm.schema import TOKENIZER_CONFIG, Opt, read_json, read_text, read_tokenizer

# Weights in Python's pickle format: loading one can run any code its author put in it.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def checked_weights(directory: Path) -> list[Path]:
    """The checkpoint's safetensors files; pickle weights are refused, since loading them can run code."""
    weights = sorted(directory.glob("*.safetensors"))
    if weights:
        return weights
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise OnnxlmError(f"{directory} has only pickle weights ({', '.join(pickles)}): onnxlm refuses them, since "
                          "loading a pickle can run arbitrary code; convert the checkpoint to safetensors")
    raise OnnxlmError(f"{directory} has no weights: expected *.safetensors files")


def load_hf(directory: Path) -> Source:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise OnnxlmError(f"{directory} is not an HF checkpoint: it has no config.json")
    config_json = read_json(config_path, "config", {"model_type": Opt(str)})
    family = check_config(config_json, f"{config_path}")
    tokenizer_path = directory / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise OnnxlmError(f"{directory} has no tokenizer.json (a fast tokenizer is required)")
    tokenizer = read_tokenizer(tokenizer_path)
    weights = checked_weights(directory)
    generation_path = directory / "generation_config.json"
    generation = read_json(generation_path, "generation config", {}) if generation_path.is_file() else {}
    eos = generation.get("eos_token_id")
    eos = [eos] if isinstance(eos, int) else eos if isinstance(eos, list) and all(
        isinstance(e, int) for e in eos) else None
    tc_path = directory / "tokenizer_config.json"
    tc = read_json(tc_path, "tokenizer config", TOKENIZER_CONFIG) if tc_path.is_file() else {}
    chat_template = tc.get("chat_template") if isinstance(tc.get("chat_template"), str) else None
    template_path = directory / "chat_template.jinja"
    if template_path.is_file():
        chat_template = read_text(template_path, "chat template")

    import torch
    import transformers

    try:
        attention = attention_implementation(family, transformers.AutoConfig.from_pretrained(directory))
        model = transformers.AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch.float32, use_safetensors=True,
            **({"attn_implementation": attention} if attention else {}))
    except Exception as exc:  # transformers raises many types for a broken checkpoint
        raise OnnxlmError(f"cannot load the checkpoint in {directory}: {first_line(exc)}") from None
    model.eval()
    info = ModelInfo.from_hf_config(model.config, eos)
    info.add_bos_token = bool(tc.get("add_bos_token", False))
    return Source(
        kind="hf",
        path=directory,
        sha256=sha256_of([config_path, *weights]),
        info=info,
        tokenizer=tokenizer,
        chat_template=chat_template,
        torch_model=model,
        generation=from_hf_generation_config(generation),
    )
