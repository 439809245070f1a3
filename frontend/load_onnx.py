"""Load an existing decoder .onnx (Optimum-style I/O: input_ids, attention_mask, position_ids,
past_key_values.{i}.key/value -> logits, present.{i}.key/value) with config.json and tokenizer.json
beside it."""

from __future__ import annotations

import json
import re
from pathlib import Path

from onnxlm.errors import OnnxlmError
from onnxlm.frontend.source import Source, sha256_of
from onnxlm.model_info import ModelInfo

_PAST = re.compile(r"past_key_values\.(\d+)\.key")


def load_onnx(path: Path) -> Source:
    import onnx_ir as ir
    from tokenizers import Tokenizer

    try:
        model = ir.load(path)
    except Exception as exc:
        raise OnnxlmError(f"cannot read ONNX file {path}: {exc}") from None
    inputs = {v.name: v for v in model.graph.inputs}
    outputs = {v.name for v in model.graph.outputs}
    layers = sorted(int(m.group(1)) for name in inputs if (m := _PAST.fullmatch(name)))
    if "input_ids" not in inputs or "logits" not in outputs or not layers:
        raise OnnxlmError(
            f"{path} is not a decoder with KV cache: expected inputs input_ids, past_key_values.N.key/value "
            "and output logits"
        )
    tokenizer_path = path.parent / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise OnnxlmError(f"no tokenizer.json next to {path}")

    config_path = path.parent / "config.json"
    if not config_path.is_file():
        raise OnnxlmError(f"no config.json next to {path} (Optimum exports write one)")
    import transformers

    try:
        config = transformers.AutoConfig.for_model(**json.loads(config_path.read_text()))
    except (ValueError, KeyError) as exc:
        raise OnnxlmError(f"cannot read {config_path}: {exc}") from None
    info = ModelInfo.from_hf_config(config)
    if info.num_layers != len(layers):
        raise OnnxlmError(f"{path} has KV inputs for {len(layers)} layers but config.json says {info.num_layers}")
    data_files = [p for p in path.parent.glob(path.name + "*") if p != path]
    return Source(
        kind="onnx",
        path=path,
        sha256=sha256_of([path, *sorted(data_files)]),
        info=info,
        tokenizer=Tokenizer.from_file(str(tokenizer_path)),
        onnx_model=model,
    )

