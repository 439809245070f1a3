"""The artifact on disk: a self-contained directory that plain ONNX Runtime can deploy.

    model.onnx, model.onnx.data   the graph; weights as external data
    prefill.onnx, decode.onnx     static artifacts (static_kv pass): the graph at fixed shapes, same weight file
    tokenizer.json                the `tokenizers` tokenizer, as the source declares it
    tokenizer_config.json         chat template and special tokens
    genai_config.json             what onnxruntime-genai needs to run the artifact without onnxlm (when it can)
    recipe.json                   the recipe that built it
    manifest.json                 onnxlm version, source hash, model facts, pass reports, the interface the
                                  passes added, the target EP, package versions

It is written atomically (staging.py): everything, a draft/ included, goes to a hidden sibling directory that is
renamed into place only when complete, so a failed run leaves nothing behind and never damages a good artifact. This module imports neither
torch nor onnx-ir at module level: the runtime reads manifests through it.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
from pathlib import Path

from onnxlm.errors import OnnxlmError

FORMAT = "onnxlm-artifact/2"  # 2: the interface, target and genai fields
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
DRAFT_DIR = "draft"  # an optional smaller variant of the same model, for self-speculation
EXITS_DIR = "exits"  # early-exit artifacts: the decoder cut at its exit (lower, upper, head graphs)
EXIT_HIDDEN, EXIT_DRIFT = "exit_hidden", "exit_drift"  # the exit's graph outputs: the stream, the signal
PACKAGES = ("onnxlm", "onnx", "onnx-ir", "onnxscript", "onnxruntime", "tokenizers", "numpy", "torch", "transformers")


def is_artifact(directory: Path) -> bool:
    return (directory / "manifest.json").is_file() and (directory / MODEL_FILE).is_file()


def read_manifest(directory: Path) -> dict:
    """The artifact's manifest, checked against its schema (schema.MANIFEST) before anything reads it."""
    from onnxlm.schema import MANIFEST, check, read_json

    directory = Path(directory)
    if not directory.exists():
        raise OnnxlmError(f"artifact directory does not exist: {directory}")
    if not is_artifact(directory):
        raise OnnxlmError(f"{directory} is not an onnxlm artifact (no manifest.json and model.onnx)")
    manifest = read_json(directory / "manifest.json", "manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise OnnxlmError(f"{directory} has artifact format {found!r}; this onnxlm reads {FORMAT}")
    check(manifest, MANIFEST, f"manifest {directory / 'manifest.json'}")
    return manifest


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


def write_artifact(staging: Path, model, source, recipe, reports, interface, target: dict,
                   extra_graphs: dict | None = None, generation: dict | None = None) -> Path:
    """Write graph, tokenizer, recipe and manifest into `staging`, an empty directory that staging.staged_output
    later moves into place. `interface` (interface.Interface) is what the passes added to the decoder's inputs
    and outputs, `target` the backend's record (Backend.target). `extra_graphs` maps relative paths (e.g.
    "exits/lower.onnx") to more graphs of the artifact, each with its own external data; `generation` is the
    artifact's default decoding settings."""
    import onnx_ir as ir

    from onnxlm import __version__
    from onnxlm.genai_config import genai_config, genai_providers, genai_support
    from onnxlm.passes.cleanup import op_histogram

    model.producer_name, model.producer_version = "onnxlm", __version__
    ir.save(model, staging / MODEL_FILE, external_data=DATA_FILE)
    static = static_shape(model)
    if static:  # the static_kv pass's prefill/decode pair, specialized from model.onnx and sharing its weights
        from onnxlm.passes.lowering.static import write_pair

        write_pair(staging / MODEL_FILE, static, source.info)
    for relative, graph in (extra_graphs or {}).items():
        path = staging / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        ir.save(graph, path, external_data=path.name + ".data")
    source.tokenizer.save(str(staging / "tokenizer.json"))
    _write_json(staging / "tokenizer_config.json", tokenizer_config(source))
    _write_json(staging / "recipe.json", recipe.to_dict())
    ops = op_histogram(model)
    genai = genai_support(interface)
    if genai["deployable"]:
        _write_json(staging / "genai_config.json", genai_config(source.info, ops, MODEL_FILE, generation,
                                                                genai_providers(target, interface, ops, source.info)))
    files = {str(p.relative_to(staging)): p.stat().st_size for p in sorted(staging.rglob("*"))
             if p.is_file() and not p.relative_to(staging).parts[0].startswith(".")}  # not the staging's scratch
    manifest = {
        "format": FORMAT,
        "onnxlm_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": source.describe(),
        "model": source.info.to_dict(),
        "recipe": recipe.to_dict(),
        "passes": [r.to_dict() for r in reports],
        "op_histogram": ops,
        "interface": interface.to_dict(),
        "target": target,
        "genai": genai,
        "files": files,
        "packages": package_versions(),
        **({"generation": generation} if generation else {}),
        **({"static": static.to_dict()} if static else {}),
    }
    _write_json(staging / "manifest.json", manifest)
    return Path(staging)


def static_shape(model):
    """The static shape (static_layout.StaticShape) a static_kv pass recorded in the graph, or None."""
    from onnxlm.static_layout import METADATA_KEY, StaticShape

    recorded = model.metadata_props.get(METADATA_KEY)
    return StaticShape.from_dict(json.loads(recorded)) if recorded else None


def tokenizer_config(source) -> dict:
    info = source.info
    token = source.tokenizer.id_to_token
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": info.add_bos_token,
        "bos_token": token(info.bos_token_id) if info.bos_token_id is not None else None,
        "eos_token": token(info.eos_token_ids[0]) if info.eos_token_ids else None,
        "model_max_length": info.context_length,
    }
    if source.chat_template:
        config["chat_template"] = source.chat_template
    return config


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
