"""The CUDA execution provider, checked on a CPU-only machine: nothing here runs on a GPU.

What a CPU can check: which piece is missing when `--ep cuda` cannot run, the CUDA session and run options,
the cuda lowering and the fp16 / int4-cuda recipes (their numerics through ORT's CPU kernels), the runtime's
device binding path (the device being the CPU), and the genai_config of a cuda artifact."""

from __future__ import annotations

import dataclasses

import pytest

import onnxlm
from cli_helpers import run_cli
from onnxlm.backends import BACKENDS, get_backend, probe_backend
from onnxlm.backends import cuda as cuda_module
from onnxlm.backends.base import SessionSettings
from onnxlm.backends.cpu import CpuBackend
from onnxlm.errors import OnnxlmError

CUDA = get_backend("cuda")
pytestmark = pytest.mark.skipif(CUDA.available(), reason="these tests check a machine without CUDA")


@pytest.fixture(scope="module")
def cuda_fp32(tiny_hf_dir, tmp_path_factory):
    """The tiny model's fp32 recipe built for cuda on this CPU (--cross): the cuda lowering, checked on the CPU."""
    return onnxlm.optimize(str(tiny_hf_dir), recipe="fp32", output=tmp_path_factory.mktemp("cuda") / "fp32",
                           ep="cuda", cross=True)


def test_optimize_ep_cuda_without_cuda_is_one_line_exit_2_and_writes_nothing_on_cpu(capsys, tiny_hf_dir, tmp_path):
    out = tmp_path / "a"
    code, stdout, stderr = run_cli(capsys, "optimize", tiny_hf_dir, "-o", out, "--ep", "cuda")
    assert code == 2 and stdout == "" and len(stderr.strip().splitlines()) == 1
    assert "onnxruntime-gpu" in stderr and "--cross" in stderr
    assert list(tmp_path.iterdir()) == []  # no artifact, no staging directory


def test_running_a_cuda_artifact_without_cuda_names_the_package_and_the_fallback(capsys, cuda_fp32):
    code, stdout, stderr = run_cli(capsys, "generate", cuda_fp32.directory, "--prompt", "fox",
                                   "--max-new-tokens", "2")
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert "CPU build, without CUDAExecutionProvider" in stderr and "--ep cpu" in stderr
    code, stdout, _ = run_cli(capsys, "generate", cuda_fp32.directory, "--prompt", "fox", "--max-new-tokens", "2",
                              "--ep", "cpu", "--greedy")
    assert code == 0 and stdout


@pytest.fixture
def gpu_build(monkeypatch):
    """onnxruntime as if it were onnxruntime-gpu (it lists CUDAExecutionProvider); the library checks run anew."""
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    cuda_module.cuda_libraries_problem.cache_clear()
    yield
    cuda_module.cuda_libraries_problem.cache_clear()


def test_with_onnxruntime_gpu_but_no_driver_the_error_names_the_driver(gpu_build):
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
        pytest.skip("this machine has an NVIDIA driver")
    except OSError:
        pass
    with pytest.raises(OnnxlmError, match=r"no NVIDIA driver on this machine \(libcuda.so.1"):
        CUDA.require()


def test_with_a_driver_but_without_the_cuda_libraries_the_error_names_the_library(gpu_build, monkeypatch):
    """The driver is pretended (this machine has none); the provider library's real load failure is reported."""
    import ctypes

    real = ctypes.CDLL
    monkeypatch.setattr(cuda_module.ctypes, "CDLL",
                        lambda name, *a, **k: object() if name == "libcuda.so.1" else real(name, *a, **k))
    with pytest.raises(OnnxlmError, match=r"cannot load its CUDA libraries \(.*libonnxruntime_providers_cuda"):
        CUDA.require()


