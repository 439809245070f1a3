"""NPU-class benchmark: the static artifacts (recipes static, static-qdq, static-int4) on the ORT CPU EP and on the
OpenVINO EP's CPU device, round-robin in one run, medians. PPL on GPL-3, size on disk, decode tok/s, prefill time
per P-token chunk, TTFT, greedy agreement.

onnxruntime-openvino replaces the module `onnxruntime`, so the two EPs live in two environments: this driver
starts one worker process per environment (this python for the CPU EP; the OpenVINO one: README, OpenVINO
install), each keeps every artifact's sessions loaded, and the driver asks them in turn. Both workers import this
checkout's onnxlm. Artifacts are read from OUT/<recipe>, built in the main environment:
    onnxlm optimize -o out/static --recipe static
    onnxlm optimize -o out/static-qdq --recipe static-qdq
    onnxlm optimize -o out/static-int4 --recipe static-int4
    python bench/bench_static.py --runs 5 --threads 2 [--openvino-python .venv-openvino/bin/python]
Writes the `npu` section of docs/benchmarks.md (not with --print-only).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from common import GPL3, ROOT, dir_size, machine, medians, publish, round_robin  # noqa: E402

RECIPES = ["static", "static-qdq", "static-int4"]
EPS = ("cpu", "openvino")


def worker(args) -> None:
    """Load the artifacts on args.worker's EP and answer the driver's requests, one JSON line each."""
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever ORT or OpenVINO print goes to stderr, not into the replies
    import onnxruntime as ort

    import onnxlm
    from onnxlm.runtime.bench import NEW_TOKENS, PREFILL_TOKENS, PROMPT_TOKENS, bench_prompt
    from onnxlm.runtime.decoding import Decoding

    from common import onnxlm_timing

    arts, failed = {}, {}
    for recipe in args.recipes:
        try:
            art = onnxlm.load(args.out / recipe, threads=args.threads, ep=args.worker)
            art.generate_ids([0], 2, ignore_eos=True, decoding=Decoding())  # the sessions open (and compile) here
            arts[recipe] = art
        except onnxlm.OnnxlmError as exc:
            failed[recipe] = str(exc)
    static = {r: a.manifest["static"] for r, a in arts.items()}
    tokenizer = next(iter(arts.values())).tokenizer if arts else None
    short = bench_prompt(tokenizer, PROMPT_TOKENS) if arts else []
    longs = {r: bench_prompt(tokenizer, min(PREFILL_TOKENS, s["context_length"])) for r, s in static.items()}
    package = next((p for p in ("onnxruntime-openvino", "onnxruntime") if _version(p)), "onnxruntime")
    reply.write(json.dumps({"loaded": sorted(arts), "failed": failed, "static": static,
                            "versions": f"{package} {ort.__version__}", "prefill_tokens": {r: len(v) for r, v in
                                                                                          longs.items()}}) + "\n")
    for line in sys.stdin:
        ask = json.loads(line)
        art = arts[ask["recipe"]]
        if ask["do"] == "time":  # (TTFT s, decode tok/s, seconds per prefill chunk)
            ttft, decode, prefill = onnxlm_timing(art, short, longs[ask["recipe"]])
            chunks = math.ceil(len(longs[ask["recipe"]]) / static[ask["recipe"]]["prefill_chunk"])
            answer = [ttft, decode, prefill / chunks]
        elif ask["do"] == "ppl":
            window = min(512, static[ask["recipe"]]["context_length"])  # a window must fit the C slots
            answer = art.perplexity(args.text, max_tokens=args.ppl_tokens, window=window)["ppl"]
        else:  # greedy tokens after the short prompt
            answer = list(art.generate_ids(short, NEW_TOKENS, ignore_eos=True, decoding=Decoding()))
        reply.write(json.dumps(answer) + "\n")


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def fail(message: str) -> None:
    """Bad input: one line, exit code 2, nothing written."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class Worker:
    """A worker process on one EP; `ask` sends one request and returns its answer."""

    def __init__(self, python: str, ep: str, args, path: Path):
        command = [python, __file__, "--worker", ep, "--out", str(args.out), "--threads", str(args.threads),
                   "--text", str(args.text), "--ppl-tokens", str(args.ppl_tokens), "--recipes", *args.recipes]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        env={**os.environ, "PYTHONPATH": str(path)})
        line = self.process.stdout.readline()
        if not line:
            fail(f"the {ep} worker ({python}) stopped before loading (its stderr is above)")
        self.ready = json.loads(line)

    def ask(self, do: str, recipe: str):
        self.process.stdin.write(json.dumps({"do": do, "recipe": recipe}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            fail(f"a worker stopped while answering {do} {recipe} (its stderr is above)")
        return json.loads(line)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="the CPU EP's threads (OpenVINO takes its default)")
    parser.add_argument("--ppl-tokens", type=int, default=4096)
    parser.add_argument("--text", type=Path, default=GPL3, help="the PPL text (default GPL-3)")
    parser.add_argument("--recipes", nargs="*", default=RECIPES)
    parser.add_argument("--out", type=Path, default=ROOT / "out", help="where the artifacts are (OUT/<recipe>)")
    parser.add_argument("--openvino-python", default=os.environ.get("ONNXLM_OPENVINO_PYTHON",
                                                                    str(ROOT / ".venv-openvino" / "bin" / "python")))
    parser.add_argument("--print-only", action="store_true", help="print the table, do not write docs/benchmarks.md")
    parser.add_argument("--worker", choices=EPS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    missing = [r for r in args.recipes if not (args.out / r / "manifest.json").is_file()]
    if missing:
        fail(f"not built: {', '.join(str(args.out / r) for r in missing)} (the commands are in this file's help)")
    if not args.text.is_file():
        fail(f"no PPL text at {args.text}")
    if not Path(args.openvino_python).is_file():
        fail(f"no OpenVINO python at {args.openvino_python} (README: OpenVINO install; --openvino-python)")

    with tempfile.TemporaryDirectory() as path:  # both workers import this checkout's onnxlm through a link
        (Path(path) / "onnxlm").symlink_to(ROOT)
        workers = {"cpu": Worker(sys.executable, "cpu", args, Path(path)),
                   "openvino": Worker(args.openvino_python, "openvino", args, Path(path))}
        loaded = [(r, ep) for r in args.recipes for ep in EPS if r in workers[ep].ready["loaded"]]
        systems = {(r, ep): (lambda r=r, ep=ep: tuple(workers[ep].ask("time", r))) for r, ep in loaded}
        runs = round_robin(systems, args.runs)
        ppl = {key: workers[key[1]].ask("ppl", key[0]) for key in loaded}
        greedy = {key: workers[key[1]].ask("greedy", key[0]) for key in loaded}
        for w in workers.values():
            w.close()
    lines = table(args, workers, loaded, medians(runs), ppl, greedy)
    command = f"python bench/bench_static.py --runs {args.runs} --threads {args.threads}"
    if args.recipes != RECIPES:
        command += f" --recipes {' '.join(args.recipes)}"
    if args.out != ROOT / "out":
        command += f" --out {args.out}"
    if args.ppl_tokens != 4096 or args.text != GPL3:
        command += f" --ppl-tokens {args.ppl_tokens} --text {args.text}"
    if args.print_only:
        print("\n".join([*lines, "", f"Command: `{command} --print-only`"]))
    else:
        publish("npu", lines, command)


def table(args, workers, loaded, med, ppl, greedy) -> list[str]:
    cpu = workers["cpu"].ready
    shapes = {f"C = {s['context_length']}, P = {s['prefill_chunk']}" for s in cpu["static"].values()}
    prefill = sorted(set(cpu["prefill_tokens"].values()))
    lines = [
        f"Machine: {machine()}. CPU EP threads: {args.threads}; the OpenVINO EP (device CPU) takes OpenVINO's default "
        f"threads. Medians of {args.runs} round-robin runs, each EP in its own worker process and environment.",
        f"{cpu['versions']} (CPU EP); {workers['openvino'].ready['versions']} (OpenVINO EP). "
        f"{'; '.join(sorted(shapes))}. PPL: {args.text.name}, first {args.ppl_tokens} tokens, "
        f"{min([512, *(s['context_length'] for s in cpu['static'].values())])}-token windows. "
        f"Prefill: {'/'.join(map(str, prefill))} tokens from an empty cache, divided by its chunks; TTFT: a 32-token "
        "prompt (one padded chunk). Greedy: 128 tokens after that prompt.",
        "",
        "| artifact | EP | PPL | size MB | decode tok/s | prefill ms / chunk | TTFT ms | greedy = CPU EP | "
        "greedy = `static` CPU EP |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    reference = greedy.get(("static", "cpu"))
    for recipe, ep in loaded:
        ttft, decode, chunk = med[(recipe, ep)]
        tokens = greedy[(recipe, ep)]
        same = greedy.get((recipe, "cpu"))
        agree = lambda ref: f"{sum(a == b for a, b in zip(tokens, ref))}/{len(ref)}" if ref else "-"  # noqa: E731
        lines.append(f"| `{recipe}` | {ep} | {ppl[(recipe, ep)]:.3f} | {dir_size(args.out / recipe) / 1e6:.0f} | "
                     f"{decode:.1f} | {chunk * 1000:.1f} | {ttft * 1000:.0f} | {agree(same)} | {agree(reference)} |")
    for ep in EPS:
        for recipe, why in workers[ep].ready["failed"].items():
            lines += ["", f"`{recipe}` on {ep}: not measured: {why}"]
    return lines


if __name__ == "__main__":
    main()
