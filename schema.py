"""The checked input layer: every JSON file onnxlm reads (manifests, recipes, configs, tokenizer configs) goes
through `read_json` and is checked against a small schema before anything uses it, so a malformed file is one
`OnnxlmError` naming the file and the field, never an AttributeError three modules later.

A schema is plain data:
- a type (`str`, `int`, `float`, `bool`, `dict`, `list`), or a tuple of them (any of);
- `{"key": schema, ...}`: an object with these keys (`Opt(schema)`: the key may be missing);
- `[schema]`: a list whose items all match;
- `MapOf(schema)`: an object with any string keys whose values all match;
- `Positive` / `NonNegative`: an int in that range.

Imports nothing heavy: the runtime reads manifests through it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from pathlib import Path
from typing import Any

from onnxlm.errors import OnnxlmError, first_line

# A JSON file onnxlm reads is small (the largest, a tokenizer.json, is a few MB); anything far larger is refused
# before it is read, as is nesting deeper than any real file has (json's recursion would otherwise raise).
MAX_JSON_BYTES = 256 << 20


@dataclasses.dataclass(frozen=True)
class Opt:
    schema: Any


@dataclasses.dataclass(frozen=True)
class MapOf:
    schema: Any


class Positive:
    """An int >= 1."""


class NonNegative:
    """An int >= 0."""


def check_regular_file(path: Path, what: str) -> Path:
    """`path` exists and is a regular file (or a link to one): a FIFO or a device would block a read forever."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise OnnxlmError(f"cannot read {what} {path}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise OnnxlmError(f"{what} {path} is not a regular file")
    return path


def read_text(path: Path, what: str = "text file") -> str:
    """A UTF-8 text file, with one clear error for a missing, unreadable, non-regular or non-UTF-8 file."""
    path = Path(path)
    check_regular_file(path, what)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise OnnxlmError(f"cannot read {what} {path}: {exc}") from None


def read_json(path: Path, what: str, schema: Any = None) -> Any:
    """Parse the JSON file at `path` (`what` names it in errors) and check it against `schema` if given."""
    path = Path(path)
    check_regular_file(path, what)
    if path.stat().st_size > MAX_JSON_BYTES:
        raise OnnxlmError(f"{what} {path} is too large to be one ({path.stat().st_size} bytes)")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise OnnxlmError(f"{what} {path} is not valid JSON: {exc}") from None
    except RecursionError:
        raise OnnxlmError(f"{what} {path} is nested too deeply to be one") from None
    if schema is not None:
        check(data, schema, f"{what} {path}")
    return data


def check(value: Any, schema: Any, where: str, path: str = "") -> None:
    """Raise OnnxlmError unless `value` matches `schema`; the message names `where` and the field's path."""
    at = f"{where}: {path or 'the top level'}"
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            raise OnnxlmError(f"{at} must be a JSON object, got {_kind(value)}")
        for key, sub in schema.items():
            optional = isinstance(sub, Opt)
            if key not in value:
                if optional:
                    continue
                raise OnnxlmError(f"{at} lacks the key '{key}'")
            check(value[key], sub.schema if optional else sub, where, f"{path}.{key}" if path else key)
    elif isinstance(schema, list):
        if not isinstance(value, list):
            raise OnnxlmError(f"{at} must be a JSON list, got {_kind(value)}")
        for i, item in enumerate(value):
            check(item, schema[0], where, f"{path}[{i}]")
    elif isinstance(schema, MapOf):
        if not isinstance(value, dict):
            raise OnnxlmError(f"{at} must be a JSON object, got {_kind(value)}")
        for key, item in value.items():
            check(item, schema.schema, where, f"{path}.{key}" if path else key)
    elif schema in (Positive, NonNegative):
        low = 1 if schema is Positive else 0
        if not _is_int(value) or value < low:
            raise OnnxlmError(f"{at} must be an integer >= {low}, got {value!r}")
    else:
        types = schema if isinstance(schema, tuple) else (schema,)
        if not any(_matches(value, t) for t in types):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise OnnxlmError(f"{at} must be {names}, got {_kind(value)}")


def reject_unknown_keys(data: dict, known: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise OnnxlmError(f"{where} has unknown key(s) {', '.join(map(repr, unknown))} (known: {', '.join(known)})")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _matches(value: Any, t: type) -> bool:
    if t is int:
        return _is_int(value)
    if t is float:
        return _is_int(value) or isinstance(value, float)
    if t is bool:
        return isinstance(value, bool)
    return isinstance(value, t)


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), f"{type(value).__name__} {value!r}"[:60])


# The decoder facts every artifact and the runtime share (model_info.ModelInfo).
# ModelInfo.family: the family's description (frontend/families/base.py describe), read by the lowering's plan and
# the runtime (key_frequencies, genai's model type); every key optional, as in artifacts written before it.
FAMILY = {
    "family": Opt(str), "norm": Opt(str), "block_norms": Opt([str]), "qk_norm": Opt(str), "qkv_bias": Opt(bool),
    "activation": Opt(str), "embedding_scale": Opt(float), "attention_scale": Opt(float),
    "residual_multiplier": Opt(float), "logits_divisor": Opt(float), "attention_softcap": Opt(float),
    "final_softcap": Opt(float), "tied_head": Opt(bool), "genai_type": Opt(str),
    "rope": Opt({"theta": Opt(float), "local_theta": Opt(float), "type": Opt(str), "factor": Opt(float),
                 "rotary_dim": Opt(NonNegative), "layers": Opt([bool]), "inv_freq": Opt([float]),
                 "local_inv_freq": Opt([float])}),
}