def test_cuda_session_options_capture_only_the_decoder_session():
    assert BACKENDS["cuda"] is CUDA and CUDA.device == "cuda" and probe_backend(CUDA).name == "cpu"
    decoder, cpu = CUDA.session_provider_options(decoder=True)
    assert decoder == {"device_id": "0", "arena_extend_strategy": "kSameAsRequested", "enable_cuda_graph": "1"}
    assert cpu == {}
    assert CUDA.session_provider_options(decoder=False)[0]["enable_cuda_graph"] == "0"
    assert CUDA.run_options(1).get_run_config_entry("gpu_graph_id") == "1"
    assert CUDA.run_options(None).get_run_config_entry("gpu_graph_id") == "-1"  # prefill: uncaptured
    options = CUDA.session_options()
    assert options.intra_op_num_threads == 1 and options.get_session_config_entry(
        "session.intra_op.allow_spinning") == "0"


def test_the_cuda_lowering_is_lossless_on_the_cpu_and_recorded(cuda_fp32):
    manifest = cuda_fp32.manifest
    assert manifest["target"] == {"ep": "cuda", "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                                  "device": "cuda", "probe_providers": ["CPUExecutionProvider"]}
    last = manifest["passes"][-1]
    assert last["name"] == "decode_shapes" and last["matched"] == {"total_sequence_length": 2, "rotary_caches": 1}
    assert last["check"]["max_abs_logit_diff"] <= last["check"]["tolerance"]
    assert "decode_shapes" in manifest["interface"]["features"]


def test_both_onnxruntime_packages_installed_is_named(monkeypatch):
    monkeypatch.setattr(cuda_module, "installed", lambda name: True)
    with pytest.raises(OnnxlmError, match="onnxruntime and onnxruntime-gpu are both installed"):
        CUDA.require()


# -- the runtime's device path, with the CPU as the device ---------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CpuAsDevice(CpuBackend):
    """The CPU EP driven the way the CUDA backend drives a GPU: decode inputs and logits bound as OrtValues
    allocated once per cache, greedy's argmax in an ORT session, captured steps (run options) when the graph allows.
    It runs on the CPU; it proves the binding path, not anything about a GPU."""

    name: str = "cpu-as-device"
    device_binding: bool = True
    graph_capture: bool = True
    runs: list = dataclasses.field(default_factory=list, compare=False, hash=False)

    def run_options(self, graph_id=None):
        self.runs.append(graph_id)  # what a CUDA session would get as gpu_graph_id (None: uncaptured, -1)
        return None


@pytest.fixture
def cpu_as_device(monkeypatch):
    backend = CpuAsDevice()
    monkeypatch.setitem(BACKENDS, backend.name, backend)
    return backend


def greedy_tokens(directory, ep, prompt=(5, 9, 17, 3), n=12):
    from onnxlm.runtime.decoding import Decoding

    art = onnxlm.load(directory, ep=ep)
    return art, list(art.generate_ids(list(prompt), n, ignore_eos=True, decoding=Decoding()))


def test_device_path_on_cpu_greedy_equals_the_host_path_and_decode_is_captured_per_batch(cpu_as_device, cuda_fp32):
    _, host = greedy_tokens(cuda_fp32.directory, "cpu")
    art, device = greedy_tokens(cuda_fp32.directory, cpu_as_device.name)
    assert device == host
    session = art.session
    assert session.captures and session._argmax is not None  # greedy chose on the "device"
    # the prefill ran uncaptured (None -> gpu_graph_id -1), every decode step as batch 1's graph
    assert cpu_as_device.runs[0] is None and set(cpu_as_device.runs[1:]) == {1}
    assert len(cpu_as_device.runs) == 1 + 11


def test_device_path_on_cpu_binds_fixed_ortvalues_and_a_full_width_mask(cpu_as_device, cuda_fp32):
    import numpy as np

    session = onnxlm.load(cuda_fp32.directory, ep=cpu_as_device.name).session
    reference = onnxlm.load(cuda_fp32.directory, ep="cpu").session
    caches = [s.new_cache(capacity=16) for s in (session, reference)]
    for s, cache in zip((session, reference), caches):
        s.step(np.asarray([[5, 9, 17]], np.int64), cache, last_only=True)
    first = session._feeds(caches[0], 1)
    addresses = (first.ids.data_ptr(), first.mask.data_ptr(), first.logits.data_ptr())
    for token in (4, 8, 15):
        ids = np.asarray([[token]], np.int64)
        got, want = session.step(ids, caches[0]), reference.step(ids, caches[1])
        np.testing.assert_allclose(got, want, atol=1e-5)  # total_sequence_length = the buffer's width: the same
        feeds = session._feeds(caches[0], 1)
        assert (feeds.ids.data_ptr(), feeds.mask.data_ptr(), feeds.logits.data_ptr()) == addresses
        assert feeds.mask.shape() == [1, session.info.context_length]  # a captured session's buffers


def test_sampling_on_the_device_path_reads_the_logits_row_on_the_host(cpu_as_device, cuda_fp32):
    from onnxlm.runtime.decoding import Decoding
    from onnxlm.runtime.sampling import SamplingConfig

    decoding = Decoding(mode="sample", sampling=SamplingConfig(temperature=0.8, top_k=20, seed=3))
    runs = [list(onnxlm.load(cuda_fp32.directory, ep=ep).generate_ids([5, 9, 17], 8, ignore_eos=True,
                                                                     decoding=decoding))
            for ep in ("cpu", cpu_as_device.name)]
    assert runs[0] == runs[1]


# -- the cuda recipes, their numerics checked through ORT's CPU kernels ---------------------------------------------

@pytest.fixture(scope="module")
def cuda_fp16(tiny_hf_dir, tmp_path_factory):
    return onnxlm.optimize(str(tiny_hf_dir), recipe="fp16", output=tmp_path_factory.mktemp("cuda") / "fp16",
                           ep="cuda", cross=True)


def report(art, name):
    return next(p for p in art.manifest["passes"] if p["name"] == name)


def test_fp16_reports_its_cost_and_what_the_cpu_ran_in_float32(cuda_fp16):
    check = report(cuda_fp16, "convert_float16")["check"]
    assert abs(check["ppl_after"] / check["ppl_before"] - 1) < 0.01  # measured on ORT's CPU EP
    assert 0 < check["max_abs_logit_diff"] < 5e-3
    assert check["bytes_after"] < 0.55 * check["bytes_before"]
    assert set(check["kept_float32"]) == {"Cast", "MatMul", "Cos", "Sin"}  # the rotary angles from the positions
    # ORT's CPU EP runs MatMul between float32 casts; GroupQueryAttention and the norms ran in float16
    assert "MatMul" in check["probe_float32_ops"]
    assert not {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} & set(check["probe_float32_ops"])


def test_fp16_graph_has_float16_kv_and_logits_and_runs_close_to_fp32_on_cpu(cuda_fp16, cuda_fp32):
    import numpy as np

    half, full = (onnxlm.load(a.directory, ep="cpu").session for a in (cuda_fp16, cuda_fp32))
    assert half.kv_dtype == np.float16 and half.logits_dtype == np.float16 and full.kv_dtype == np.float32
    caches = [s.new_cache(capacity=64) for s in (half, full)]
    assert "float16" in caches[0].values[0].data_type()
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 320, (1, 24), dtype=np.int64)
    got, want = (s.step(prompt, c) for s, c in zip((half, full), caches))
    assert got.dtype == np.float32 and np.abs(got - want).max() < 5e-3
    for token in rng.integers(0, 320, 8):
        got, want = (s.step(np.asarray([[token]], np.int64), c) for s, c in zip((half, full), caches))
        assert np.abs(got - want).max() < 5e-3


