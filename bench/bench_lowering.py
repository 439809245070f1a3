"""Lowering benchmark: the lowered `fp32` artifact against the plain export and the onnxruntime-genai builder's
own fp32 export of the same checkpoint, on SmolLM2-135M. One process, round-robin, medians.

Rows: onnxlm runtime on `fp32` and on `fp32-plain`; genai's runtime on onnxlm's `fp32` artifact and on genai's
export. Greedy tokens over 128 steps are compared with the onnxlm `fp32` run; PPL of `fp32` against `fp32-plain`.

genai's builder needs transformers >= 5, so it runs from its own venv (onnxlm pins 4.57):
    python3 -m venv bench/.cache/genai-venv
    bench/.cache/genai-venv/bin/pip install torch==2.13.0 "transformers>=5" onnxruntime-genai==0.18.0 onnxruntime==1.32.0 onnx onnx-ir
This script saves the HF checkpoint (the GGUF's dequantized weights) and runs the builder when its output is
missing. Then:
    python bench/bench_lowering.py --runs 5 --threads 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import onnxlm  # noqa: E402
from onnxlm.runtime.bench import NEW_TOKENS, PREFILL_TOKENS, PROMPT_TOKENS, bench_prompt  # noqa: E402
from onnxlm.runtime.generate import generate_tokens  # noqa: E402

from common import GPL3, ROOT, dir_size, genai_generation, genai_model, genai_timing, machine, medians, onnxlm_timing, publish, round_robin  # noqa: E402

CACHE = ROOT / "bench" / ".cache"


def ensure_artifact(path: Path, recipe: str):
    if not (path / "manifest.json").is_file():
        print(f"building {path} ({recipe}) ...", flush=True)
        onnxlm.optimize("smollm2-135m", recipe=recipe, output=path)
    return path


def ensure_genai_export(out: Path, precision: str = "fp32") -> Path:
    """The genai builder's export of the same weights (the GGUF, dequantized, saved as an HF checkpoint)."""
    if (out / "genai_config.json").is_file():
        return out
    hf = CACHE / "smollm2-hf"
    if not (hf / "config.json").is_file():
        from onnxlm.frontend import load_source

        src = load_source("smollm2-135m")
        src.torch_model.save_pretrained(hf)
        src.tokenizer.save(str(hf / "tokenizer.json"))
    python = CACHE / "genai-venv" / "bin" / "python"
    subprocess.run([str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                    "-p", precision, "-e", "cpu", "-c", str(CACHE / "hf-cache")],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def op_counts(model_path: Path) -> dict[str, int]:
    import collections

    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return dict(collections.Counter(n.op_type for n in model.graph.node).most_common())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ppl-tokens", type=int, default=4096)
    args = parser.parse_args()

    lowered_dir = ensure_artifact(ROOT / "out" / "fp32", "fp32")
    plain_dir = ensure_artifact(ROOT / "out" / "fp32-plain", "fp32-plain")
    genai_dir = ensure_genai_export(CACHE / "genai-fp32")
    lowered = onnxlm.load(lowered_dir, threads=args.threads)
    plain = onnxlm.load(plain_dir, threads=args.threads)
    genai_on_ours = genai_model(lowered_dir, args.threads)
    genai_own = genai_model(genai_dir, args.threads)

    short = bench_prompt(lowered.tokenizer, PROMPT_TOKENS)
    long = bench_prompt(lowered.tokenizer, PREFILL_TOKENS)

    systems = {
        "onnxlm `fp32` (lowered), onnxlm runtime": lambda: onnxlm_timing(lowered, short, long),
        "onnxlm `fp32-plain`, onnxlm runtime": lambda: onnxlm_timing(plain, short, long),
        "onnxlm `fp32` (lowered), genai runtime": lambda: genai_timing(genai_on_ours, short, long),
        "genai builder fp32, genai runtime": lambda: genai_timing(genai_own, short, long),
    }
    med = medians(round_robin(systems, args.runs))

    reference = list(generate_tokens(lowered.session, short, NEW_TOKENS))
    tokens = {
        "onnxlm `fp32` (lowered), onnxlm runtime": reference,
        "onnxlm `fp32-plain`, onnxlm runtime": list(generate_tokens(plain.session, short, NEW_TOKENS)),
        "onnxlm `fp32` (lowered), genai runtime": genai_generation(genai_on_ours, short, NEW_TOKENS)[2],
        "genai builder fp32, genai runtime": genai_generation(genai_own, short, NEW_TOKENS)[2],
    }
    ppl_lowered = lowered.perplexity(GPL3, max_tokens=args.ppl_tokens)["ppl"]
    ppl_plain = plain.perplexity(GPL3, max_tokens=args.ppl_tokens)["ppl"]

    genai_decode = med["genai builder fp32, genai runtime"][1]
    genai_prefill_s = med["genai builder fp32, genai runtime"][2]
    ours = med["onnxlm `fp32` (lowered), onnxlm runtime"]
    ops = lowered.manifest["op_histogram"]
    genai_ops = op_counts(genai_dir / "model.onnx")
    sizes = {"onnxlm `fp32` (lowered)": dir_size(lowered_dir), "genai builder fp32": dir_size(genai_dir)}

    lines = [
        f"Machine: {machine()}. Threads: {args.threads}. Medians of {args.runs} round-robin runs in one process.",
        f"onnxruntime {onnxlm.artifact.package_versions().get('onnxruntime')}, onnxruntime-genai 0.18.0.",
        "",
        "| system | decode tok/s | TTFT (32 tokens) | prefill 512 | greedy tokens equal to onnxlm `fp32` (128) |",
        "|---|---|---|---|---|",
    ]
    for name, (t, d, p) in med.items():
        same = sum(a == b for a, b in zip(tokens[name], reference))
        lines.append(f"| {name} | {d:.1f} | {t * 1000:.0f} ms | {p:.3f} s | {same}/{len(reference)} |")
    lines += [
        "",
        f"- Decode: onnxlm `fp32` is **{ours[1] / genai_decode:.2f}x** genai's fp32 (target >= 1.0x).",
        f"- Prefill-512: onnxlm `fp32` takes **{ours[2] / genai_prefill_s:.2f}x** genai's time (target <= 1.05x).",
        f"- PPL (GPL-3, {args.ppl_tokens} tokens, 512 windows): `fp32` {ppl_lowered:.5f}, `fp32-plain` {ppl_plain:.5f}, "
        f"difference {abs(ppl_lowered / ppl_plain - 1) * 100:.5f}% (target <= 0.01%).",
        f"- Size: " + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in sizes.items()) + ".",
        f"- onnxlm `fp32` ops: " + ", ".join(f"{k.split('::')[-1]} {v}" for k, v in ops.items() if v > 1) + ".",
        f"- genai fp32 ops: " + ", ".join(f"{k} {v}" for k, v in genai_ops.items() if v > 1) + ".",
    ]
    publish("lowering", lines, f"python bench/bench_lowering.py --runs {args.runs} --threads {args.threads}")


if __name__ == "__main__":
    main()
