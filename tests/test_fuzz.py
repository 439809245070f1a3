"""A fuzzed input suite (hypothesis): GGUF headers and tensor tables, ONNX graphs, recipes, manifests and CLI option
values, mutated and fed to the CLI in-process.

For every case: exit code 0 or 2 (2 with one `error:` line), never a traceback, no file written or changed outside
the output directory, an existing artifact at the output left as it was, and bounded time and memory.

The model inputs (GGUF, ONNX) and recipes are checked up to the export: the export and the passes are replaced by a
stand-in that refuses with a known message, since a valid tiny model takes seconds to build and the suite covers
full builds elsewhere. A case that reaches it counts as accepted. Derandomized, so CI runs the same cases each time;
ONNXLM_FUZZ_EXAMPLES=N raises every target's case count for a deeper local run (`-p no:randomly` not needed).
"""

from __future__ import annotations

import collections
import json
import os
import resource
import shutil
import struct
import time
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is part of the test extras")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import onnxlm  # noqa: E402
from cli_helpers import run_cli  # noqa: E402

CASES: collections.Counter = collections.Counter()  # target -> cases tried, printed in the terminal summary
SCALE = int(os.environ.get("ONNXLM_FUZZ_EXAMPLES", "0"))
ACCEPTED = "fuzz: the input reached the export"
CASE_SECONDS = 60  # generous for a 2-core CI machine; a real case takes well under a second or two
RSS_GROWTH_BYTES = 3 << 30


class Inputs(tuple):
    """A fixture's inputs for a target, with a short repr: hypothesis prints the fixtures of a failing case."""

    def __repr__(self) -> str:
        return f"Inputs({len(self)} items)"