def test_fp16_rotary_caches_are_float32_angles_at_every_position(cuda_fp16, tiny_hf_dir):
    import json

    import numpy as np
    import onnx

    graph = onnx.load(str(cuda_fp16.directory / "model.onnx")).graph
    cos = next(onnx.numpy_helper.to_array(t) for t in graph.initializer if t.name == "decode_shapes.cos_cache.0")
    config = json.loads((tiny_hf_dir / "config.json").read_text())
    dim = config["head_dim"]
    theta = config.get("rope_theta", 10000.0)
    angles = np.arange(config["max_position_embeddings"])[:, None] / theta ** (np.arange(0, dim, 2) / dim)
    assert cos.dtype == np.float16 and cos.shape == angles.shape
    # float16 angles would be off by up to 0.25 rad at positions 512..1023
    assert np.abs(cos.astype(np.float64) - np.cos(angles)).max() < 2e-3


def test_int4_cuda_imports_gguf_blocks_with_float16_activations_and_scales(tiny_q4_gguf, tmp_path):
    import onnx

    art = onnxlm.optimize(str(tiny_q4_gguf), recipe="int4-cuda", output=tmp_path / "int4", ep="cuda", cross=True)
    exact = report(art, "quant_gguf_exact")
    assert exact["check"]["weights_bit_identical"] and exact["matched"]["matmul_nbits_q8_0"] == 1
    graph = onnx.load(str(art.directory / "model.onnx")).graph
    types = {t.name: t.data_type for t in graph.initializer}
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert {dict((a.name, a.i) for a in n.attribute)["bits"] for n in nbits} == {4, 8}  # Q4_1 and the Q8_0 head
    assert all(types[n.input[2]] == onnx.TensorProto.FLOAT16 for n in nbits)  # scales
    assert all(dict((a.name, a.i) for a in n.attribute)["accuracy_level"] == 0 for n in nbits)  # float activations
    fp16 = report(art, "convert_float16")["check"]
    assert abs(fp16["ppl_after"] / fp16["ppl_before"] - 1) < 0.01 and fp16["max_abs_logit_diff"] < 5e-3


