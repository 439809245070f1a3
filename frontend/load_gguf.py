"""Load a GGUF file through transformers' GGUF support, and build its tokenizer the way the GGUF declares.

The quantized blocks stay in the file at `Source.path`; transformers gives us the dequantized fp32 model.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from onnxlm.errors import OnnxlmError, first_line
from onnxlm.frontend.generation_defaults import from_gguf_metadata
from onnxlm.frontend.source import Source, sha256_of
from onnxlm.frontend.families import family_for
from onnxlm.model_info import ModelInfo


# Far above any real GGUF (a few dozen keys, a few thousand tensors of at most 4 dims); a count past these is a
# corrupt header, refused before the reader walks millions of bogus entries.
MAX_KEYS, MAX_TENSORS = 1 << 16, 1 << 20


def check_gguf_header(path: Path) -> None:
    """The fixed header: magic, a known version, and key/tensor counts that a file of this size can hold."""
    import struct

    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:4] != b"GGUF":
        raise OnnxlmError(f"cannot read GGUF file {path}: no GGUF header")
    version, tensors, keys = struct.unpack("<IQQ", head[4:])
    if version not in (2, 3):
        raise OnnxlmError(f"cannot read GGUF file {path}: version {version} (onnxlm reads versions 2 and 3)")
    if keys > MAX_KEYS or tensors > MAX_TENSORS:
        raise OnnxlmError(f"cannot read GGUF file {path}: its header claims {keys} keys and {tensors} tensors")


def open_gguf(path: Path):
    """A gguf.GGUFReader over a checked file: the header first, then every tensor's data inside the file."""
    import gguf

    check_gguf_header(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError, struct errors, mmap errors... on a bad file
        raise OnnxlmError(f"cannot read GGUF file {path}: {first_line(exc)}") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + int(t.n_bytes) > size or int(t.data.nbytes) != int(t.n_bytes) or len(t.shape) > 4:
            raise OnnxlmError(f"cannot read GGUF file {path}: tensor {t.name} lies outside the file or is malformed")
    return reader


def read_gguf_metadata(path: Path) -> dict:
    """The GGUF key/value header as plain Python values (arrays of tokens are skipped: they are large)."""
    reader = open_gguf(path)
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.endswith(("tokens", "merges", "token_type", "scores")):
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # an unusual field type; nothing we need
            continue
    meta["onnxlm.tensor_elements"] = sum(int(t.n_elements) for t in reader.tensors)
    return meta


def check_model_size(path: Path, meta: dict, arch: str) -> None:
    """The metadata's dimensions must describe the tensors the file holds: a header that claims a far larger
    model than the file stores would make the loader allocate it (a corrupt or hostile file)."""
    dims = {k: meta.get(f"{arch}.{k}") for k in ("embedding_length", "block_count", "feed_forward_length")}
    if not all(isinstance(v, int) and v > 0 for v in dims.values()):
        raise OnnxlmError(f"GGUF file {path} lacks valid {arch}.embedding_length / block_count / feed_forward_length")
    hidden, layers, ffn = dims["embedding_length"], dims["block_count"], dims["feed_forward_length"]
    implied = layers * (2 * hidden * hidden + 3 * hidden * ffn)  # at least the o, q and MLP weights of GQA
    if implied > 2 * meta["onnxlm.tensor_elements"] + (1 << 20):
        raise OnnxlmError(f"GGUF file {path}: its header describes a model of {implied:,} weights, but the file "
                          f"holds {meta['onnxlm.tensor_elements']:,}")


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


# Header keys transformers' GGUF loader (4.57) does not read for the mixture-of-experts architectures, and the config
# fields they set; without them it builds the model with its config class's default expert sizes.
MOE_KEYS = {"expert_feed_forward_length": "moe_intermediate_size",
            "expert_shared_feed_forward_length": "shared_expert_intermediate_size",
            "expert_weights_norm": "norm_topk_prob"}


def config_from_gguf(path: Path, meta: dict):
    """transformers' config for the file, with the expert keys it leaves out read from the header; None (the
    loader's own config) when the header has none of them, which spares a second parse of the file (4.5 s for
    SmolLM2's)."""
    import transformers

    arch = meta["general.architecture"]
    found = {field: meta[f"{arch}.{key}"] for key, field in MOE_KEYS.items() if f"{arch}.{key}" in meta}
    if not found:
        return None
    config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    for field, value in found.items():
        if hasattr(config, field):
            setattr(config, field, type(getattr(config, field))(value))
    return config


def load_gguf(path: Path) -> Source:
    meta = read_gguf_metadata(path)
    family_for(meta.get("general.architecture"), gguf=True)
    check_model_size(path, meta, meta["general.architecture"])

    import torch
    import transformers

    try:
        # transformers draws a tqdm bar of its own while dequantizing; onnxlm shows its own progress.
        with contextlib.redirect_stderr(io.StringIO()):
            model = transformers.AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch.float32, config=config_from_gguf(path, meta)
            )
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:
        raise OnnxlmError(f"cannot load GGUF model {path}: {first_line(exc)}") from None
    model.eval()

    tokenizer = gguf_tokenizer(hf_tokenizer.backend_tokenizer, meta)
    eos = meta.get("tokenizer.ggml.eos_token_id")
    info = ModelInfo.from_hf_config(model.config, [int(eos)] if eos is not None else None)
    info.add_bos_token = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    return Source(
        kind="gguf",
        path=path,
        sha256=sha256_of([path]),
        info=info,
        tokenizer=tokenizer,
        chat_template=meta.get("tokenizer.chat_template"),
        torch_model=model,
        generation=from_gguf_metadata(meta),
    )