MODEL_INFO = {
    "architecture": str, "num_layers": Positive, "num_heads": Positive, "num_kv_heads": Positive,
    "head_dim": Positive, "hidden_size": Positive, "vocab_size": Positive, "context_length": Positive,
    "rope_theta": float, "bos_token_id": (int, type(None)), "eos_token_ids": [int], "add_bos_token": Opt(bool),
    "intermediate_size": Opt(NonNegative), "layer_windows": Opt([NonNegative]), "family": Opt(FAMILY),
}

RECIPE = {"name": Opt(str), "description": Opt(str), "extends": Opt(str), "passes": [dict]}
RECIPE_KEYS = ("name", "description", "extends", "passes")

# A pass's check: the logit bound of a lossless pass, the PPL cost and measurements of a lossy one.
PASS_CHECK = {
    "max_abs_logit_diff": Opt((float, type(None))), "tolerance": Opt(float), "ppl_before": Opt((float, type(None))),
    "ppl_after": Opt((float, type(None))), "ppl_tokens": Opt(NonNegative), "weight_rel_error": Opt((float, type(None))),
    "bytes_before": Opt(NonNegative), "bytes_after": Opt(NonNegative),
    "vocab_before": Opt(NonNegative), "vocab_after": Opt(NonNegative), "kept_ids": Opt([NonNegative]),
    "oov_rate": Opt(float), "token_ratio": Opt(float),
    "static_max_abs_logit_diff": Opt(float), "static_tolerance": Opt(float), "static_tokens_checked": Opt(NonNegative),
    "static_qdq_max_abs_logit_diff": Opt(float), "static_qdq_argmax_agreement": Opt(float),
    "accuracy_choice": Opt({"chosen": int, "decode_step_ms": MapOf(float), "calibration_ppl": MapOf(float)}),
}

PASS_REPORT = {
    "name": str, "options": dict, "modified": bool, "matched": MapOf(int), "nodes_before": NonNegative,
    "nodes_after": NonNegative, "seconds": float, "check": PASS_CHECK, "notes": [str],
}

# The artifact's default decoding (frontend/generation_defaults.py).
GENERATION = {
    "mode": str, "origin": Opt(str), "temperature": Opt(float), "top_k": Opt(NonNegative), "top_p": Opt(float),
    "min_p": Opt(float), "repetition_penalty": Opt(float), "seed": Opt(NonNegative),
}

# What the passes added to the decoder's inputs and outputs (interface.py).
PORT = {
    "name": str, "direction": str, "dtype": str, "shape": [(int, str)], "feature": str, "role": str, "meaning": str,
    "default": (int, float, bool, type(None)), "optional": bool,
}
INTERFACE = {"features": [str], "ports": [PORT]}

# The execution provider an artifact was built for (backends/), and the one the pass manager's probe ran on.
TARGET = {"ep": str, "providers": [str], "device": str, "probe_providers": [str]}

# Session options measured by `onnxlm tune-session` (backends/base.SessionSettings), the machine they were measured
# on, and what was measured (runtime/session_settings.py).
SESSION_OPTIONS = {"threads": (int, type(None)), "spinning": bool, "pinning": str, "parallel": bool,
                   "inter_op_threads": (int, type(None))}
SESSION = {"options": SESSION_OPTIONS, "machine": {"cpu": str, "cores": Positive}, "measured": Opt([dict])}

MANIFEST = {
    "format": str, "onnxlm_version": str, "created": str,
    "source": {"kind": str, "path": str, "sha256": str},
    "model": MODEL_INFO,
    "recipe": {"name": str, "description": str, "passes": [{"pass": str}]},  # as written: every key present
    "passes": [PASS_REPORT],
    "op_histogram": MapOf(int),
    "files": MapOf(NonNegative),
    "packages": MapOf(str),
    "generation": Opt(GENERATION),
    "interface": INTERFACE,
    "target": TARGET,
    "genai": {"deployable": bool, "reason": Opt(str)},
    "static": Opt({"context_length": int, "prefill_chunk": int, "prefill": str, "decode": str}),
    "session": Opt(SESSION),
}

# tokenizer_config.json, in an artifact or a source: only the keys onnxlm reads are checked.
TOKENIZER_CONFIG = {
    "chat_template": Opt((str, list, type(None))), "add_bos_token": Opt((bool, type(None))),
    "bos_token": Opt((str, dict, type(None))), "eos_token": Opt((str, dict, type(None))),
}


def read_tokenizer(path: Path, what: str = "tokenizer"):
    """A `tokenizers.Tokenizer` from a tokenizer.json, with one clear error for a missing or malformed file."""
    from tokenizers import Tokenizer

    check_regular_file(path, what)
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for every parse error
        raise OnnxlmError(f"{what} {path} is not a valid tokenizer.json: {first_line(exc)}") from None
