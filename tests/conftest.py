"""Shared fixtures: a tiny random llama (seconds) and the real SmolLM2-135M (exported once per session)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GPL3 = Path("/usr/share/common-licenses/GPL-3")

# A small corpus for the tiny model's tokenizer: a few sentences with digits, punctuation and non-ASCII text.
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "In 2007, version 3 of the license was published; 29 June 2007 is its date.",
    "Language models predict the next token from the tokens before it.",
    "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e co\u00fbte 12,50 \u20ac \u2014 \u3053\u3093\u306b\u3061\u306f \U0001f30a",
    "def f(x):\n    return x * 2 + 1\n",
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def write_tiny_llama(directory: Path, model_type: str = "llama", layers: int = 2, seed: int = 0) -> Path:
    """A random llama-style checkpoint (vocab 320, hidden 64, GQA 4/2 heads) with a byte-level BPE tokenizer."""
    import torch
    import transformers

    directory.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer(320)
    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[model_type]
    config = config_cls(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(directory)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": CHAT_TEMPLATE, "add_bos_token": False, "eos_token": "<|im_end|>"})
    )
    return directory


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "hf")


@pytest.fixture(scope="session")
def tiny_torch(tiny_hf_dir):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_dir).eval()


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_hf_dir, tmp_path_factory):
    """recipe name -> artifact of the tiny model, built on first use."""
    import onnxlm

    cache = {}

    def get(recipe: str):
        if recipe not in cache:
            out = tmp_path_factory.mktemp("art") / recipe
            cache[recipe] = onnxlm.optimize(str(tiny_hf_dir), recipe=recipe, output=out)
        return cache[recipe]

    return get


@pytest.fixture(scope="session")
def tiny_artifact(tiny_artifacts):
    return tiny_artifacts("fp32")


@pytest.fixture(scope="session", params=["fp32-plain", "fp32"])
def tiny_any_artifact(request, tiny_artifacts):
    """The tiny model's plain export and its lowered (GQA) graph: the runtime must treat both alike."""
    return tiny_artifacts(request.param)


@pytest.fixture(scope="session")
def smollm2_artifact(tmp_path_factory):
    import onnxlm

    return onnxlm.optimize("smollm2-135m", recipe="fp32", output=tmp_path_factory.mktemp("smol") / "fp32")


@pytest.fixture(scope="session")
def smollm2_torch():
    from onnxlm.frontend import load_source

    return load_source("smollm2-135m")
