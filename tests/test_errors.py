"""Bad input: one line on stderr naming the problem, exit code 2, no traceback, nothing written."""

import json

import pytest

from cli_helpers import run_cli


def assert_one_line_error(code, err, *words):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0]


def optimize_fails(capsys, tmp_path, model, *extra):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "optimize", model, "-o", out, *extra)
    assert not out.exists(), "a failed optimize must write nothing"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "staging dir left behind"
    return code, err


def test_missing_model_path(capsys, tmp_path):
    code, err = optimize_fails(capsys, tmp_path, tmp_path / "nope.gguf")
    assert_one_line_error(code, err, "does not exist", "nope.gguf")


def test_corrupt_gguf(capsys, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00garbage" * 10)
    code, err = optimize_fails(capsys, tmp_path, bad)
    assert_one_line_error(code, err, "cannot read GGUF", "bad.gguf")


def test_corrupt_onnx(capsys, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07not a protobuf at all" * 5)
    code, err = optimize_fails(capsys, tmp_path, bad)
    assert_one_line_error(code, err, "cannot read ONNX", "bad.onnx")


def test_onnx_that_is_not_a_decoder(capsys, tmp_path):
    import onnx
    from onnx import helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph), path)
    code, err = optimize_fails(capsys, tmp_path, path)
    assert_one_line_error(code, err, "not a decoder with KV cache")


def test_unsupported_architecture(capsys, tmp_path):
    hf = tmp_path / "gpt2"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    code, err = optimize_fails(capsys, tmp_path, hf)
    assert_one_line_error(code, err, "unsupported architecture 'gpt2'", "llama", "gemma2", "olmo2", "smollm3")


def test_config_field_a_family_needs(capsys, tmp_path):
    """A field the family cannot do without, missing from config.json: one line, before the weights load."""
    hf = tmp_path / "gemma2"
    hf.mkdir()
    fields = {"model_type": "gemma2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "vocab_size": 320, "intermediate_size": 128}
    (hf / "config.json").write_text(json.dumps(fields))
    code, err = optimize_fails(capsys, tmp_path, hf)
    assert_one_line_error(code, err, "gemma2", "'query_pre_attn_scalar'")


@pytest.mark.parametrize("scaling, words", [({"rope_type": "dynamic", "factor": 2.0}, ("'dynamic'", "cannot trace")),
                                            ({"type": "longrope"}, ("'longrope'", "cannot trace")),
                                            ({"rope_type": "mrope"}, ("unsupported rope_scaling type 'mrope'",))])
def test_rope_scaling_onnxlm_cannot_export(capsys, tmp_path, scaling, words):
    hf = tmp_path / "llama"
    hf.mkdir()
    fields = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "vocab_size": 320, "intermediate_size": 128, "rope_scaling": scaling}
    (hf / "config.json").write_text(json.dumps(fields))
    code, err = optimize_fails(capsys, tmp_path, hf)
    assert_one_line_error(code, err, *words)


def test_unknown_recipe(capsys, tmp_path, tiny_hf_dir):
    code, err = optimize_fails(capsys, tmp_path, tiny_hf_dir, "--recipe", "fp64")
    assert_one_line_error(code, err, "unknown recipe 'fp64'", "fp32")


@pytest.mark.parametrize(
    "entry, words",
    [
        ({"pass": "fold_everything"}, ["unknown pass 'fold_everything'", "cleanup"]),
        ({"pass": "cleanup", "level": 3}, ["pass 'cleanup' has no option 'level'"]),
        ({"name": "cleanup"}, ["a recipe entry must be an object"]),
    ],
)
def test_bad_recipe_file(capsys, tmp_path, tiny_hf_dir, entry, words):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"name": "r", "passes": [entry]}))
    code, err = optimize_fails(capsys, tmp_path, tiny_hf_dir, "--recipe", recipe)
    assert_one_line_error(code, err, *words)


def test_recipe_file_not_json(capsys, tmp_path, tiny_hf_dir):
    recipe = tmp_path / "r.json"
    recipe.write_text("{passes: [")
    code, err = optimize_fails(capsys, tmp_path, tiny_hf_dir, "--recipe", recipe)
    assert_one_line_error(code, err, "not valid JSON")


def test_invalid_option_value(capsys, tiny_artifact, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello world")
    code, _, err = run_cli(capsys, "eval", tiny_artifact.directory, "--text", text, "--window", "1")
    assert_one_line_error(code, err, "--window")
    code, _, err = run_cli(capsys, "generate", tiny_artifact.directory, "--prompt", "x", "--max-new-tokens", "many")
    assert_one_line_error(code, err, "--max-new-tokens")


def test_unknown_execution_provider(capsys, tmp_path, tiny_hf_dir):
    code, err = optimize_fails(capsys, tmp_path, tiny_hf_dir, "--ep", "tpu")
    assert_one_line_error(code, err, "unknown execution provider 'tpu'")


def test_output_exists_and_is_not_an_artifact(capsys, tmp_path, tiny_hf_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, _, err = run_cli(capsys, "optimize", tiny_hf_dir, "-o", out)
    assert_one_line_error(code, err, "is not an onnxlm artifact")
    assert [p.name for p in out.iterdir()] == ["precious.txt"]


def test_commands_on_a_directory_that_is_not_an_artifact(capsys, tmp_path):
    for command in (["generate", tmp_path, "--prompt", "x"], ["bench", tmp_path], ["inspect", tmp_path]):
        code, _, err = run_cli(capsys, *command)
        assert_one_line_error(code, err, "not an onnxlm artifact")


def test_eval_text_file_missing(capsys, tiny_artifact, tmp_path):
    code, _, err = run_cli(capsys, "eval", tiny_artifact.directory, "--text", tmp_path / "none.txt")
    assert_one_line_error(code, err, "cannot read text file")