def test_int4_cuda_on_an_hf_source_is_rtn_int4(tiny_hf_dir, tmp_path):
    art = onnxlm.optimize(str(tiny_hf_dir), recipe="int4-cuda", output=tmp_path / "rtn", ep="cuda", cross=True)
    assert report(art, "quant_weight_only")["matched"]["matmul_nbits"] == 2 * 4 + 1  # qkv, o, gate_up, down; head
    assert art.session.kv_dtype.__name__ == "float16"


def test_genai_config_of_a_cuda_artifact_asks_for_cuda_with_graphs(cuda_fp16, tiny_artifact):
    import json

    import onnx

    config = json.loads((cuda_fp16.directory / "genai_config.json").read_text())
    decoder = config["model"]["decoder"]
    assert decoder["session_options"]["provider_options"] == [{"cuda": {"enable_cuda_graph": "1"}}]
    assert config["search"]["past_present_share_buffer"] is True  # genai's static buffer, bound as past and present
    graph = onnx.load(str(cuda_fp16.directory / decoder["filename"]), load_external_data=False).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]}
    assert types["past_key_values.0.key"] == types["present.0.value"] == types["logits"] == onnx.TensorProto.FLOAT16
    cpu = json.loads((tiny_artifact.directory / "genai_config.json").read_text())
    assert cpu["model"]["decoder"]["session_options"]["provider_options"] == []


def test_genai_runs_the_fp16_cuda_artifact_on_cpu_with_its_providers_cleared(cuda_fp16):
    """onnxruntime-genai (a CPU build here) reads the float16 KV cache and logits from the graph; its cuda
    provider options are dropped for this run, so this checks the graph's interface, not CUDA."""
    og = pytest.importorskip("onnxruntime_genai")
    from onnxlm.runtime.decoding import Decoding

    config = og.Config(str(cuda_fp16.directory))
    config.clear_providers()
    model = og.Model(config)
    params = og.GeneratorParams(model)
    prompt = [5, 9, 17, 3, 40, 71]
    params.set_search_options(do_sample=False, max_length=len(prompt) + 10)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    art = onnxlm.load(cuda_fp16.directory, ep="cpu")
    assert tokens == list(art.generate_ids(prompt, len(tokens), ignore_eos=True, decoding=Decoding()))


