"""A backend is a seam: its lowering passes join the checked recipe, the manifest records it as the target, the
probe falls back to the CPU when this machine lacks the EP, and the runtime runs on the target by default."""

import dataclasses

import pytest

import onnxlm
from onnxlm.backends import BACKENDS, CPU, get_backend, probe_backend
from onnxlm.backends.cpu import CpuBackend
from onnxlm.errors import OnnxlmError


@dataclasses.dataclass(frozen=True)
class Absent(CpuBackend):
    """An EP this onnxruntime does not have, lowering with one more (lossless) cleanup."""

    name: str = "absent"
    providers: tuple = ("AbsentExecutionProvider", "CPUExecutionProvider")
    lowering: tuple = ({"pass": "cleanup"},)


@pytest.fixture(scope="module")
def absent_artifact(tiny_hf_dir, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(BACKENDS, "absent", Absent())
        out = tmp_path_factory.mktemp("absent") / "a"
        onnxlm.optimize(str(tiny_hf_dir), recipe="fp32-plain", output=out, ep="absent", progress=print,
                        cross=True)
    return out


def test_cpu_is_the_probe_when_the_target_is_absent():
    assert probe_backend(get_backend("cpu")) is CPU and probe_backend(Absent()) is CPU


def test_lowering_passes_run_in_the_checked_pipeline_and_the_target_is_recorded(absent_artifact):
    manifest = onnxlm.artifact.read_manifest(absent_artifact)
    assert [p["pass"] for p in manifest["recipe"]["passes"]] == ["cleanup", "logits_to_keep", "cleanup"]
    last = manifest["passes"][-1]
    assert last["name"] == "cleanup" and last["check"]["max_abs_logit_diff"] <= last["check"]["tolerance"]
    assert manifest["target"] == {"ep": "absent", "providers": ["AbsentExecutionProvider", "CPUExecutionProvider"],
                                  "device": "cpu", "probe_providers": ["CPUExecutionProvider"]}


def test_the_runtime_runs_on_the_target_unless_told(absent_artifact):
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(BACKENDS, "absent", Absent())
        with pytest.raises(OnnxlmError, match="no AbsentExecutionProvider.*--ep cpu"):
            onnxlm.load(absent_artifact)
    art = onnxlm.load(absent_artifact, ep="cpu")
    assert art.session.backend is CPU and art.generate("fox", max_new_tokens=2, decoding=None)


def test_an_unknown_ep_is_one_line():
    with pytest.raises(OnnxlmError, match="unknown execution provider 'npu' \\(available: cpu"):
        get_backend("npu")
