"""Two commits of onnxlm side by side: the same timings as bench_lowering and bench_quant (TTFT, decode tok/s,
512-token prefill, as `onnxlm bench` defines them), on artifacts each commit built itself, round-robin in one run.

Each commit runs in its own worker process (its checkout on PYTHONPATH as `onnxlm`, timing with its own
bench/common.py), which loads its artifacts once and times one of them per request; the parent sends the requests round-robin, each round starting one
system later, and reports medians and the new/old ratio of each recipe. Prepare each commit's checkout and
artifacts first, e.g. for the parent commit:
    git worktree add /tmp/onnxlm-old HEAD~1 && mkdir -p /tmp/old-path && ln -s /tmp/onnxlm-old /tmp/old-path/onnxlm
    PYTHONPATH=/tmp/old-path python -m onnxlm.cli optimize -o /tmp/old-out/fp32 --recipe fp32
and the same for this checkout into out/, then:
    python bench/bench_commits.py --old /tmp/old-path:/tmp/old-out --new .:out --recipes fp32 fp32-plain int4 --runs 7
Writes the `commits` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import ROOT, machine, median_ratio, medians, publish, round_robin  # noqa: E402

WORKER = r"""
import json, sys
sys.path.insert(0, {bench!r})
import onnxlm
from common import onnxlm_timing
from onnxlm.runtime.bench import PREFILL_TOKENS, PROMPT_TOKENS, bench_prompt
arts = {{name: onnxlm.load(path, threads={threads}) for name, path in json.loads(sys.argv[1]).items()}}
any_art = next(iter(arts.values()))
short, long = bench_prompt(any_art.tokenizer, PROMPT_TOKENS), bench_prompt(any_art.tokenizer, PREFILL_TOKENS)
print(json.dumps({{"onnxlm": onnxlm.__file__}}), flush=True)
for line in sys.stdin:
    print(json.dumps(onnxlm_timing(arts[line.strip()], short, long)), flush=True)
"""


class Worker:
    """One commit's process: `time(recipe)` -> (ttft s, decode tok/s, prefill s)."""

    def __init__(self, label: str, python_path: str, artifacts: Path, recipes: list[str], threads: int | None):
        import os

        bench = Path(python_path).resolve() / "onnxlm" / "bench"  # the commit's own timing code
        code = WORKER.format(bench=str(bench), threads=threads)
        paths = json.dumps({r: str(artifacts / r) for r in recipes})
        env = {**os.environ, "PYTHONPATH": str(Path(python_path).resolve()), "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", code, paths], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd="/")
        self.origin = json.loads(self.proc.stdout.readline())["onnxlm"]
        print(f"{label}: onnxlm from {self.origin}", flush=True)

    def time(self, recipe: str) -> tuple[float, float, float]:
        self.proc.stdin.write(recipe + "\n")
        self.proc.stdin.flush()
        return tuple(json.loads(self.proc.stdout.readline()))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", required=True, help="PYTHONPATH:ARTIFACTS of the old commit")
    parser.add_argument("--new", required=True, help="PYTHONPATH:ARTIFACTS of the new commit ('.' : this checkout)")
    parser.add_argument("--old-label", default="old")
    parser.add_argument("--new-label", default="new")
    parser.add_argument("--recipes", nargs="+", default=["fp32", "fp32-plain", "int4"])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    workers = {}
    for label, spec in ((args.old_label, args.old), (args.new_label, args.new)):
        path, artifacts = spec.split(":", 1)
        if path == ".":  # this checkout: a directory holding an `onnxlm` link to it
            link = ROOT / "bench" / ".cache" / "self-path"
            link.mkdir(parents=True, exist_ok=True)
            if not (link / "onnxlm").exists():
                (link / "onnxlm").symlink_to(ROOT)
            path = str(link)
        workers[label] = Worker(label, path, Path(artifacts).resolve(), args.recipes, args.threads)
    systems = {(label, r): (lambda w=w, r=r: w.time(r)) for label, w in workers.items() for r in args.recipes}
    runs = round_robin(systems, args.runs)
    results = medians(runs)
    for w in workers.values():
        w.close()
    old, new = args.old_label, args.new_label
    lines = [f"Machine: {machine()}. {args.runs} rounds, round-robin over both commits' workers; medians, and the "
             f"median of the per-round {new}/{old} ratios (decode: tok/s ratio; prefill and TTFT: time ratio).", "",
             f"| recipe | decode tok/s {old} | decode tok/s {new} | {new}/{old} | prefill-512 s {old} | "
             f"prefill-512 s {new} | {new}/{old} | TTFT ms {old} | TTFT ms {new} | {new}/{old} |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in args.recipes:
        o, n = results[(old, r)], results[(new, r)]
        decode_ratio = median_ratio(runs, (new, r), (old, r), 1)
        prefill_ratio = median_ratio(runs, (new, r), (old, r), 2)
        ttft_ratio = median_ratio(runs, (new, r), (old, r), 0)
        lines.append(f"| {r} | {o[1]:.1f} | {n[1]:.1f} | {decode_ratio:.3f} | {o[2]:.3f} | {n[2]:.3f} | "
                     f"{prefill_ratio:.3f} | {o[0] * 1e3:.1f} | {n[0] * 1e3:.1f} | {ttft_ratio:.3f} |")
    publish("commits", lines, "python bench/bench_commits.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
