"""An existing decoder .onnx (Optimum-style I/O) is a model source too: it can be lowered like an export."""

import shutil

import numpy as np

import onnxlm
from onnxlm.runtime.generate import prefill


def copy_export(artifact, destination):
    """An Optimum-style export directory (graph, weights, tokenizer) made from a plain artifact."""
    destination.mkdir()
    for name in ("model.onnx", "model.onnx.data", "tokenizer.json"):
        shutil.copy(artifact.directory / name, destination / name)
    return destination


def test_optimize_from_an_existing_onnx_decoder(tiny_artifacts, tiny_hf_dir, tmp_path):
    plain = tiny_artifacts("fp32-plain")
    source = copy_export(plain, tmp_path / "exported")
    shutil.copy(tiny_hf_dir / "config.json", source / "config.json")

    art = onnxlm.optimize(str(source / "model.onnx"), recipe="fp32", output=tmp_path / "lowered")

    assert art.manifest["source"]["kind"] == "onnx"
    assert art.manifest["op_histogram"]["com.microsoft::GroupQueryAttention"] == art.info.num_layers
    ids = plain.tokenizer.encode("The quick brown fox")
    ours = prefill(art.session, art.session.new_cache(capacity=32), ids)
    ref = prefill(plain.session, plain.session.new_cache(), ids)
    np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_onnx_source_without_config_is_a_clear_error(tiny_artifacts, tmp_path, capsys):
    from cli_helpers import run_cli

    source = copy_export(tiny_artifacts("fp32-plain"), tmp_path / "exported")
    code, _, err = run_cli(capsys, "optimize", source / "model.onnx", "-o", tmp_path / "out")
    assert code == 2 and err.startswith("error: no config.json next to")
    assert not (tmp_path / "out").exists()