def fuzz_settings(examples: int):
    return settings(max_examples=SCALE or examples, deadline=None, derandomize=not SCALE, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


def tree(directory: Path, skip: Path | None = None) -> dict:
    """Every file below `directory` (not below `skip`) with its size and bytes' hash: what a case may not change."""
    import hashlib

    out = {}
    for path in sorted(directory.rglob("*")):
        if skip is not None and (path == skip or skip in path.parents):
            continue
        if path.is_file() and not path.is_symlink():
            out[str(path.relative_to(directory))] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.is_dir():
            out[str(path.relative_to(directory))] = "dir"
    return out


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def check_case(capsys, target: str, args: list, workdir: Path, output: Path, protected: Path | None = None):
    """Run the CLI on one case and assert the promises. Returns (code, stderr)."""
    before = tree(workdir, skip=output)
    kept = tree(protected) if protected is not None else None
    start = time.monotonic()
    code, _, err = run_cli(capsys, *args)
    seconds = time.monotonic() - start
    CASES[target] += 1
    assert "Traceback" not in err, err
    assert code in (0, 2), f"exit {code}: {err}"
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert tree(workdir, skip=output) == before, "a file outside the output directory changed"
    if protected is not None:
        assert tree(protected) == kept, "an existing artifact changed"
    assert seconds < CASE_SECONDS, f"{args} took {seconds:.0f} s"
    return code, err


@pytest.fixture
def stop_at_export(monkeypatch):
    def refuse(*args, **kwargs):
        raise onnxlm.OnnxlmError(ACCEPTED)

    monkeypatch.setattr("onnxlm.api.compile_source", refuse)


@pytest.fixture(scope="module")
def rss_bound():
    start = peak_rss()
    yield
    assert peak_rss() - start < RSS_GROWTH_BYTES, f"peak memory grew by {(peak_rss() - start) >> 20} MB"


INTERESTING = [0, 1, 2, 3, 4, 31, 32, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**63 - 1, 2**63,
               2**64 - 1]
NASTY_TEXT = ["", ".", "..", "/", "../../../../etc/passwd", "/etc/passwd", "model.onnx", "a\x00b", "~", "*", "nul",
              "\u00e9", "x" * 300]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


# GGUF: the header's counts, each key's lengths and types, each tensor's dims, type and offset.

def gguf_anchors(path: Path) -> list[tuple[int, int]]:
    """(byte offset, width) of every count, length, type and offset in the file's header and tensor table."""
    import gguf

    data = path.read_bytes()
    u32 = lambda at: struct.unpack_from("<I", data, at)[0]  # noqa: E731
    u64 = lambda at: struct.unpack_from("<Q", data, at)[0]  # noqa: E731
    anchors = [(8, 8), (16, 8)]  # tensor count, key count
    reader = gguf.GGUFReader(str(path))
    for field in reader.fields.values():
        if field.name.startswith("GGUF."):
            continue
        at = field.offset
        key_end = at + 8 + u64(at)
        anchors += [(at, 8), (key_end, 4)]  # key length, value type
        if u32(key_end) in (8, 9):  # a string's length; an array's item type and count
            anchors += [(key_end + 4, 8)] if u32(key_end) == 8 else [(key_end + 4, 4), (key_end + 8, 8)]
    for tensor in reader.tensors:
        at = tensor.field.offset
        dims_at = at + 8 + u64(at)
        n_dims = u32(dims_at)
        anchors += [(at, 8), (dims_at, 4)] + [(dims_at + 4 + 8 * i, 8) for i in range(n_dims)]
        anchors += [(dims_at + 4 + 8 * n_dims, 4), (dims_at + 8 + 8 * n_dims, 8)]  # type, data offset
    return anchors


@pytest.fixture(scope="module")
def gguf_case(tiny_gguf, tiny_hf_dir, tmp_path_factory):
    anchors = gguf_anchors(tiny_gguf)
    header_end = max(at + width for at, width in anchors)
    existing = tmp_path_factory.mktemp("fuzz-gguf-artifact") / "out"
    onnxlm.optimize(str(tiny_hf_dir), recipe="fp32-plain", output=existing)
    return Inputs((tiny_gguf.read_bytes(), anchors, header_end, existing))


@fuzz_settings(60)
@given(data=st.data())
def test_fuzz_gguf(capsys, tmp_path_factory, stop_at_export, rss_bound, gguf_case, data):
    original, anchors, header_end, existing = gguf_case
    blob = bytearray(original)
    kind = data.draw(st.sampled_from(["field", "field", "field", "bytes", "truncate"]))
    if kind == "field":
        for _ in range(data.draw(st.integers(1, 3))):
            at, width = data.draw(st.sampled_from(anchors))
            value = data.draw(st.sampled_from(INTERESTING) | st.integers(0, 2**64 - 1)) % (1 << (8 * width))
            blob[at : at + width] = value.to_bytes(width, "little")
    elif kind == "bytes":
        for _ in range(data.draw(st.integers(1, 8))):
            blob[data.draw(st.integers(0, header_end - 1))] = data.draw(st.integers(0, 255))
    else:
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    workdir = tmp_path_factory.mktemp("gguf")
    source = workdir / "model.gguf"
    source.write_bytes(bytes(blob))
    output = workdir / "out"
    shutil.copytree(existing, output)
    check_case(capsys, "gguf", ["optimize", source, "-o", output, "--overwrite"], workdir, output, protected=output)


# ONNX: external-data locations, offsets and lengths; truncated and corrupted protobufs.

@pytest.fixture(scope="module")
def onnx_case(tiny_artifacts, tiny_hf_dir):
    plain = tiny_artifacts("fp32-plain").directory
    return Inputs(((plain / "model.onnx").read_bytes(), plain / "model.onnx.data", tiny_hf_dir))


@fuzz_settings(60)
@given(data=st.data())
def test_fuzz_onnx(capsys, tmp_path_factory, stop_at_export, rss_bound, onnx_case, data):
    import onnx

    model_bytes, data_file, hf = onnx_case
    workdir = tmp_path_factory.mktemp("onnx")
    src = workdir / "src"
    src.mkdir()
    shutil.copy(data_file, src / "model.onnx.data")
    shutil.copy(hf / "tokenizer.json", src / "tokenizer.json")
    shutil.copy(hf / "config.json", src / "config.json")
    kind = data.draw(st.sampled_from(["location", "offset", "truncate", "bytes"]))
    if kind in ("location", "offset"):
        proto = onnx.load_from_string(model_bytes)
        external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        tensor = external[data.draw(st.integers(0, len(external) - 1))]
        key = "location" if kind == "location" else data.draw(st.sampled_from(["offset", "length"]))
        value = (data.draw(st.sampled_from(NASTY_TEXT) | st.text(max_size=20)) if kind == "location" else
                 str(data.draw(st.sampled_from(INTERESTING) | st.integers(-5, 2**64))))
        for entry in tensor.external_data:
            if entry.key == key:
                entry.value = value
        blob = proto.SerializeToString()
    elif kind == "truncate":
        blob = model_bytes[: data.draw(st.integers(0, len(model_bytes) - 1))]
    else:
        blob = bytearray(model_bytes)
        for _ in range(data.draw(st.integers(1, 8))):
            blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
        blob = bytes(blob)
    (src / "model.onnx").write_bytes(blob)
    output = workdir / "out"
    check_case(capsys, "onnx", ["optimize", src / "model.onnx", "-o", output], workdir, output)


# Recipes: random JSON, and the built-in recipes with one value, key or type changed.

def mutate(data, draw):
    """`data` (JSON) with one change at a random place: a value replaced, a key removed or added."""
    paths = []

    def walk(node, path):
        paths.append(path)
        children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, child in children:
            walk(child, (*path, key))

    walk(data, ())
    path = draw(st.sampled_from(paths))
    if not path:
        return draw(json_values)
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    action = draw(st.sampled_from(["replace", "replace", "remove", "add"]))
    if action == "replace":
        parent[path[-1]] = draw(json_values)
    elif action == "remove":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[draw(st.text(max_size=8))] = draw(json_values)
    else:
        parent.append(draw(json_values))
    return data


@pytest.fixture
def stop_at_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise onnxlm.OnnxlmError(ACCEPTED)

    monkeypatch.setattr("onnxlm.frontend.load_source", refuse)


@fuzz_settings(80)
@given(data=st.data())
def test_fuzz_recipe(capsys, tmp_path_factory, tiny_hf_dir, stop_at_load, rss_bound, data):
    from onnxlm.passes.recipe import BUILTIN_DIR

    builtin = sorted(BUILTIN_DIR.glob("*.json"))
    if data.draw(st.booleans()):
        recipe = data.draw(json_values)
    else:
        recipe = mutate(json.loads(data.draw(st.sampled_from(builtin)).read_text()), data.draw)
    workdir = tmp_path_factory.mktemp("recipe")
    path = workdir / "r.json"
    path.write_text(json.dumps(recipe))
    output = workdir / "out"
    check_case(capsys, "recipe", ["optimize", tiny_hf_dir, "-o", output, "--recipe", path], workdir, output)


# Manifests: the tiny artifact's, with one change; read by inspect and by generate.

@fuzz_settings(50)
@given(data=st.data())
def test_fuzz_manifest(capsys, tmp_path_factory, tiny_artifact, rss_bound, data):
    manifest = json.loads((tiny_artifact.directory / "manifest.json").read_text())
    workdir = tmp_path_factory.mktemp("manifest")
    art = workdir / "art"
    shutil.copytree(tiny_artifact.directory, art)
    (art / "manifest.json").write_text(json.dumps(mutate(manifest, data.draw)))
    command = data.draw(st.sampled_from([["inspect", art], ["generate", art, "--prompt", "fox",
                                                            "--max-new-tokens", "2", "--greedy"]]))
    check_case(capsys, "manifest", command, workdir, workdir / "none", protected=art)


# CLI option values.

OPTIONS = {
    "generate": ["--max-new-tokens", "--temperature", "--top-k", "--top-p", "--min-p", "--repetition-penalty",
                 "--seed", "--num-beams", "--length-penalty", "--max-draft", "--chunk-size", "--kv-budget", "--sinks",
                 "--halt-threshold", "--exit-threshold", "--threads", "--decoding", "--kv-policy", "--stop"],
    "eval": ["--max-tokens", "--window", "--kv-budget", "--sinks", "--kv-policy", "--threads"],
    "bench": ["--context", "--kv-budget", "--sinks", "--kv-policy", "--threads"],
    "optimize": ["--recipe", "--ep", "--budget-bits", "--block-size", "--accuracy-level", "--self-draft-layers",
                 "--draft-recipe", "--remove-layers", "--max-ppl-increase", "--sparsity", "--calibration"],
}
option_values = (st.sampled_from([str(v) for v in INTERESTING] + ["-1", "-2**63", "0.5", "1e9", "nan", "inf",
                                                                  "-inf", "", "x", "greedy", "beam", "sample",
                                                                  "speculative", "sinks-window", "h2o", "full"])
                 | st.integers(-10**6, 10**6).map(str) | st.floats(allow_nan=True).map(str) | st.text(max_size=6))


@fuzz_settings(120)
@given(data=st.data())
def test_fuzz_cli_options(capsys, tmp_path_factory, tiny_artifact, tiny_hf_dir, stop_at_load, rss_bound, data):
    """generate, eval and bench run on the tiny artifact; optimize is checked up to the model load."""
    workdir = tmp_path_factory.mktemp("cli")
    text = workdir / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 30)
    command = data.draw(st.sampled_from(sorted(OPTIONS)))
    if command == "optimize":
        args = ["-o", workdir / "out"]
        check_args = [command, tiny_hf_dir]
    else:
        check_args = [command, tiny_artifact.directory]
        args = {"generate": ["--prompt", "fox", "--max-new-tokens", "8"], "eval": ["--text", text],
                "bench": ["--runs", "1"]}[command]
    for option in data.draw(st.lists(st.sampled_from(OPTIONS[command]), min_size=1, max_size=3, unique=True)):
        args += [option, data.draw(option_values)]
    check_case(capsys, "cli", [*check_args, *args], workdir, workdir / "out", protected=tiny_artifact.directory)


