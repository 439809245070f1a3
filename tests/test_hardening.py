"""The defects of the hardening issue, one test (or a few) each: every one failed before its fix.

The promise: a user error is one line on stderr with exit code 2 and nothing is written; a good artifact is never
damaged; every input is checked before the slow work.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import onnxlm
from cli_helpers import run_cli
from test_errors import assert_one_line_error
from test_load_onnx import copy_export

TESTS = Path(__file__).resolve().parent


def copy_artifact(artifact, destination: Path) -> Path:
    shutil.copytree(artifact.directory, destination)
    return destination


def hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def forbid(monkeypatch, target: str, what: str):
    """Make `target` (module.attr) fail the test if it is called: proof that a check ran before the slow work."""
    module, attr = target.rsplit(".", 1)

    def called(*args, **kwargs):
        raise AssertionError(f"{what} ran before the input was refused")

    monkeypatch.setattr(f"{module}.{attr}", called)


# 1. A failed --self-draft-layers run neither replaces nor creates the main artifact.

def test_failed_self_draft_keeps_the_existing_artifact(capsys, tiny_hf_dir, tiny_artifact, tmp_path):
    good = copy_artifact(tiny_artifact, tmp_path / "good")
    before = {p.name: p.read_bytes() for p in good.iterdir() if p.is_file()}
    code, _, err = run_cli(capsys, "optimize", tiny_hf_dir, "-o", good, "--recipe", "int4-rtn",
                           "--self-draft-layers", "5", "--overwrite")
    assert_one_line_error(code, err, "cannot remove 5 of 2 layers")
    assert {p.name: p.read_bytes() for p in good.iterdir() if p.is_file()} == before
    assert hidden(tmp_path) == []


def test_a_draft_that_fails_after_the_main_model_was_built_writes_nothing(tiny_hf_dir, tmp_path, monkeypatch):
    """The draft is built second: its failure must still take the whole staged artifact with it."""
    from onnxlm.passes import registry
    from test_artifact import ScaleLogits

    monkeypatch.setitem(registry.PASSES, ScaleLogits.name, ScaleLogits)
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"name": "broken", "passes": [{"pass": "cleanup"}, {"pass": "scale_logits"}]}))
    with pytest.raises(onnxlm.OnnxlmError, match="should be lossless"):
        onnxlm.optimize(str(tiny_hf_dir), recipe="fp32", output=tmp_path / "fresh", self_draft_layers=1,
                        draft_recipe=str(broken))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.json"]


# 2. Bad tokenizer files: one line, and a source's is read before its weights.

@pytest.mark.parametrize("damage", ["missing", "malformed", "bad_config"])
@pytest.mark.parametrize("command", ["generate", "eval", "bench"])
def test_bad_tokenizer_files_in_an_artifact(capsys, tiny_artifact, tmp_path, damage, command):
    art = copy_artifact(tiny_artifact, tmp_path / "art")
    if damage == "missing":
        (art / "tokenizer.json").unlink()
    elif damage == "malformed":
        (art / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    else:
        (art / "tokenizer_config.json").write_text('{"chat_template": 3')
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 10)
    args = {"generate": ["--prompt", "x", "--max-new-tokens", "2"], "eval": ["--text", text],
            "bench": ["--runs", "1"]}[command]
    code, _, err = run_cli(capsys, command, art, *args)
    assert_one_line_error(code, err, "tokenizer")


def test_a_malformed_tokenizer_in_an_hf_source_fails_before_the_weights_load(capsys, tiny_hf_dir, tmp_path,
                                                                              monkeypatch):
    source = tmp_path / "hf"
    shutil.copytree(tiny_hf_dir, source)
    (source / "tokenizer.json").write_text("{not json")
    forbid(monkeypatch, "transformers.AutoModelForCausalLM.from_pretrained", "the weight load")
    code, _, err = run_cli(capsys, "optimize", source, "-o", tmp_path / "out")
    assert_one_line_error(code, err, "tokenizer.json")


def onnx_source(tiny_artifacts, tiny_hf_dir, destination: Path) -> Path:
    """test_load_onnx's Optimum-style export directory, with the config beside it."""
    copy_export(tiny_artifacts("fp32-plain"), destination)
    shutil.copy(tiny_hf_dir / "config.json", destination / "config.json")
    return destination / "model.onnx"


