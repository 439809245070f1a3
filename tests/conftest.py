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


def write_tiny_llama(directory: Path, model_type: str = "llama", layers: int = 2, seed: int = 0,
                     variant: str | None = None, **shape) -> Path:
    """A random checkpoint (vocab 320, hidden 64, GQA 4/2 heads) with a byte-level BPE tokenizer: a llama, or any
    family's tiny `variant` (tests/tiny_families.py; `model_type` "qwen2" is that family's untied variant's
    shape with a tied head); `shape` overrides the config's fields."""
    import torch
    import transformers

    from tiny_families import BASE, tiny_config

    directory.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer(320)
    if variant is None:
        config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[model_type]
        config = config_cls(**{**BASE, **shape}, num_hidden_layers=layers)
    else:
        config = tiny_config(variant, layers, **shape)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(directory)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": CHAT_TEMPLATE, "add_bos_token": False, "eos_token": "<|im_end|>"})
    )
    return directory


def random_blocks(qtype: str, rows: int, cols: int, rng) -> "np.ndarray":
    """A [rows, cols] tensor of ggml `qtype` blocks with random codes and small fp16 scales (offsets): any bytes
    are valid codes, so this makes the formats gguf-py cannot quantize (the K-quants) as easily as the others."""
    import gguf
    import numpy as np

    elements, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    raw = rng.integers(0, 256, (rows * cols // elements, size), dtype=np.uint8)

    def fp16_at(byte: int, values) -> np.ndarray:
        values = np.asarray(values, np.float16).reshape(-1, 1)
        raw[:, byte:byte + 2] = values.view(np.uint8)
        return values.astype(np.float32)

    # scales that give weights of about 0.02, with offsets that centre them near zero (a sane random model)
    uniform = lambda low, high: rng.uniform(low, high, len(raw))  # noqa: E731
    if qtype == "Q6_K":
        fp16_at(208, uniform(2e-5, 6e-5))  # times int8 sub-block scales and codes - 32
    elif qtype in ("Q4_K", "Q5_K"):
        d = fp16_at(0, uniform(1e-4, 3e-4) / (1 if qtype == "Q4_K" else 2))  # times 6-bit scales and the codes
        fp16_at(2, d[:, 0] * (7.5 if qtype == "Q4_K" else 7.75))  # times 6-bit mins, subtracted
    elif qtype in ("Q4_1", "Q5_1"):
        levels = 16 if qtype == "Q4_1" else 32
        d = fp16_at(0, uniform(2e-3, 6e-3) * 16 / levels)
        fp16_at(2, -d[:, 0] * (levels - 1) / 2)
    else:
        fp16_at(0, uniform(2e-4, 6e-4) if qtype == "Q8_0" else
                uniform(2e-3, 6e-3) * (16 if qtype == "Q4_0" else 8) / 16)
    return raw.reshape(rows, -1)


# A K-quant mix like llama.cpp's Q4_K_M (v, down and the embedding in Q6_K), with each other format somewhere: the
# layout write_tiny_gguf(kquants=True) writes (blk.{i}.{part} or the tensor name -> ggml type).
KQUANT_LAYOUT = {"token_embd": "Q6_K", "attn_v": "Q6_K", "ffn_down": "Q6_K",
                 "blk.0.attn_q": "Q4_K", "blk.0.attn_k": "Q4_K", "blk.0.attn_output": "Q4_K",
                 "blk.0.ffn_gate": "Q4_K", "blk.0.ffn_up": "Q4_K",
                 "blk.1.attn_q": "Q5_K", "blk.1.attn_k": "Q5_K", "blk.1.attn_output": "Q5_0",
                 "blk.1.ffn_gate": "Q5_1", "blk.1.ffn_up": "Q4_0"}


def stacked_experts(tensors: dict) -> dict:
    """`...mlp.experts.{e}.{proj}.weight` -> one `...mlp.experts.{proj}.weight` [experts, out, in], as llama.cpp's
    converter stores a mixture of experts (gguf-py names the stacked tensor)."""
    import re

    import numpy as np

    out, groups = {}, {}
    for key, value in tensors.items():
        match = re.fullmatch(r"(.*\.mlp\.experts)\.(\d+)\.(\w+\.weight)", key)
        if match:
            groups.setdefault(f"{match[1]}.{match[3]}", {})[int(match[2])] = value
        else:
            out[key] = value
    for key, experts in groups.items():
        out[key] = np.stack([experts[e] for e in sorted(experts)])
    return out


def write_tiny_gguf(hf: Path, path: Path, quantized: bool = False, kquants: bool = False,
                    arch: str = "llama") -> Path:
    """A tiny checkpoint as a GGUF file the way llama.cpp's converter lays one out (gguf-py's tensor names, the
    header keys transformers' GGUF loader reads, a gpt2 tokenizer with the smollm pre-tokenizer, or for Gemma the
    same pieces as a SentencePiece vocabulary, tied embeddings, Gemma's norms stored as 1 + w, experts stacked):
    F32 tensors, or with `quantized` SmolLM2's layout (Q4_1 linears and experts, a Q8_0 embedding, F32 norms), or
    with `kquants` KQUANT_LAYOUT's random blocks (hidden and intermediate sizes must be multiples of 256). A small
    GGUF source for the loaders, the GGUF-exact pass and the fuzz suite."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    from onnxlm.frontend.load_gguf import MOE_KEYS

    config = json.loads((hf / "config.json").read_text())
    tok = json.loads((hf / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {a["content"] for a in tok["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w = gguf.GGUFWriter(str(path), arch)
    header = {**GGUF_CONFIG_MAPPING[{"qwen3moe": "qwen3_moe"}.get(arch, arch)], **MOE_KEYS}
    for key, field in header.items():
        value = config.get(field) if field else None
        if value is None:
            continue
        if isinstance(value, bool):
            w.add_bool(f"{arch}.{key}", value)
        else:
            (w.add_uint32 if isinstance(value, int) else w.add_float32)(f"{arch}.{key}", value)
    if arch.startswith("gemma"):  # transformers reads Gemma's GGUF tokenizer as SentencePiece's (pieces, scores)
        tokens[:4] = ["<pad>", "<bos>", "<eos>", "<unk>"]  # the special pieces it expects (ids as in the config)
        specials |= set(tokens[:4])
        w.add_tokenizer_model("llama")
        w.add_token_scores([0.0] * len(tokens))
        w.add_unk_token_id(3)
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(config["bos_token_id"])
    w.add_eos_token_id(config["eos_token_id"])
    if config.get("pad_token_id") is not None:
        w.add_pad_token_id(config["pad_token_id"])
    names = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch),
                                     config["num_hidden_layers"])
    for key, value in sorted(stacked_experts(load_file(str(hf / "model.safetensors"))).items()):
        if key == "lm_head.weight" and config.get("tie_word_embeddings", True):
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias")).removesuffix(".weight").removesuffix(".bias")
        value = np.ascontiguousarray(value, np.float32)
        if name.endswith("ffn_gate_inp_shexp"):  # llama.cpp stores the shared expert's gate as a vector
            value = value.reshape(-1)
        if arch.startswith("gemma") and key.endswith("norm.weight"):
            value = value + 1  # llama.cpp stores Gemma's (1 + w) norms as they multiply
        if kquants and value.ndim == 2:  # (experts' 3-d tensors stay float)
            part = name.split(".")[-1] if name.startswith("blk.") else name
            qtype = KQUANT_LAYOUT.get(name, KQUANT_LAYOUT.get(part))
            raw = random_blocks(qtype, *value.shape, np.random.default_rng(len(name) * 7919 + value.size))
            w.add_tensor(f"{name}.weight", raw, raw_dtype=gguf.GGMLQuantizationType[qtype])
            continue
        qtype = None if not quantized or value.ndim < 2 else (
            gguf.GGMLQuantizationType.Q8_0 if name == "token_embd" else gguf.GGMLQuantizationType.Q4_1)
        suffix = ".bias" if key.endswith(".bias") else ".weight"
        if qtype is None:
            w.add_tensor(f"{name}{suffix}", value)
        else:
            w.add_tensor(f"{name}{suffix}", gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="session")
def tiny_gguf(tiny_hf_dir, tmp_path_factory) -> Path:
    return write_tiny_gguf(tiny_hf_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="session")
def tiny_q4_gguf(tiny_hf_dir, tmp_path_factory) -> Path:
    return write_tiny_gguf(tiny_hf_dir, tmp_path_factory.mktemp("gguf-q4") / "tiny-q4_1.gguf", quantized=True)


@pytest.fixture(scope="session")
def tiny_kquant_gguf(tmp_path_factory) -> Path:
    """A 2-layer llama of hidden 256 (K-quants need rows of 256) as KQUANT_LAYOUT's mix of block formats."""
    hf = write_tiny_llama(tmp_path_factory.mktemp("tiny-256") / "hf", hidden_size=256, intermediate_size=512,
                          head_dim=64)
    return write_tiny_gguf(hf, tmp_path_factory.mktemp("gguf-k") / "tiny-k.gguf", kquants=True)


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


def pytest_terminal_summary(terminalreporter):
    """The fuzz suite's case count (tests/test_fuzz.py), so that every run says how much it tried."""
    import sys

    fuzz = sys.modules.get("test_fuzz")
    if fuzz is not None and fuzz.CASES:
        per_target = ", ".join(f"{target} {n}" for target, n in sorted(fuzz.CASES.items()))
        terminalreporter.write_line(f"fuzz: {sum(fuzz.CASES.values())} cases tried ({per_target})")


ARCH_COLUMNS = ("fp32 parity", "greedy 32", "fused ops", "left unfused", "int4-rtn", "remove 1 + h2o", "speculative",
                "genai", "GGUF")


def pytest_sessionfinish(session):
    """With ONNXLM_ARCH_TABLE=PATH, write the family table (docs/architectures.md) from test_families' results (and
    test_gguf_families', when it ran in the same session: the GGUF column)."""
    import sys

    families = sys.modules.get("test_families")
    target = os.environ.get("ONNXLM_ARCH_TABLE")
    if not target or families is None or not families.RESULTS:
        return
    from tiny_families import VARIANTS

    rows = ["| variant | model_type | " + " | ".join(ARCH_COLUMNS) + " |", "|" + "---|" * (len(ARCH_COLUMNS) + 2)]
    for variant, cells in families.RESULTS.items():
        row = [variant, VARIANTS[variant][0],
               *(cells.get(c, "-" if c == "GGUF" else "not run").replace("|", "/") for c in ARCH_COLUMNS)]
        rows.append("| " + " | ".join(row) + " |")
    text = Path(target).read_text() if Path(target).exists() else ""
    head = text.split("<!-- table -->")[0] if "<!-- table -->" in text else text
    Path(target).write_text(head.rstrip("\n") + "\n\n<!-- table -->\n" + "\n".join(rows) + "\n")


@pytest.fixture(scope="session")
def family_builds(tmp_path_factory):
    """(variant, recipe) -> artifact, each built once; variant -> its checkpoint and its transformers model."""
    import transformers

    import onnxlm

    checkpoints, models, artifacts = {}, {}, {}

    def checkpoint(variant):
        if variant not in checkpoints:
            checkpoints[variant] = write_tiny_llama(tmp_path_factory.mktemp(variant) / "hf", variant=variant)
        return checkpoints[variant]

    def model(variant):
        if variant not in models:
            models[variant] = transformers.AutoModelForCausalLM.from_pretrained(
                checkpoint(variant), attn_implementation="eager").eval()
        return models[variant]

    def artifact(variant, recipe, **options):
        key = (variant, recipe, json.dumps(options, sort_keys=True))
        if key not in artifacts:
            out = tmp_path_factory.mktemp(f"{variant}-{recipe}") / "art"
            artifacts[key] = onnxlm.optimize(str(checkpoint(variant)), recipe=recipe, output=out, **options)
        return artifacts[key]

    return checkpoint, model, artifact
