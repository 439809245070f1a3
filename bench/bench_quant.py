"""Quantization benchmark: every quantization recipe against fp32 and the onnxruntime-genai builder's int4 (and
fp32) export of the same checkpoint, on SmolLM2-135M. One process, round-robin, medians; PPL on GPL-3.

Artifacts are read from out/<recipe> (built with `onnxlm optimize -o out/<recipe> --recipe <recipe>`,
`--recipe nested --budget-bits B` into out/nested-<B>, `--recipe int4-rtn --block-size B` into out/int4-rtn-b<B>); genai's exports come from bench/.cache (see
bench/bench_lowering.py for the builder venv; here `-p int4`). llama.cpp runs the same GGUF file when
llama-cpp-python is installed (built natively: see bench/common.py, llama_cpp_model), timed in the same rounds on
the same prompt token ids, its PPL scored through its API on the same token ids and windows. Writes the `quant`
section of docs/benchmarks.md and docs/quant-ppl-vs-speed.png (needs matplotlib).
    python bench/bench_quant.py --runs 5 --threads 2 [--recipes int4-rtn int4 int4-fast]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import onnxlm  # noqa: E402
from onnxlm.passes.evaluate import open_session, session_perplexity  # noqa: E402
from onnxlm.runtime.bench import NEW_TOKENS, PREFILL_TOKENS, PROMPT_TOKENS, bench_prompt  # noqa: E402
from onnxlm.runtime.generate import generate_tokens  # noqa: E402

from bench_lowering import CACHE, ensure_genai_export  # noqa: E402
from common import GPL3, ROOT, dir_size, genai_generation, genai_model, genai_timing, llama_cpp_model, llama_cpp_perplexity, llama_cpp_timing, machine, median_ratio, medians, onnxlm_timing, publish, round_robin  # noqa: E402

RECIPES = ["fp32", "int8", "int8-dynamic", "int4-rtn", "int4-rtn-b64", "int4-rtn-b128", "int4-calibrated", "int4",
           "int4-fast", "nested-3", "nested-4", "nested-5"]
LABELS = {"int8": "int8 weight-only", "int8-dynamic": "int8 dynamic", "int4-rtn": "int4 RTN", "int4-rtn-b64": "int4 RTN, block 64", "int4-rtn-b128": "int4 RTN, block 128",
          "int4-calibrated": "int4 calibrated (GPTQ)", "int4": "int4 GGUF-exact", "int4-fast": "int4 GGUF-exact, int8 act.",
          "nested-3": "nested, 3 bits", "nested-4": "nested, 4 bits", "nested-5": "nested, 5 bits"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ppl-tokens", type=int, default=4096)
    parser.add_argument("--recipes", nargs="*", default=RECIPES, help="the onnxlm rows to run (default: all built)")
    parser.add_argument("--section", default="quant", help="the docs/benchmarks.md section to write")
    parser.add_argument("--out", type=Path, default=ROOT / "out",
                        help="where the artifacts are (DIR/<recipe>); llama.cpp runs the GGUF that DIR/fp32 came from")
    args = parser.parse_args()

    recipes = list(dict.fromkeys(["fp32", *args.recipes]))
    arts = {r: onnxlm.load(args.out / r, threads=args.threads) for r in recipes if (args.out / r).is_dir()}
    missing = [r for r in recipes if r not in arts]
    genai_dirs = {"genai builder int4": ensure_genai_export(CACHE / "genai-int4", "int4"),
                  "genai builder fp32": ensure_genai_export(CACHE / "genai-fp32")}
    genai = {name: genai_model(d, args.threads) for name, d in genai_dirs.items()}
    tokenizer = arts["fp32"].tokenizer
    short, long = bench_prompt(tokenizer, PROMPT_TOKENS), bench_prompt(tokenizer, PREFILL_TOKENS)

    systems = {f"onnxlm `{r}`": (lambda a=a: onnxlm_timing(a, short, long)) for r, a in arts.items()}
    systems.update({name: (lambda m=m: genai_timing(m, short, long)) for name, m in genai.items()})
    gguf = Path(arts["fp32"].manifest["source"]["path"])  # the same file, the same prompt token ids
    llama = llama_cpp_model(gguf, args.threads)
    if llama is not None:
        systems[LLAMA] = lambda: llama_cpp_timing(llama, short, long)
    runs = round_robin(systems, args.runs)
    med = medians(runs)

    ids = tokenizer.encode(GPL3.read_text(), add_bos=False)[:args.ppl_tokens]
    ppl = {f"onnxlm `{r}`": a.perplexity(GPL3, max_tokens=args.ppl_tokens)["ppl"] for r, a in arts.items()}
    for name, d in genai_dirs.items():  # genai's graph under plain ORT, fed onnxlm's token ids
        ppl[name] = session_perplexity(open_session(d / "model.onnx", args.threads), arts["fp32"].info, ids)
    sizes = {f"onnxlm `{r}`": dir_size(args.out / r) for r in arts}
    sizes.update({name: dir_size(d) for name, d in genai_dirs.items()})
    if llama is not None:
        del llama  # scored by a second instance that keeps the logits of every position
        ppl[LLAMA] = llama_cpp_perplexity(llama_cpp_model(gguf, args.threads, logits_all=True), ids)
        sizes[LLAMA] = gguf.stat().st_size
    reference = list(generate_tokens(arts["fp32"].session, short, NEW_TOKENS))
    agree = {f"onnxlm `{r}`": sum(x == y for x, y in zip(generate_tokens(a.session, short, NEW_TOKENS), reference))
             for r, a in arts.items()}
    agree.update({name: sum(x == y for x, y in zip(genai_generation(m, short, NEW_TOKENS)[2], reference))
                  for name, m in genai.items()})
    if LLAMA in ppl:
        agree[LLAMA] = sum(x == y for x, y in zip(llama_cpp_tokens(gguf, args.threads, short), reference))

    base_ppl = ppl["onnxlm `fp32`"]
    lines = [
        f"Machine: {machine()}. Threads: {args.threads}. Medians of {args.runs} round-robin runs in one process; "
        "ratios are medians of the per-round ratios.",
        f"onnxruntime {onnxlm.artifact.package_versions().get('onnxruntime')}, onnxruntime-genai 0.18.0. PPL: GPL-3, "
        f"first {len(ids)} tokens (GGUF `smollm` tokenizer), 512-token windows. Source: {gguf.name}.",
        "",
        "| system | PPL | vs fp32 | size MB | decode tok/s | vs genai int4 |" + (" vs llama.cpp |" if LLAMA in ppl else "")
        + " TTFT | prefill 512 | vs fp32 | greedy = fp32 (128) |",
        "|---|---|---|---|---|---|" + ("---|" if LLAMA in ppl else "") + "---|---|---|---|",
    ]
    for name, (t, d, p) in med.items():
        versus_llama = f" {median_ratio(runs, name, LLAMA):.2f}x |" if LLAMA in ppl else ""
        lines.append(f"| {name} | {ppl[name]:.3f} | {(ppl[name] / base_ppl - 1) * 100:+.2f}% | {sizes[name] / 1e6:.0f} | "
                     f"{d:.1f} | {median_ratio(runs, name, 'genai builder int4'):.2f}x |{versus_llama} {t * 1000:.0f} ms | "
                     f"{p:.3f} s | {median_ratio(runs, name, 'onnxlm `fp32`', field=2):.2f}x | {agree[name]}/{len(reference)} |")
    if missing:
        lines += ["", f"Not built, so not measured: {', '.join(missing)}."]
    if LLAMA not in ppl:
        lines += ["", "llama.cpp: llama_cpp is not installed, so not measured (see bench/common.py: llama_cpp_model)."]
    command = f"python bench/bench_quant.py --runs {args.runs} --threads {args.threads}"
    if args.recipes != RECIPES:
        command += f" --recipes {' '.join(args.recipes)} --section {args.section}"
    if args.out != ROOT / "out":
        command += f" --out {args.out}"
    publish(args.section, lines, command)
    plot(med, ppl, ROOT / "docs" / "quant-ppl-vs-speed.png")


LLAMA = "llama.cpp (same GGUF)"


def llama_cpp_tokens(gguf: Path, threads: int, prompt: list[int]) -> list[int]:
    llm = llama_cpp_model(gguf, threads)
    tokens = []
    for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        tokens.append(int(token))
        if len(tokens) == NEW_TOKENS:
            return tokens
    return tokens


def plot(med: dict, ppl: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (_, decode, _) in med.items():
        genai = not name.startswith("onnxlm")
        ax.scatter(decode, ppl[name], marker="s" if genai else "o", color="tab:red" if genai else "tab:blue")
        ax.annotate(name.replace("onnxlm ", "").replace("`", ""), (decode, ppl[name]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("decode tok/s (2 threads)")
    ax.set_yscale("log")  # nested-3 is off by orders of magnitude; the rest sit between 24 and 40
    ax.set_ylabel("PPL, GPL-3 (log scale, lower is better)")
    ax.set_title("SmolLM2-135M: PPL against decode speed")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
