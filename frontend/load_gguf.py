"""Load a GGUF file through transformers' GGUF support, and build its tokenizer the way the GGUF declares.

The quantized blocks stay in the file at `Source.path`; transformers gives us the dequantized fp32 model.
"""

from __future__ import annotations

import contextlib
import io
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


def gguf_tokenizer(converted, meta: dict):
    """The tokenizer the GGUF declares, from transformers' conversion of it.

    For a byte-level BPE vocabulary (`tokenizer.ggml.model` = gpt2) the conversion leaves SentencePiece pieces
    behind (byte_fallback, a U+2581 Replace decoder, an empty normalizer) that other runtimes, onnxruntime-genai
    among them, take for a SentencePiece model; we restore the plain byte-level form. It also drops the
    pre-tokenizer rule that llama.cpp's `smollm` (and `starcoder`, `refact`) pre-tokenizers add: every digit is
    split on its own before the GPT-2 byte-level regex.
    """
    import json

    from tokenizers import Tokenizer

    spec = json.loads(converted.to_str())
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if meta.get("tokenizer.ggml.model") == "gpt2":
        spec["normalizer"] = None
        spec["post_processor"] = None  # no BOS is added; the runtime adds it when add_bos_token says so
        spec["decoder"] = byte_level
        spec["model"]["byte_fallback"] = False
        spec["model"]["fuse_unk"] = False
    if meta.get("tokenizer.ggml.pre") in ("smollm", "starcoder", "refact"):
        spec["pre_tokenizer"] = {
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level],
        }
    return Tokenizer.from_str(json.dumps(spec))


def load_gguf(path: Path) -> Source:
    meta = read_gguf_metadata(path)
    arch = check_architecture(meta.get("general.architecture"))

    import torch
    import transformers

    try:
        # transformers draws a tqdm bar of its own while dequantizing; onnxlm shows its own progress.
        with contextlib.redirect_stderr(io.StringIO()):
            model = transformers.AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch.float32
            )
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:
        raise OnnxlmError(f"cannot load GGUF model {path}: {exc}") from None
    model.eval()

    tokenizer = gguf_tokenizer(hf_tokenizer.backend_tokenizer, meta)
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
