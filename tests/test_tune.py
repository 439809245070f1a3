"""`onnxlm tune` on the tiny model: a 4-trial search whose best recipe rebuilds its artifact byte for byte."""

import json

import pytest
from cli_helpers import run_cli

import onnxlm
from onnxlm.errors import OnnxlmError
from onnxlm.tune import Space

pytest.importorskip("optuna")

SPACE = {
    "extends": "lowered",
    "finish": [{"pass": "logits_to_keep"}],
    "dimensions": [
        {"name": "quant", "choices": {"fp32": [], "int8": [{"pass": "quant_weight_only", "bits": 8}]}},
        {"name": "remove_layers", "choices": {"0": [], "1": [{"pass": "remove_layers", "n": 1}]}},
    ],
}


def test_a_small_search_writes_its_results_and_the_best_recipe_rebuilds_its_artifact(tiny_hf_dir, tmp_path, capsys):
    space = tmp_path / "space.json"
    space.write_text(json.dumps(SPACE))
    out = tmp_path / "tune"
    code, stdout, err = run_cli(capsys, "tune", tiny_hf_dir, "-o", out, "--space", space, "--trials", "4",
                                "--max-ppl-increase", "1000", "--runs", "1")
    assert code == 0, err
    assert "best:" in stdout
    rows = (out / "trials.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[0].startswith("number,picks,state")
    front = json.loads((out / "pareto.json").read_text())
    assert front["trials"] and front["objectives"] == ["decode"]
    try:
        import matplotlib  # noqa: F401

        assert (out / "pareto.png").read_bytes().startswith(b"\x89PNG")
    except ImportError:  # the PNG needs the onnxlm[tune] extra: one line says so
        assert not (out / "pareto.png").exists() and "pareto.png not written: matplotlib" in err
    rebuilt = onnxlm.optimize(str(tiny_hf_dir), recipe=str(out / "best_recipe.json"), output=tmp_path / "again")
    for name in ("model.onnx", "model.onnx.data"):
        assert (out / "best" / name).read_bytes() == (rebuilt.directory / name).read_bytes()


def test_a_budget_no_trial_meets_exits_1_with_its_trials_written(tiny_hf_dir, tmp_path, capsys):
    space = tmp_path / "space.json"
    space.write_text(json.dumps({**SPACE, "dimensions": SPACE["dimensions"][1:]}))
    out = tmp_path / "tune"
    code, _, err = run_cli(capsys, "tune", tiny_hf_dir, "-o", out, "--space", space, "--trials", "1",
                           "--max-ppl-increase", "0", "--runs", "1")
    rows = (out / "trials.csv").read_text().splitlines()
    if "over budget" in rows[1]:  # the trial removed a layer: over a 0% budget
        assert code == 1 and "no trial met the budget" in err
    else:  # it drew the reference itself: 0.0% is within budget
        assert code == 0


def test_bad_search_spaces_are_one_line():
    with pytest.raises(OnnxlmError, match="empty"):
        Space.from_dict({"dimensions": []})
    with pytest.raises(OnnxlmError, match="unknown pass 'quant_magic'"):
        Space.from_dict({"dimensions": [{"name": "q", "choices": {"x": [{"pass": "quant_magic"}]}}]})
    with pytest.raises(OnnxlmError, match="has no option 'bitz'"):
        Space.from_dict({"dimensions": [{"name": "q", "choices": {"x": [{"pass": "quant_weight_only", "bitz": 4}]}}]})


def test_a_build_resumed_from_the_graph_cache_is_byte_identical(tiny_hf_dir, tmp_path):
    from onnxlm.passes.graph_cache import GraphCache

    cache = GraphCache(tmp_path / "graphs", (1, 8))
    first = onnxlm.optimize(str(tiny_hf_dir), recipe="int8", output=tmp_path / "a", graph_cache=cache)
    said = []
    second = onnxlm.optimize(str(tiny_hf_dir), recipe="int8", output=tmp_path / "b", graph_cache=cache,
                             progress=said.append)
    assert "resuming after 8 pass(es) from the graph cache" in said and not any("exporting" in m for m in said)
    for name in ("model.onnx", "model.onnx.data"):
        assert (first.directory / name).read_bytes() == (second.directory / name).read_bytes()
    assert [r["name"] for r in first.manifest["passes"]] == [r["name"] for r in second.manifest["passes"]]
    assert first.manifest["passes"][-1]["check"] == second.manifest["passes"][-1]["check"]


def test_a_build_resumed_after_the_first_pass_is_byte_identical(tiny_hf_dir, tmp_path):
    """remove_layers goes right after the first cleanup, so such a recipe resumes from the export's snapshot."""
    from onnxlm.passes.graph_cache import GraphCache

    cache = GraphCache(tmp_path / "graphs", (1,))
    plain = onnxlm.optimize(str(tiny_hf_dir), recipe="int8", output=tmp_path / "a", remove_layers=1)
    onnxlm.optimize(str(tiny_hf_dir), recipe="int8", output=tmp_path / "b", remove_layers=1, graph_cache=cache)
    said = []
    resumed = onnxlm.optimize(str(tiny_hf_dir), recipe="int8", output=tmp_path / "c", remove_layers=1,
                              graph_cache=cache, progress=said.append)
    assert "resuming after 1 pass(es) from the graph cache" in said
    for name in ("model.onnx", "model.onnx.data"):
        assert (plain.directory / name).read_bytes() == (resumed.directory / name).read_bytes()


def test_a_trimmed_vocabulary_is_a_search_dimension_scored_on_the_same_text(tiny_hf_dir, tmp_path, capsys):
    """trim_vocab (default corpus: the calibration text) goes right after the first cleanup, before quantizing; on
    its own corpus it keeps every token, so its PPL (over the kept tokens) can only fall."""
    space = {**SPACE, "dimensions": [{"name": "vocab", "choices": {"trimmed": [{"pass": "trim_vocab"}]}},
                                     {"name": "quant", "choices": {"int8": SPACE["dimensions"][0]["choices"]["int8"]}}]}
    recipe = [p.name for p in Space.from_dict(space).recipe({"vocab": "trimmed", "quant": "int8"}).passes]
    assert recipe[:3] == ["cleanup", "trim_vocab", "fuse_rms_norm"] and recipe.index("quant_weight_only") > 2
    path = tmp_path / "space.json"
    path.write_text(json.dumps({**space, "dimensions": space["dimensions"][:1]}))
    out = tmp_path / "tune"
    code, _, err = run_cli(capsys, "tune", tiny_hf_dir, "-o", out, "--space", path, "--trials", "1",
                           "--max-ppl-increase", "0", "--runs", "1", "--objective", "size")
    assert code == 0, err
    trial = json.loads((out / "pareto.json").read_text())["trials"][0]
    assert trial["ppl_increase"] <= 1e-6
    manifest = json.loads((out / "best" / "manifest.json").read_text())
    assert manifest["model"]["vocab_size"] < 320


def test_trials_fan_out_as_ray_tasks_on_a_local_instance(tiny_hf_dir, tmp_path, monkeypatch):
    """--ray local: a Ray instance on loopback (no dashboard), 2 tasks at a time, 4 trials; it stops with the
    search. Each trial is scored in a Ray worker process, not in the driver."""
    pytest.importorskip("ray")
    import os

    import ray

    from onnxlm.tune import tune

    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    out = tmp_path / "tune"
    result = tune(str(tiny_hf_dir), out, ["decode"], 1000.0, 4, Space.from_dict(SPACE), runs=1,
                  ray_address="local", concurrency=2)
    assert not ray.is_initialized()
    trials = result["trials"]
    assert sorted(t.number for t in trials) == [0, 1, 2, 3] and all(t.state == "ok" for t in trials)
    workers = {t.worker for t in trials}
    assert len(workers) == 2 and not any(w.endswith(f":{os.getpid()}") for w in workers)
    assert len((out / "trials.csv").read_text().splitlines()) == 5 and result["best"] is not None


def test_a_ray_address_that_cannot_be_reached_is_one_line_and_writes_nothing(tiny_hf_dir, tmp_path, capsys):
    pytest.importorskip("ray")
    out = tmp_path / "tune"
    code, _, err = run_cli(capsys, "tune", tiny_hf_dir, "-o", out, "--ray", "127.0.0.1:1", "--trials", "1")
    assert code == 2 and err.startswith("error: the Ray cluster at 127.0.0.1:1 cannot be reached")
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    code, _, err = run_cli(capsys, "tune", tiny_hf_dir, "-o", out, "--concurrency", "2", "--trials", "1")
    assert code == 2 and "--concurrency needs --ray" in err and not out.exists()


def test_the_front_pools_the_timings_of_repeated_picks():
    """A lucky single timing does not win: repeats of the same picks are one point, at their median (SmolLM2's
    search picked int8 for one 2.83x timing where its repeats gave 2.30-2.41x)."""
    from onnxlm.tune import Trial, pareto

    def trials(picks, timings, first):
        return [Trial(first + i, {"quant": picks}, decode=d, prefill=1.0, size=100) for i, d in enumerate(timings)]

    int8 = trials("int8", [2.83, 2.35, 2.41, 2.35, 2.30], 0)
    int4 = trials("int4-gguf", [2.45, 2.50, 2.40], 10)
    over = [Trial(20, {"quant": "int4-rtn"}, state="over budget", decode=4.0, prefill=1.0, size=90)]
    front = pareto(int8 + int4 + over, ["decode"])
    assert [(t.number, t.picks["quant"], t.decode, t.repeats) for t in front] == [(10, "int4-gguf", 2.45, 3)]
