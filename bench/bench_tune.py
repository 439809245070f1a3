"""`onnxlm tune`, vocabulary trimming and session tuning on SmolLM2-135M (issue 23's measurements).

    python bench/bench_tune.py --part search --trials 40    # section tune: the search, its front and PNG, and the
                                                           # best recipe against int4 and int4-rtn, round-robin
    python bench/bench_tune.py --part trim                  # section trim-vocab: two vocabulary sizes
    python bench/bench_tune.py --part session               # section session: tune-session's table, fp32 and int4

Artifacts are read from --out (default out/: out/fp32, out/int4, out/int4-rtn, built with `onnxlm optimize -o
out/<recipe> --recipe <recipe>`) and never changed; what this script builds goes under --work (default
/tmp/onnxlm-bench-tune: the search's DIR, which a second run resumes, and the trimmed artifacts). Timing is
round-robin in one process, medians, ratios are medians of per-round ratios; PPL is onnxlm's eval protocol on the
GPL-3 (held out: no search or trim reads it). --print-only prints the tables without writing docs/ (for a trial
run on a tiny model: --model DIR --out DIR --compare int4-rtn).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import onnxlm  # noqa: E402
from onnxlm.runtime.bench import PREFILL_TOKENS, PROMPT_TOKENS, bench_prompt  # noqa: E402

from common import GPL3, ROOT, dir_size, machine, median_ratio, medians, onnxlm_timing, publish, round_robin  # noqa: E402

CAP = 16384
WORK = Path("/tmp/onnxlm-bench-tune")
VIM_DOCS = sorted(Path("/usr/share").glob("vim/vim*/doc/*.txt"))  # ~9.5 MB of English help text (Debian's vim)


def output(args, section: str, lines: list[str], command: str) -> None:
    if args.print_only:
        print("\n".join([*lines, "", f"Command: `{command}`"]))
    else:
        publish(section, lines, command)


def command_line(args, part: str, extra: str = "") -> str:
    line = f"python bench/bench_tune.py --part {part} --runs {args.runs} --threads {args.threads}{extra}"
    if args.model != "smollm2-135m":
        line += f" --model {args.model}"
    line += f" --out {args.out}" if args.out != ROOT / "out" else ""
    return line + (f" --work {args.work}" if args.work != WORK else "")


def ppl_per_reference_token(art, text: str, reference_tokens: int) -> float:
    """PPL of `text` as the total NLL over the untrimmed tokenizer's token count (what `onnxlm tune` compares):
    a trimmed tokenizer's extra byte tokens do not flatter it."""
    result = art.perplexity(text=text, max_tokens=1 << 30)
    return math.exp(result["nll"] * result["scored_tokens"] / reference_tokens)


def search_part(args) -> None:
    """The 40-trial search under +2% PPL (default space), its Pareto table and PNG, then its best artifact's speed
    against the built int4 and int4-rtn artifacts in one round-robin run (PPL on the GPL-3)."""
    from onnxlm.tune import tune

    directory = args.work / "tune"
    result = tune(args.model, directory, ["decode"], args.max_ppl_increase, args.trials, runs=args.runs,
                  threads=args.threads, say=lambda m: print(m, flush=True))
    trials = sorted(result["trials"], key=lambda t: t.number)
    front = {t.number for t in result["pareto"]}
    best = result["best"]
    lines = [f"Machine: {machine()}. Threads: {args.threads}. {len(trials)} trials (this run; `study.db` keeps earlier "
             f"ones) over the default space, objective decode, budget +{args.max_ppl_increase:g}% PPL on the calibration "
             f"text; speed ratios are medians of {args.runs} round-robin rounds against the reference (`fp32`).", "",
             "| trial | picks | state | decode x ref | prefill x ref | PPL +% | MB | front |",
             "|---|---|---|---|---|---|---|---|"]
    for t in trials:
        picks = ", ".join(f"{k}={v}" for k, v in t.picks.items())
        state = t.state + (f": {t.reason}" if t.reason else "") + (", best" if best and t.number == best.number else "")
        lines.append(f"| {t.number} | {picks} | {state} | {t.decode:.2f} | {t.prefill:.2f} | {t.ppl_increase:+.2f} | "
                     f"{t.size / 1e6:.1f} | {'yes' if t.number in front else ''} |")
    png = directory / "pareto.png"
    if png.is_file() and not args.print_only:
        shutil.copyfile(png, ROOT / "docs" / "tune-pareto.png")
        lines += ["", "![tune Pareto front](tune-pareto.png)"]
    lines += ["", *result["notes"]]
    if best is not None:
        arts = {"tune best": onnxlm.load(directory / "best", threads=args.threads)}
        arts.update({f"`{r}`": onnxlm.load(args.out / r, threads=args.threads) for r in args.compare
                     if (args.out / r).is_dir()})
        lines += ["", f"Best recipe ({', '.join(f'{k}={v}' for k, v in best.picks.items())}) against the built "
                      f"recipes, one round-robin run of {args.runs} rounds; PPL on the GPL-3 (first 4096 tokens):", "",
                  "| artifact | decode tok/s | x tune best | prefill 512 s | TTFT ms | PPL (GPL-3) | MB |",
                  "|---|---|---|---|---|---|---|"]
        lines += timing_rows(arts, args.runs, "tune best")
    output(args, "tune", lines, command_line(args, "search", f" --trials {args.trials}"))