REQUEST_KEYS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "n",
                "presence_penalty", "frequency_penalty", "stream_options", "ignore_eos"]
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() |
                           st.text(max_size=20), lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)


@pytest.fixture(scope="module")
def served_app(tiny_artifact):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from onnxlm.runtime.engine import EngineConfig
    from onnxlm.runtime.server import create_app

    app = create_app(tiny_artifact, EngineConfig(slots=2, token_budget=16, max_queue=8, max_context=128), "tiny")
    with TestClient(app) as client:
        yield client


@fuzz_settings(60)
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
       body=st.one_of(st.dictionaries(st.sampled_from(REQUEST_KEYS), JSON_VALUES, max_size=8), JSON_VALUES),
       valid_base=st.booleans())
def test_fuzz_server_requests(served_app, path, body, valid_base):
    """Any JSON body: 200, or 400 / 404 / 429 with OpenAI's error object; never a 500 or a hang."""
    CASES["server"] += 1
    if valid_base and isinstance(body, dict):  # mostly valid requests with one or more odd fields
        body = {"model": "tiny", "prompt": "fox", "messages": [{"role": "user", "content": "fox"}],
                "max_tokens": 3, **body}
    start = time.perf_counter()
    response = served_app.post(path, content=json.dumps(body),  # NaN and Infinity as Python writes them
                               headers={"Content-Type": "application/json"})
    assert time.perf_counter() - start < CASE_SECONDS
    assert response.status_code in (200, 400, 404, 429), (response.status_code, response.text[:300])
    if response.status_code != 200:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and "\n" not in error["message"]
