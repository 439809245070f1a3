"""Load a Hugging Face checkpoint directory (config.json, weights, tokenizer.json) as an fp32 torch model."""

from __future__ import annotations

import json
from pathlib import Path

from onnxlm.errors import OnnxlmError
from onnxlm.frontend.source import Source, sha256_of
from onnxlm.model_info import ModelInfo, check_architecture


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise OnnxlmError(f"cannot read {path}: {exc}") from None


def load_hf(directory: Path) -> Source:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise OnnxlmError(f"{directory} is not an HF checkpoint: it has no config.json")
    config_json = _read_json(config_path)
    arch = config_json.get("model_type")
    # Check the architecture before the (slow) weight load, so bad input fails fast.
    check_architecture(arch)
    tokenizer_path = directory / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise OnnxlmError(f"{directory} has no tokenizer.json (a fast tokenizer is required)")

    import torch
    import transformers
    from tokenizers import Tokenizer

    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for a broken checkpoint
        raise OnnxlmError(f"cannot load the checkpoint in {directory}: {exc}") from None
    model.eval()

    eos = None
    generation_config = directory / "generation_config.json"
    if generation_config.is_file():
        eos = _read_json(generation_config).get("eos_token_id")
        eos = [eos] if isinstance(eos, int) else eos
    info = ModelInfo.from_hf_config(model.config, eos)

    chat_template = None
    tokenizer_config = directory / "tokenizer_config.json"
    if tokenizer_config.is_file():
        tc = _read_json(tokenizer_config)
        chat_template = tc.get("chat_template")
        info.add_bos_token = bool(tc.get("add_bos_token", False))
    if (directory / "chat_template.jinja").is_file():
        chat_template = (directory / "chat_template.jinja").read_text()

    weights = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
    return Source(
        kind="hf",
        path=directory,
        sha256=sha256_of([config_path, *weights]),
        info=info,
        tokenizer=Tokenizer.from_file(str(tokenizer_path)),
        chat_template=chat_template,
        torch_model=model,
    )