def timing_rows(arts: dict, runs: int, baseline: str) -> list[str]:
    results = timed(arts, runs)
    med = medians(results)
    rows = []
    for name, art in arts.items():
        ttft, decode, prefill = med[name]
        ppl = art.perplexity(GPL3, max_tokens=4096)["ppl"]
        rows.append(f"| {name} | {decode:.1f} | {median_ratio(results, name, baseline):.2f} | {prefill:.3f} | "
                    f"{ttft * 1000:.0f} | {ppl:.3f} | {dir_size(art.directory) / 1e6:.1f} |")
    return rows


def timed(arts: dict, runs: int) -> dict:
    """round_robin of (TTFT, decode tok/s, prefill s); each artifact's prompts in its own tokenizer's ids (a trimmed
    one renumbers them), of the same lengths."""
    def timing(art):
        short, long = bench_prompt(art.tokenizer, PROMPT_TOKENS), bench_prompt(art.tokenizer, PREFILL_TOKENS)
        return lambda: onnxlm_timing(art, short, long)

    return round_robin({name: timing(a) for name, a in arts.items()}, runs)


def trim_part(args) -> None:
    """trim_vocab at two sizes: every token of the built-in calibration text, and the 16k most frequent tokens of
    a large English corpus (--corpus); OOV rate, PPL (per untrimmed token) and decode/prefill against fp32."""
    import json

    from onnxlm.api import CALIBRATION_TEXT
    from onnxlm.passes.recipe import Recipe, load_recipe
    from onnxlm.passes.registry import make_pass
    from onnxlm.schema import read_text

    corpus = args.corpus or write_corpus(args.work / "corpus.txt")
    sizes = {"calibration text": {"pass": "trim_vocab"},
             f"{CAP // 1024}k cap of {corpus.name}": {"pass": "trim_vocab", "corpus": str(corpus), "max_vocab": CAP}}
    full = onnxlm.load(args.out / "fp32", threads=args.threads)
    arts = {"untrimmed `fp32`": full}
    for label, spec in sizes.items():
        target = args.work / ("trim-" + label.split()[0])
        if not (target / "manifest.json").is_file():
            recipe = Recipe(f"fp32-trim-{label.split()[0]}", label, load_recipe("fp32").passes)
            recipe = recipe.inserting([make_pass(spec)], where="earliest")
            path = args.work / f"{target.name}.json"
            path.write_text(json.dumps(recipe.to_dict()))
            print(f"building {target}", flush=True)
            onnxlm.optimize(args.model, recipe=str(path), output=target, overwrite=True)
        arts[label] = onnxlm.load(target, threads=args.threads)
    texts = {"calibration": read_text(CALIBRATION_TEXT), "GPL-3": read_text(GPL3)}
    reference = {k: full.tokenizer.encode(t, add_bos=False) for k, t in texts.items()}
    lines = [f"Machine: {machine()}. Threads: {args.threads}. Recipe `fp32` with `trim_vocab` after the first cleanup; "
             f"corpus of the cap: {corpus} ({len(full.tokenizer.encode(read_text(corpus), add_bos=False)):,} tokens). "
             "OOV: the share of the untrimmed tokenizer's tokens of a text that the trimmed vocabulary dropped; PPL "
             "per untrimmed token (total NLL over the untrimmed token count). Speed: medians of "
             f"{args.runs} round-robin rounds, ratios to the untrimmed artifact.", "",
             "| vocabulary | tokens kept | MB | OOV calibration | OOV GPL-3 | PPL calibration | PPL GPL-3 | decode tok/s | "
             "decode x fp32 | prefill x fp32 |", "|---|---|---|---|---|---|---|---|---|---|"]
    results = timed(arts, args.runs)
    med = medians(results)
    for name, art in arts.items():
        kept = kept_ids(art)
        oov = {k: (sum(i not in kept for i in ids) / len(ids) if kept is not None else 0.0) for k, ids in reference.items()}
        ppl = {k: ppl_per_reference_token(art, texts[k], len(reference[k])) for k in texts}
        lines.append(f"| {name} | {art.info.vocab_size:,} | {dir_size(art.directory) / 1e6:.1f} | {oov['calibration']:.2%} | "
                     f"{oov['GPL-3']:.2%} | {ppl['calibration']:.3f} | {ppl['GPL-3']:.3f} | {med[name][1]:.1f} | "
                     f"{median_ratio(results, name, 'untrimmed `fp32`'):.2f} | "
                     f"{median_ratio(results, 'untrimmed `fp32`', name, field=2):.2f} |")
    extra = f" --corpus {args.corpus}" if args.corpus else ""
    output(args, "trim-vocab", lines, command_line(args, "trim", extra))


