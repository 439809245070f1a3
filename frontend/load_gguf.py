"""Load a GGUF file through transformers' GGUF support, and build its tokenizer the way the GGUF declares.

The quantized blocks stay in the file at `Source.path`; transformers gives us the dequantized fp32 model.
"""

from __future__ import annotations

from pathlib import Path

from onnxlm.errors import OnnxlmError
from onnxlm.frontend.source import Source, sha256_of
from onnxlm.model_info import ModelInfo, check_architecture


def read_gguf_metadata(path: Path) -> dict:
    """The GGUF key/value header as plain Python values (arrays of tokens are skipped: they are large)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError, struct errors, mmap errors... on a bad file
        raise OnnxlmError(f"cannot read GGUF file {path}: {exc}") from None
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.endswith(("tokens", "merges", "token_type", "scores")):
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # an unusual field type; nothing we need
            continue
    return meta


def fix_pretokenizer(tokenizer, gguf_pre: str | None):
    """Restore the pre-tokenizer rule the GGUF names but transformers' conversion drops.

    llama.cpp's `smollm` (and `starcoder`, `refact`) pre-tokenizers split every digit on its own before the
    GPT-2 byte-level regex; transformers' GGUF conversion keeps only the byte-level step.
    """
    from tokenizers import pre_tokenizers

    if gguf_pre in ("smollm", "starcoder", "refact"):
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )
    return tokenizer


def load_gguf(path: Path) -> Source:
    meta = read_gguf_metadata(path)
    arch = check_architecture(meta.get("general.architecture"))

    import torch
    import transformers

    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:
        raise OnnxlmError(f"cannot load GGUF model {path}: {exc}") from None
    model.eval()

    tokenizer = fix_pretokenizer(hf_tokenizer.backend_tokenizer, meta.get("tokenizer.ggml.pre"))
    eos = meta.get("tokenizer.ggml.eos_token_id")
    info = ModelInfo.from_hf_config(model.config, [int(eos)] if eos is not None else None)
    assert info.architecture == arch
    info.add_bos_token = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    return Source(
        kind="gguf",
        path=path,
        sha256=sha256_of([path]),
        info=info,
        tokenizer=tokenizer,
        chat_template=meta.get("tokenizer.chat_template"),
        torch_model=model,
    )
