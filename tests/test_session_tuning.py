"""Session tuning: options recorded in the manifest are applied at load on the machine that measured them, and
replaced by an explicit choice; `onnxlm tune-session` records its choice; `onnxlm tune` searches them and records
the best trial's in best/."""

import json
import logging
import shutil

import pytest
from cli_helpers import run_cli

import onnxlm
from onnxlm.backends.base import SessionSettings
from onnxlm.errors import OnnxlmError
from onnxlm.runtime.session_settings import this_machine
from onnxlm.tune_session import record

SPINNING = "session.intra_op.allow_spinning"
TUNED = SessionSettings(threads=1, spinning=False, pinning="none")


@pytest.fixture
def artifact(tiny_artifact, tmp_path):
    """A copy of the tiny fp32 artifact whose manifest a test may change."""
    return shutil.copytree(tiny_artifact.directory, tmp_path / "art")


def ort_options(art):
    options = art.session.session.get_session_options()
    return options.intra_op_num_threads, options.get_session_config_entry(SPINNING)


def test_recorded_options_apply_at_load_and_an_explicit_choice_replaces_them(artifact):
    assert ort_options(onnxlm.load(artifact)) == (0, "1")  # nothing recorded: ORT's defaults
    record(artifact, TUNED, [{"options": TUNED.to_dict(), "decode_tok_s": 1.0}])
    art = onnxlm.load(artifact)
    assert art.session.settings == TUNED and ort_options(art) == (1, "0")
    explicit = onnxlm.load(artifact, threads=2)  # --threads: the recorded options are not used at all
    assert explicit.session.settings == SessionSettings(threads=2)
    assert explicit.session.settings.spinning and ort_options(explicit)[1] == "1"
    given = SessionSettings(threads=2, pinning="compact")
    assert onnxlm.load(artifact, session=given).session.settings == given
    record(artifact, SessionSettings(threads=1, pinning="none"))
    turns = onnxlm.load(artifact, spinning=False)  # sessions that take turns: spinning off on top
    assert turns.session.settings == SessionSettings(threads=1, spinning=False, pinning="none")
    with pytest.raises(OnnxlmError, match="threads or session settings, not both"):
        onnxlm.load(artifact, threads=1, session=given)
    record(artifact, None)
    assert "session" not in json.loads((artifact / "manifest.json").read_text())


def test_options_measured_on_another_machine_are_ignored_with_one_warning(artifact, caplog):
    record(artifact, TUNED, machine={"cpu": "Some Other CPU", "cores": this_machine()["cores"] + 1})
    with caplog.at_level(logging.WARNING, logger="onnxlm.runtime.session_settings"):
        first, second = onnxlm.load(artifact), onnxlm.load(artifact)
    assert first.session.settings == second.session.settings == SessionSettings()
    warnings = [r.getMessage() for r in caplog.records if "measured on Some Other CPU" in r.getMessage()]
    assert len(warnings) == 1 and "using the defaults" in warnings[0]


def test_tune_session_records_its_choice_and_bad_input_is_one_line(artifact, capsys):
    code, stdout, err = run_cli(capsys, "tune-session", artifact, "--runs", "1", "--threads", "1", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    entry = json.loads((artifact / "manifest.json").read_text())["session"]
    assert entry["options"] == result["chosen"] and entry["machine"] == this_machine()
    tried = [row["options"] for row in entry["measured"]]
    assert tried[0] == SessionSettings().to_dict() and result["chosen"] in tried
    assert {"threads": 1, "spinning": True, "pinning": "none", "parallel": False, "inter_op_threads": None} in tried
    assert onnxlm.load(artifact).session.settings == SessionSettings.from_dict(result["chosen"])
    before = (artifact / "manifest.json").read_bytes()
    for bad in (["--min-gain", "nan"], ["--objective", "speed"]):
        code, _, err = run_cli(capsys, "tune-session", artifact, *bad)
        assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: --")
    assert (artifact / "manifest.json").read_bytes() == before
    code, _, _ = run_cli(capsys, "tune-session", artifact, "--clear")
    assert code == 0 and "session" not in json.loads((artifact / "manifest.json").read_text())


def test_a_search_over_session_options_records_the_best_trials_in_best(tiny_hf_dir, tmp_path, capsys):
    choices = {"one": {"threads": 1, "pinning": "none"}, "two-quiet": {"threads": 2, "spinning": False}}
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"dimensions": [{"name": "quant", "choices": {"fp32": []}},
                                                {"name": "session", "session": choices}]}))
    out = tmp_path / "tune"
    code, _, err = run_cli(capsys, "tune", tiny_hf_dir, "-o", out, "--space", space, "--trials", "2",
                           "--max-ppl-increase", "1000", "--runs", "1")
    assert code == 0, err
    best = json.loads((out / "pareto.json").read_text())["trials"][0]  # one recipe: the faster options win
    recorded = json.loads((out / "best" / "manifest.json").read_text())["session"]
    assert recorded["options"] == SessionSettings.from_dict(choices[best["picks"]["session"]]).to_dict()
    assert recorded["machine"] == this_machine()
    assert onnxlm.load(out / "best").session.settings.to_dict() == recorded["options"]
    code, _, err = run_cli(capsys, "tune", tiny_hf_dir, "-o", tmp_path / "again", "--space", space, "--threads", "1")
    assert code == 2 and "--threads and a session dimension" in err and not (tmp_path / "again").exists()


@pytest.mark.parametrize("budget", ["-5", "nan"])
def test_a_bad_time_budget_is_one_line_and_writes_nothing(tiny_hf_dir, tmp_path, capsys, budget):
    out = tmp_path / "tune"
    code, _, err = run_cli(capsys, "tune", tiny_hf_dir, "-o", out, f"--time-budget={budget}", "--trials", "1")
    assert code == 2 and err.strip() == f"error: --time-budget must be a number of seconds > 0, got {float(budget)}"
    assert not out.exists()


def test_bad_session_dimensions_are_one_line():
    from onnxlm.tune import Space

    with pytest.raises(OnnxlmError, match="unknown key"):
        Space.from_dict({"dimensions": [{"name": "s", "session": {"x": {"threadz": 2}}}]})
    with pytest.raises(OnnxlmError, match="unknown pinning 'spread'"):
        Space.from_dict({"dimensions": [{"name": "s", "session": {"x": {"pinning": "spread"}}}]})
    with pytest.raises(OnnxlmError, match="non-empty 'choices'"):
        Space.from_dict({"dimensions": [{"name": "s", "session": {}}]})
    space = Space.from_dict({"dimensions": [{"name": "s", "session": "auto"}]})
    assert list(space.sessions["s"])[0] == "ortt-spin-default" and space.recipe({"s": "ortt-spin-default"}).passes
