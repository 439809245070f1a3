"""The CLI's commands on the tiny model: optimize, generate, eval, bench, inspect, recipes."""

import json

from cli_helpers import run_cli


def test_optimize_writes_an_artifact(tiny_hf_dir, tmp_path, capsys):
    out = tmp_path / "a"
    code, _, err = run_cli(capsys, "optimize", tiny_hf_dir, "-o", out, "--recipe", "fp32")
    assert code == 0, err
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json", "recipe.json",
            "manifest.json", "genai_config.json"} <= names
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["name"] == "fp32"
    assert manifest["packages"]["onnxruntime"]


def test_generate_streams_text(tiny_artifact, capsys):
    code, out, _ = run_cli(capsys, "generate", tiny_artifact.directory, "--prompt", "fox", "--max-new-tokens", "8")
    expected = tiny_artifact.generate("fox", max_new_tokens=8)
    assert code == 0
    assert out == expected + "\n"


def test_eval_json(tiny_artifact, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    code, out, _ = run_cli(capsys, "eval", tiny_artifact.directory, "--text", text, "--window", "64", "--json")
    result = json.loads(out)
    assert code == 0
    assert result["ppl"] > 1 and result["windows"] >= 2 and result["seconds"] > 0
    assert result["tokens"] == len(tiny_artifact.tokenizer.encode(text.read_text()))


def test_bench_json(tiny_artifact, capsys):
    code, out, _ = run_cli(capsys, "bench", tiny_artifact.directory, "--json", "--runs", "1", "--threads", "1")
    result = json.loads(out)
    assert code == 0
    assert result["ttft_s"] > 0 and result["decode_tok_s"] > 0 and result["prefill512_s"] > 0
    assert result["threads"] == 1


def test_inspect_shows_recipe_passes_and_ops(tiny_artifact, capsys):
    code, out, _ = run_cli(capsys, "inspect", tiny_artifact.directory)
    assert code == 0
    assert "recipe: fp32: cleanup -> fuse_rms_norm -> fuse_skip_rms_norm -> fuse_rotary -> fuse_gqa" in out
    assert "|dlogit|" in out and "model.onnx.data" in out
    assert "com.microsoft::GroupQueryAttention" in out and "gqa 2" in out


def test_recipes_lists_the_builtins(capsys):
    code, out, _ = run_cli(capsys, "recipes")
    names = [line.split()[0] for line in out.splitlines()]
    assert code == 0 and names == ["early-exit", "fp16", "fp32", "fp32-plain", "int4", "int4-calibrated",
                                   "int4-cuda", "int4-fast", "int4-rtn", "int8", "int8-dynamic", "larosa-rotate",
                                   "larosa-s25", "larosa-s40", "lowered", "nested", "quicksilver", "static",
                                   "static-int4", "static-qdq"]


def test_help_describes_every_command(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for command in ("optimize", "generate", "eval", "bench", "inspect", "recipes"):
        assert command in out