def kept_ids(art) -> set[int] | None:
    """The untrimmed ids a trimmed artifact kept (its trim_vocab report), None when it is untrimmed."""
    report = next((r for r in art.manifest["passes"] if r["name"] == "trim_vocab"), None)
    return set(report["check"]["kept_ids"]) if report else None


def write_corpus(path: Path) -> Path:
    """The default English corpus of the cap: the vim help files (about 9.5 MB, 18k distinct SmolLM2 tokens),
    concatenated; give --corpus where vim's documentation is not installed."""
    if not VIM_DOCS:
        sys.exit("no /usr/share/vim/vim*/doc/*.txt here: give --corpus FILE (a large English text)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(p.read_text(encoding="utf-8", errors="replace") for p in VIM_DOCS), encoding="utf-8")
    return path


def session_part(args) -> None:
    """tune-session's candidates on the fp32 and int4 artifacts (measured, not recorded: out/ is not changed)."""
    from onnxlm.runtime.session_settings import this_machine
    from onnxlm.tune_session import candidates, choose, measure

    here = this_machine()
    lines = [f"Machine: {machine()} ({here['cores']} usable cores). Every candidate loaded at once and timed "
             f"round-robin, {args.runs} rounds: decode tok/s (64 tokens after 32) and a 512-token prefill, medians; "
             "x default: median of the per-round ratios to ORT's defaults (the first row). `onnxlm tune-session` "
             "records the chosen row when it beats the defaults by 2%."]
    for recipe in args.session_recipes:
        rows = measure(args.out / recipe, candidates(args.thread_counts), args.runs, lambda m: print(m, flush=True))
        chosen = choose(rows)
        lines += ["", f"`{recipe}`:", "",
                  "| threads | spinning | pinning | execution | decode tok/s | x default | prefill ms | x default |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            s = r.settings
            mode = f"parallel, {s.inter_op_threads or 'default'} inter-op" if s.parallel else "sequential"
            lines.append(f"| {s.threads or 'default'}{' (chosen)' if r is chosen else ''} | "
                         f"{'yes' if s.spinning else 'no'} | {s.pinning} | {mode} | {r.decode_tok_s:.1f} | "
                         f"{r.decode_x:.3f} | {r.prefill_s * 1000:.1f} | {r.prefill_x:.3f} |")
    extra = f" --session-recipes {' '.join(args.session_recipes)}"
    output(args, "session", lines, command_line(args, "session", extra))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("search", "trim", "session"), required=True)
    parser.add_argument("--model", default="smollm2-135m", help="the source (search and trim build from it)")
    parser.add_argument("--out", type=Path, default=ROOT / "out", help="built artifacts: DIR/fp32, DIR/int4, ...")
    parser.add_argument("--work", type=Path, default=WORK, help="what this script builds (the search resumes there)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--max-ppl-increase", type=float, default=2.0)
    parser.add_argument("--compare", nargs="+", default=["int4", "int4-rtn"], help="search: built recipes to time")
    parser.add_argument("--corpus", type=Path, help="trim: the English corpus of the 16k cap (default: vim's help)")
    parser.add_argument("--session-recipes", nargs="+", default=["fp32", "int4"])
    parser.add_argument("--thread-counts", type=int, nargs="+", help="session: thread counts (default: 1, 2, 4, ...)")
    parser.add_argument("--print-only", action="store_true", help="print the tables, do not write docs/")
    args = parser.parse_args()
    {"search": search_part, "trim": trim_part, "session": session_part}[args.part](args)


if __name__ == "__main__":
    main()