def test_the_gpu_check_script_dry_run_runs_on_cpu(tiny_hf_dir, tmp_path):
    """bench/cuda_check.py --dry-run: the prepared GPU script end to end, with the CPU as the device. It checks
    the script, not a GPU (its output says so)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "cuda_check.py"
    done = subprocess.run([sys.executable, str(script), "--dry-run", "--model", str(tiny_hf_dir), "--out",
                           str(tmp_path), "--tokens", "6", "--runs", "1", "--ppl-tokens", "200"],
                          capture_output=True, text=True, env=os.environ, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "cuda_check.json").read_text())
    assert result["device"] == "dry run on the CPU (nothing measured on a GPU)" and result["captured_decode"]
    assert result["agreement_fp16_vs_fp32"]["teacher_forced"] >= 0.5
    assert set(result["speed"]) == {"fp16, graphs on", "fp16, graphs off", "int4-cuda", "fp32 (cpu)"}
    assert result["host_time_per_step"]["host_us"] > 0


def test_when_ort_refuses_graph_capture_decode_runs_uncaptured(monkeypatch, cuda_fp32):
    """ORT fails session creation with enable_cuda_graph when it placed nodes off the GPU; the decoder then
    runs uncaptured and says why (simulated on the CPU: this ORT error is not reproducible without CUDA)."""

    @dataclasses.dataclass(frozen=True)
    class Refusing(CpuAsDevice):
        name: str = "refusing"

        def session(self, path, settings=SessionSettings(), profile=False, decoder=False):
            if decoder:
                raise OnnxlmError(f"ONNX Runtime cannot load {path}: This session cannot use the graph capture "
                                  "feature as requested by the user as all compute graph nodes have not been "
                                  "partitioned to the CUDAExecutionProvider")
            return super().session(path, settings, profile)

    backend = Refusing()
    monkeypatch.setitem(BACKENDS, backend.name, backend)
    art, tokens = greedy_tokens(cuda_fp32.directory, backend.name)
    assert not art.session.captures and "graph capture" in art.session.capture_refused
    assert set(backend.runs) == set()  # no run options: nothing captured
    assert tokens == greedy_tokens(cuda_fp32.directory, "cpu")[1]


def test_the_device_path_imports_no_torch(cuda_fp16):
    """The fp16 artifact through the device binding path (the CPU as the device) in a fresh process."""
    import subprocess
    import sys

    code = (
        "import sys, dataclasses, onnxlm; from onnxlm.backends import BACKENDS, CPU; "
        "BACKENDS['dev'] = dataclasses.replace(CPU, name='dev', device_binding=True); "
        "from onnxlm.runtime.decoding import Decoding; a = onnxlm.load(sys.argv[1], ep='dev'); "
        "print(list(a.generate_ids([5, 9, 17], 4, ignore_eos=True, decoding=Decoding()))); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'runtime imported torch'"
    )
    result = subprocess.run([sys.executable, "-c", code, str(cuda_fp16.directory)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_speculative_prompt_lookup_on_the_device_path_equals_greedy(cpu_as_device, cuda_fp16):
    from onnxlm.runtime.decoding import Decoding

    prompt = [5, 9, 17, 3, 5, 9, 17, 3, 5, 9]
    art = onnxlm.load(cuda_fp16.directory, ep=cpu_as_device.name)
    greedy = list(art.generate_ids(prompt, 12, ignore_eos=True, decoding=Decoding()))
    spec = list(art.generate_ids(prompt, 12, ignore_eos=True,
                                 decoding=Decoding(mode="speculative", prompt_lookup=True)))
    assert spec == greedy


def test_beam_reordering_of_a_cache_without_host_arrays_runs_through_ort(cpu_as_device, cuda_fp16):
    """A cache on a device has no host arrays; its rows are gathered by ORT on that device (here the CPU)."""
    import numpy as np

    session = onnxlm.load(cuda_fp16.directory, ep=cpu_as_device.name).session
    cache = session.new_cache(batch=3, capacity=8)
    session.step(np.asarray([[5, 9, 17], [4, 8, 15], [16, 23, 42]], np.int64), cache)
    before = [v.numpy().copy() for v in cache.values]
    cache.arrays, cache.device_rows = None, session.device_rows  # as on a GPU: no host view of the buffers
    addresses = [v.data_ptr() for v in cache.values]
    cache.reorder(np.array([2, 0, 0]))
    for value, old in zip(cache.values, before):
        np.testing.assert_array_equal(value.numpy(), old[[2, 0, 0]])
    assert [v.data_ptr() for v in cache.values] == addresses  # in place: the binding stays valid


def test_kv_eviction_on_a_cache_without_host_arrays_edits_copies_and_writes_them_back(
        monkeypatch, cpu_as_device, cuda_fp16):
    """sinks-window eviction where the host cannot see the buffers (as on a GPU): the same tokens as on the host."""
    from onnxlm.runtime.decoding import Decoding
    from onnxlm.runtime.kv_policy import KVPolicyConfig
    from onnxlm.runtime.session import DecoderSession

    decoding = Decoding(kv_policy=KVPolicyConfig(name="sinks-window", budget=24, sinks=4, evict_every=8))
    prompt = [5, 9, 17, 3, 40, 71, 12, 8, 99, 7, 6, 5, 4, 3]
    want = list(onnxlm.load(cuda_fp16.directory, ep="cpu").generate_ids(prompt, 30, ignore_eos=True,
                                                                         decoding=decoding))
    new_cache = DecoderSession.new_cache

    def without_host_arrays(self, *args, **kwargs):
        cache = new_cache(self, *args, **kwargs)
        cache.arrays = None
        return cache

    monkeypatch.setattr(DecoderSession, "new_cache", without_host_arrays)
    art = onnxlm.load(cuda_fp16.directory, ep=cpu_as_device.name)
    assert list(art.generate_ids(prompt, 30, ignore_eos=True, decoding=decoding)) == want


def test_a_capturing_session_reuses_one_set_of_buffers_per_batch_size(cpu_as_device, cuda_fp32):
    """A captured graph replays the addresses it was captured with: every cache of a batch size is the same
    context-long buffers, and generations one after another still give the host path's tokens."""
    from onnxlm.runtime.decoding import Decoding

    art = onnxlm.load(cuda_fp32.directory, ep=cpu_as_device.name)
    host = onnxlm.load(cuda_fp32.directory, ep="cpu")
    first, second = art.session.new_cache(capacity=16), art.session.new_cache(capacity=40)
    assert first.capacity == second.capacity == art.info.context_length
    assert [v.data_ptr() for v in first.values] == [v.data_ptr() for v in second.values]
    assert first.decode_feeds is second.decode_feeds
    assert art.session.new_cache(batch=2).values[0].data_ptr() != first.values[0].data_ptr()
    for prompt in ([5, 9, 17, 3], [40, 71, 12], [5, 9, 17, 3]):
        want = list(host.generate_ids(prompt, 10, ignore_eos=True, decoding=Decoding()))
        assert list(art.generate_ids(prompt, 10, ignore_eos=True, decoding=Decoding())) == want


def test_fp16_of_the_plain_export_computes_the_rotary_angles_in_float32(tiny_hf_dir, tmp_path):
    """On the plain export the rotary angles feed the rotate-half Muls directly: from the positions' Cast to float
    to Cos/Sin, nothing may pass through float16 (positions 512..1023 would put the angles off by up to 0.25 rad;
    the tiny model's logits are too flat to show it, so the graph is checked)."""
    import json

    import onnx_ir as ir

    from onnxlm.passes.quant.float16 import rotary_angle_nodes

    recipe = tmp_path / "plain16.json"
    recipe.write_text(json.dumps({"name": "plain16", "passes": [
        {"pass": "cleanup"}, {"pass": "logits_to_keep"}, {"pass": "convert_float16"}]}))
    art = onnxlm.optimize(str(tiny_hf_dir), recipe=str(recipe), output=tmp_path / "a")
    graph = ir.load(art.directory / "model.onnx").graph
    angles = rotary_angle_nodes(graph)
    assert {n.op_type for n in angles} >= {"Cos", "Sin", "Cast"}
    for node in angles:
        for value in node.inputs:
            if value is not None and value.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
                assert value.dtype == ir.DataType.FLOAT, f"{node.op_type} reads float16 {value.name}"
