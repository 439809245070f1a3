"""Load an existing decoder .onnx (Optimum-style I/O: input_ids, attention_mask, position_ids,
past_key_values.{i}.key/value -> logits, present.{i}.key/value) with config.json and tokenizer.json
beside it.

An ONNX file is untrusted input: every external-data location it names is checked to stay inside its own
directory (no absolute path, no `..`, no symbolic link) before any byte of it is hashed or read.
"""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path

from onnxlm.errors import OnnxlmError, first_line
from onnxlm.frontend.source import Source, sha256_of
from onnxlm.model_info import ModelInfo
from onnxlm.schema import read_json, read_tokenizer

_PAST = re.compile(r"past_key_values\.(\d+)\.key")


def _tensors(graph):
    """Every TensorProto of a GraphProto: initializers, sparse initializers and node attributes, subgraphs too."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for g in attr.graphs:
                yield from _tensors(g)


def checked_proto(path: Path):
    """The model's ModelProto without its external data, and the files that data lives in, each checked to be a
    regular file inside path's directory (not a link) and long enough for every offset + length into it."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError, and whatever a truncated file gives
        raise OnnxlmError(f"cannot read ONNX file {path}: {first_line(exc)}") from None
    base = path.parent.resolve()
    needed: dict[Path, int] = {}
    for tensor in _tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {e.key: e.value for e in tensor.external_data}
        location = entries.get("location", "")
        if not isinstance(location, str):  # protobuf hands back bytes for a string that is not valid UTF-8
            raise OnnxlmError(f"{path}: tensor '{tensor.name}' has a malformed external-data location")
        target, relative = path.parent / location, Path(location)
        if (not location or "\x00" in location or relative.is_absolute() or ".." in relative.parts or target.is_symlink()
                or not target.resolve().is_relative_to(base)):
            raise OnnxlmError(f"{path}: tensor '{tensor.name}' keeps its data at {location!r}, outside the "
                              "model's directory (or through a link): refused")
        try:
            end = int(entries.get("offset", 0)) + int(entries.get("length", 0))
        except ValueError:
            raise OnnxlmError(f"{path}: tensor '{tensor.name}' has a malformed external-data offset or length") from None
        needed[target] = max(needed.get(target, 0), end)
    for target, end in needed.items():
        if not target.is_file():
            raise OnnxlmError(f"{path}: its external data file {target.name} is missing or not a regular file")
        if target.stat().st_size < end:
            raise OnnxlmError(f"{path}: its external data file {target.name} is shorter ({target.stat().st_size} "
                              f"bytes) than its tensors need ({end})")
    try:  # structure only, by path so that external data resolves beside the model (checked above)
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        if "No Op registered" not in str(exc):  # an op ORT may still know (contrib ops): its session decides
            raise OnnxlmError(f"{path} is not a valid ONNX model: {first_line(exc)}") from None
    except Exception as exc:  # the checker's C++ side raises other types on malformed fields
        raise OnnxlmError(f"{path} is not a valid ONNX model: {first_line(exc)}") from None
    return proto, sorted(needed)


@contextlib.contextmanager
def warnings_as_errors(logger_name: str):
    """Collect the WARNING records a library logs meanwhile, instead of printing them."""
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append((record.getMessage().strip().splitlines() or [record.levelname])[0])

    logger = logging.getLogger(logger_name)
    handler, propagate = Collect(logging.WARNING), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def load_onnx(path: Path) -> Source:
    import onnx_ir as ir

    proto, data_files = checked_proto(path)  # before anything is hashed or loaded
    inputs = {v.name for v in proto.graph.input}
    outputs = {v.name for v in proto.graph.output}
    layers = sorted(int(m.group(1)) for name in inputs if (m := _PAST.fullmatch(name)))
    if "input_ids" not in inputs or "logits" not in outputs or not layers:
        raise OnnxlmError(
            f"{path} is not a decoder with KV cache: expected inputs input_ids, past_key_values.N.key/value "
            "and output logits"
        )
    tokenizer_path = path.parent / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise OnnxlmError(f"no tokenizer.json next to {path}")
    tokenizer = read_tokenizer(tokenizer_path)
    config_path = path.parent / "config.json"
    if not config_path.is_file():
        raise OnnxlmError(f"no config.json next to {path} (Optimum exports write one)")
    config_json = read_json(config_path, "config", {})
    import transformers

    try:
        config = transformers.AutoConfig.for_model(**config_json)
    except Exception as exc:  # ValueError for an unknown model_type, TypeError/KeyError for odd fields
        raise OnnxlmError(f"cannot read {config_path}: {first_line(exc)}") from None
    info = ModelInfo.from_hf_config(config)

    with warnings_as_errors("onnx_ir") as warned:
        try:
            model = ir.load(path)
        except Exception as exc:
            raise OnnxlmError(f"cannot read ONNX file {path}: {first_line(exc)}") from None
    if warned:  # onnx-ir repairs what it cannot resolve (an input no node makes) and warns: refuse instead
        raise OnnxlmError(f"{path} is not a valid ONNX model: {warned[0]}")
    if info.num_layers != len(layers):
        raise OnnxlmError(f"{path} has KV inputs for {len(layers)} layers but config.json says {info.num_layers}")
    return Source(
        kind="onnx",
        path=path,
        sha256=sha256_of([path, *data_files]),
        info=info,
        tokenizer=tokenizer,
        onnx_model=model,
    )