def test_a_malformed_tokenizer_beside_an_onnx_source_fails_before_the_weights_load(capsys, tiny_artifacts,
                                                                                    tiny_hf_dir, tmp_path,
                                                                                    monkeypatch):
    model = onnx_source(tiny_artifacts, tiny_hf_dir, tmp_path / "src")
    (model.parent / "tokenizer.json").write_text("[")
    forbid(monkeypatch, "onnx_ir.load", "the ONNX weight load")
    code, _, err = run_cli(capsys, "optimize", model, "-o", tmp_path / "out")
    assert_one_line_error(code, err, "tokenizer.json")


# 3. A manifest that parses but has the wrong shape.

@pytest.mark.parametrize("edit, words", [
    (lambda m: [], ["artifact format"]),
    (lambda m: {k: v for k, v in m.items() if k != "model"}, ["lacks the key 'model'"]),
    (lambda m: {**m, "model": {**m["model"], "num_layers": 3}}, ["3 layers", "KV inputs for 2"]),
    (lambda m: {**m, "model": {**m["model"], "num_heads": "four"}}, ["model.num_heads"]),
    (lambda m: {**m, "passes": [{"name": 1}]}, ["passes[0]"]),
])
def test_a_manifest_of_the_wrong_shape(capsys, tiny_artifact, tmp_path, edit, words):
    art = copy_artifact(tiny_artifact, tmp_path / "art")
    manifest = json.loads((art / "manifest.json").read_text())
    (art / "manifest.json").write_text(json.dumps(edit(manifest)))
    for command in (["generate", art, "--prompt", "x", "--max-new-tokens", "2"], ["inspect", art]):
        if command[0] == "inspect" and "KV inputs" in words[-1]:
            continue  # inspect reads the manifest, not the graph
        code, _, err = run_cli(capsys, *command)
        assert_one_line_error(code, err, *words)


# 4. Output problems are found before the run.

def test_output_under_a_file(capsys, tiny_hf_dir, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    forbid(monkeypatch, "onnxlm.frontend.load_source", "the model load")
    code, _, err = run_cli(capsys, "optimize", tiny_hf_dir, "-o", tmp_path / "file" / "out")
    assert_one_line_error(code, err, "is a file, not a directory")


def test_output_where_nothing_can_be_written(capsys, tiny_hf_dir, monkeypatch):
    forbid(monkeypatch, "onnxlm.frontend.load_source", "the model load")
    code, _, err = run_cli(capsys, "optimize", tiny_hf_dir, "-o", "/proc/onnxlm-test/out")  # read-only, as root too
    assert_one_line_error(code, err, "cannot write the output")


def test_read_only_output_directory(capsys, tiny_hf_dir, tmp_path, monkeypatch):
    if os.geteuid() == 0:
        pytest.skip("root writes into a read-only directory; the /proc test covers a read-only place")
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    forbid(monkeypatch, "onnxlm.frontend.load_source", "the model load")
    code, _, err = run_cli(capsys, "optimize", tiny_hf_dir, "-o", parent / "out")
    parent.chmod(0o755)
    assert_one_line_error(code, err, "cannot write the output")


def test_not_enough_space_is_found_before_the_export(capsys, tiny_hf_dir, tmp_path, monkeypatch):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr("onnxlm.staging.shutil.disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    forbid(monkeypatch, "onnxlm.frontend.export.export_decoder", "the export")
    code, _, err = run_cli(capsys, "optimize", tiny_hf_dir, "-o", tmp_path / "out")
    assert_one_line_error(code, err, "not enough free space", "MB needed")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_writing_is_one_line_and_leaves_nothing(capsys, tiny_hf_dir, tmp_path, monkeypatch):
    import errno

    import onnx_ir

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(onnx_ir, "save", full)
    code, _, err = run_cli(capsys, "optimize", tiny_hf_dir, "-o", tmp_path / "out", "--recipe", "fp32-plain")
    assert_one_line_error(code, err, "No space left on device")
    assert list(tmp_path.iterdir()) == []


# 5. External data that points outside the model's directory is refused before it is hashed or read.

@pytest.mark.parametrize("where", ["../../../../etc/passwd", "/etc/passwd", "link"])
def test_external_data_outside_the_model_directory(capsys, tiny_artifacts, tiny_hf_dir, tmp_path, monkeypatch,
                                                   where):
    import onnx

    model = onnx_source(tiny_artifacts, tiny_hf_dir, tmp_path / "src")
    proto = onnx.load(str(model), load_external_data=False)
    location = where
    if where == "link":
        (model.parent / "model.onnx.data").unlink()
        os.symlink(tmp_path / "elsewhere.data", model.parent / "model.onnx.data")
        (tmp_path / "elsewhere.data").write_bytes(b"\0" * 10_000_000)
        location = "model.onnx.data"
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(proto, str(model))
    forbid(monkeypatch, "onnxlm.frontend.load_onnx.sha256_of", "hashing")
    code, _, err = run_cli(capsys, "optimize", model, "-o", tmp_path / "out")
    assert_one_line_error(code, err, "outside the model's directory")


# 6. A block size that passes the option check is bounded by the layer width.

@pytest.mark.parametrize("size, words", [("4611686018427387904", ["at most 65536"]),
                                         ("1024", ["wider than the model's layers", "at most 128"])])
def test_block_size_bounded(capsys, tiny_hf_dir, tmp_path, monkeypatch, size, words):
    forbid(monkeypatch, "onnxlm.frontend.export.export_decoder", "the export")
    code, _, err = run_cli(capsys, "optimize", tiny_hf_dir, "-o", tmp_path / "out", "--recipe", "int4-rtn",
                           "--block-size", size)
    assert_one_line_error(code, err, *words)


# 7. Other tracebacks.

def test_deeply_nested_recipe(capsys, tiny_hf_dir, tmp_path):
    recipe = tmp_path / "deep.json"
    recipe.write_text("[" * 100_000 + "]" * 100_000)
    code, _, err = run_cli(capsys, "optimize", tiny_hf_dir, "-o", tmp_path / "out", "--recipe", recipe)
    assert_one_line_error(code, err, "nested too deeply")


def test_config_json_that_is_not_an_object(capsys, tiny_hf_dir, tiny_artifacts, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(tiny_hf_dir, hf)
    (hf / "config.json").write_text("[1,2,3]")
    code, _, err = run_cli(capsys, "optimize", hf, "-o", tmp_path / "a")
    assert_one_line_error(code, err, "must be a JSON object")
    model = onnx_source(tiny_artifacts, tiny_hf_dir, tmp_path / "src")
    (model.parent / "config.json").write_text("[1,2,3]")
    code, _, err = run_cli(capsys, "optimize", model, "-o", tmp_path / "b")
    assert_one_line_error(code, err, "must be a JSON object")


def test_prompt_that_is_not_utf8(tiny_artifact):
    """On the command line, undecodable bytes reach Python as lone surrogates (PEP 383)."""
    result = subprocess.run([sys.executable, "-m", "onnxlm.cli", "generate", str(tiny_artifact.directory),
                             "--prompt", os.fsdecode(b"caf\xe9 \xff"), "--max-new-tokens", "2"],
                            capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == ["error: the text is not valid UTF-8 (at character "
                                                  f"{result.stderr.split('character ')[1].split(')')[0]})"]


def test_negative_seed(capsys, tiny_artifact):
    code, _, err = run_cli(capsys, "generate", tiny_artifact.directory, "--prompt", "x", "--seed", "-1")
    assert_one_line_error(code, err, "--seed")
    from onnxlm.runtime.sampling import SamplingConfig

    with pytest.raises(onnxlm.OnnxlmError, match="seed"):
        SamplingConfig(seed=-1)


# 8. SIGTERM and SIGKILL while writing.

def temp_leftovers(directory: Path) -> list[str]:
    """What a run left in its TMPDIR; ONNX Runtime keeps a telemetry session id there (.ses), which is not ours."""
    return [p.name for p in directory.iterdir() if p.name != ".ses"]


def start_optimize(tiny_hf_dir, out: Path, scratch_tmp: Path) -> subprocess.Popen:
    env = {**os.environ, "TMPDIR": str(scratch_tmp)}
    return subprocess.Popen([sys.executable, "-m", "onnxlm.cli", "optimize", str(tiny_hf_dir), "-o", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_staging(parent: Path, process: subprocess.Popen, seconds: float = 120) -> Path:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        staged = [p for p in parent.iterdir() if ".staging-" in p.name]
        if staged and (staged[0] / ".scratch" / "check.onnx").exists():  # the passes have started
            return staged[0]
        time.sleep(0.05)
    raise AssertionError(f"no staging directory appeared: {process.communicate()}")


def test_sigterm_while_writing_leaves_nothing(tiny_hf_dir, tmp_path):
    parent, scratch_tmp = tmp_path / "p", tmp_path / "tmp"
    parent.mkdir()
    scratch_tmp.mkdir()
    process = start_optimize(tiny_hf_dir, parent / "out", scratch_tmp)
    wait_for_staging(parent, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err
    assert err.strip().splitlines()[-1] == "terminated" and "Traceback" not in err
    assert list(parent.iterdir()) == [] and temp_leftovers(scratch_tmp) == []


def test_sigkill_leftovers_are_removed_by_the_next_run(capsys, tiny_hf_dir, tmp_path):
    parent, scratch_tmp = tmp_path / "p", tmp_path / "tmp"
    parent.mkdir()
    scratch_tmp.mkdir()
    process = start_optimize(tiny_hf_dir, parent / "out", scratch_tmp)
    staged = wait_for_staging(parent, process)
    process.kill()
    process.communicate(timeout=60)
    assert staged.exists() and temp_leftovers(scratch_tmp) == []  # the only leftover, and it is discoverable
    code, _, err = run_cli(capsys, "optimize", tiny_hf_dir, "-o", parent / "other", "--recipe", "fp32-plain")
    assert code == 0, err
    assert sorted(p.name for p in parent.iterdir()) == ["other"]


# 9. Eval and bench enforce the context length on a plain artifact too.

@pytest.mark.parametrize("recipe", ["fp32-plain", "fp32"])
def test_eval_and_bench_enforce_the_context_length(capsys, tiny_artifacts, tmp_path, recipe):
    art = tiny_artifacts(recipe)  # context length 1024
    text = tmp_path / "long.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 400)
    code, _, err = run_cli(capsys, "eval", art.directory, "--text", text, "--window", "2048")
    assert_one_line_error(code, err, "context length 1024")
    code, _, err = run_cli(capsys, "bench", art.directory, "--runs", "1", "--context", "1000")
    assert_one_line_error(code, err, "context length 1024")
    cache = art.session.new_cache()
    import numpy as np

    with pytest.raises(onnxlm.OnnxlmError, match="context length"):
        art.session.step(np.zeros((1, 1025), np.int64), cache)


# 10. Pickle weights are refused plainly.

def test_pickle_checkpoint_is_refused(capsys, tiny_hf_dir, tmp_path, monkeypatch):
    hf = tmp_path / "hf"
    shutil.copytree(tiny_hf_dir, hf)
    (hf / "model.safetensors").unlink()
    (hf / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    forbid(monkeypatch, "transformers.AutoModelForCausalLM.from_pretrained", "the weight load")
    code, _, err = run_cli(capsys, "optimize", hf, "-o", tmp_path / "out")
    assert_one_line_error(code, err, "pickle", "pytorch_model.bin", "safetensors")


# 11. Silent surprises.

def test_recipe_with_unknown_top_level_keys(capsys, tiny_hf_dir, tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"name": "r", "passes": [{"pass": "cleanup"}], "pases": []}))
    code, _, err = run_cli(capsys, "optimize", tiny_hf_dir, "-o", tmp_path / "out", "--recipe", recipe)
    assert_one_line_error(code, err, "unknown key(s) 'pases'")


def test_empty_calibration_text(capsys, tiny_hf_dir, tmp_path):
    text = tmp_path / "empty.txt"
    text.write_text(" \n")
    code, _, err = run_cli(capsys, "optimize", tiny_hf_dir, "-o", tmp_path / "out", "--recipe", "int8",
                           "--calibration", text)
    assert_one_line_error(code, err, "calibration text", "empty")


def test_an_existing_artifact_is_replaced_only_with_overwrite(capsys, tiny_hf_dir, tiny_artifact, tmp_path,
                                                              monkeypatch):
    good = copy_artifact(tiny_artifact, tmp_path / "good")
    before = (good / "manifest.json").read_bytes()
    forbid(monkeypatch, "onnxlm.frontend.load_source", "the model load")
    code, _, err = run_cli(capsys, "optimize", tiny_hf_dir, "-o", good)
    assert_one_line_error(code, err, "already holds an artifact", "--overwrite")
    assert (good / "manifest.json").read_bytes() == before


def test_a_fifo_as_the_model_or_text_is_refused(capsys, tiny_artifact, tmp_path):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    code, _, err = run_cli(capsys, "optimize", fifo, "-o", tmp_path / "out")
    assert_one_line_error(code, err, "not a regular file")
    code, _, err = run_cli(capsys, "eval", tiny_artifact.directory, "--text", fifo)
    assert_one_line_error(code, err, "not a regular file")


# 12. The default decoding is the model's recommendation, seeded, recorded in the artifact; greedy a flag away.

@pytest.fixture(scope="session")
def sampling_artifact(tiny_hf_dir, tmp_path_factory):
    hf = tmp_path_factory.mktemp("gen") / "hf"
    shutil.copytree(tiny_hf_dir, hf)
    (hf / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "do_sample": True, "temperature": 0.7, "top_p": 0.9}))
    return onnxlm.optimize(str(hf), recipe="fp32", output=hf.parent / "art")


def test_default_decoding_is_recorded_and_used(capsys, sampling_artifact, tiny_artifact):
    from onnxlm.runtime.decoding import Decoding
    from onnxlm.runtime.sampling import SamplingConfig

    generation = sampling_artifact.manifest["generation"]
    assert generation["mode"] == "sample" and generation["temperature"] == 0.7 and generation["seed"] == 0
    search = json.loads((sampling_artifact.directory / "genai_config.json").read_text())["search"]
    assert search["do_sample"] is True and search["temperature"] == 0.7 and search["top_p"] == 0.9
    assert tiny_artifact.manifest["generation"]["mode"] == "greedy"  # its generation_config does not sample

    d = sampling_artifact.directory
    sampled = Decoding("sample", SamplingConfig(temperature=0.7, top_p=0.9, seed=0))
    expected = sampling_artifact.generate("fox", max_new_tokens=24, decoding=sampled)
    greedy = sampling_artifact.generate("fox", max_new_tokens=24, decoding=Decoding())
    assert expected != greedy  # else this test could not tell them apart
    assert run_cli(capsys, "generate", d, "--prompt", "fox", "--max-new-tokens", "24")[1] == expected + "\n"
    assert sampling_artifact.generate("fox", max_new_tokens=24) == expected
    assert run_cli(capsys, "generate", d, "--prompt", "fox", "--max-new-tokens", "24", "--greedy")[1] == greedy + "\n"
    other_seed = run_cli(capsys, "generate", d, "--prompt", "fox", "--max-new-tokens", "24", "--seed", "5")[1]
    assert other_seed == sampling_artifact.generate(
        "fox", max_new_tokens=24, decoding=Decoding("sample", SamplingConfig(temperature=0.7, top_p=0.9, seed=5))
    ) + "\n"


def test_gguf_defaults():
    from onnxlm.frontend.generation_defaults import LLAMA_CPP, from_gguf_metadata

    assert from_gguf_metadata({}) == LLAMA_CPP
    assert from_gguf_metadata({"general.sampling.temp": 0.6, "general.sampling.top_k": 20})["temperature"] == 0.6


# 13. Third-party chatter stays under onnxlm's own output.

def test_optimize_prints_only_onnxlm_lines(capfd, tiny_hf_dir, tmp_path):
    result = subprocess.run([sys.executable, "-m", "onnxlm.cli", "optimize", str(tiny_hf_dir), "-o",
                             str(tmp_path / "out"), "--recipe", "fp32-plain"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.rstrip().splitlines()
    assert result.stdout == ""
    assert all(line.startswith("  ") or line.startswith("wrote ") for line in lines), lines
