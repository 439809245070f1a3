"""Decoding runtime benchmark on SmolLM2-135M: speculative decoding, beam search against transformers, and
Sarathi-Serve's chunked prefill with several requests. One process; round-robin runs, medians.

Needs out/fp32 built with a self-draft, and out/int4-fast as a separate draft model:
    onnxlm optimize smollm2-135m -o out/fp32 --self-draft-layers 6 --draft-recipe int4-fast
    onnxlm optimize smollm2-135m -o out/int4-fast --recipe int4-fast
    python bench/bench_decoding.py --runs 5 --threads 2
Writes the `decoding` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402

import onnxlm  # noqa: E402
from onnxlm.runtime.beam import beam_search  # noqa: E402
from onnxlm.runtime.decoding import Decoding  # noqa: E402
from onnxlm.runtime.scheduler import Request, serve  # noqa: E402
from onnxlm.runtime.speculative import SpeculativeStats  # noqa: E402

from common import ROOT, machine, publish  # noqa: E402

PASSAGE = (
    "The lighthouse on the northern cape was built in 1868 from granite cut in a quarry two miles inland. Its "
    "lamp burned whale oil until 1890, then kerosene, and since 1952 it has run on electricity from the mainland "
    "grid. The keeper's cottage beside the tower now holds a small museum with the original lens, a Fresnel lens "
    "of the first order that weighs nearly four tons. Storms in 1911 and 1987 damaged the gallery, and both times "
    "the town raised the money to repair it. Today the light is automatic, but volunteers still open the museum "
    "every summer and guide visitors up the 153 steps to the top."
)
PROMPTS = {
    "summarize": f"Summarize this text in a few sentences, keeping its facts:\n\n{PASSAGE}",
    "free": "Write a short story about a cat who wants to learn to fly.",
}


def timed(art, ids, new_tokens, decoding, draft):
    """(tokens, seconds including prefill, stats) for one generation that stops at EOS."""
    stats = SpeculativeStats()
    start = time.perf_counter()
    tokens = list(art.generate_ids(ids, new_tokens, decoding=decoding, draft=draft, stats=stats))
    return tokens, time.perf_counter() - start, stats


def speculative_rows(target, turns_target, drafts: dict, runs: int, new_tokens: int) -> list[str]:
    """`target` has spinning ORT workers (fastest alone); `turns_target` has none, for taking turns with a draft
    model (backends/cpu.py)."""
    systems = {"greedy": (target, Decoding(), None),
               "prompt lookup": (target, Decoding("speculative", prompt_lookup=True), None)}
    for name, draft in drafts.items():
        systems[name] = (turns_target, Decoding("speculative"), draft)
    rows = ["| prompt | decoding | new tokens | tok/s | speed-up | acceptance | tokens / target call | "
            "tokens = greedy |", "|---|---|---|---|---|---|---|---|"]
    for prompt_name, prompt in PROMPTS.items():
        ids = target.prompt_ids(prompt)
        reference = timed(target, ids, new_tokens, Decoding(), None)[0]
        seconds = {name: [] for name in systems}
        last = {}
        for _ in range(runs + 1):  # round-robin; the first round is a warm-up
            for name, (model, decoding, draft) in systems.items():
                tokens, s, stats = timed(model, ids, new_tokens, decoding, draft)
                seconds[name].append(s)
                last[name] = (tokens, stats)
        base = len(reference) / statistics.median(seconds["greedy"][1:])
        for name in systems:
            tokens, stats = last[name]
            tok_s = len(tokens) / statistics.median(seconds[name][1:])
            accept = "-" if name == "greedy" else f"{stats.acceptance_rate:.0%} of {stats.drafted}"
            per_call = "1.00" if name == "greedy" else f"{stats.emitted / stats.target_calls:.2f}"
            rows.append(f"| {prompt_name} | {name} | {len(tokens)} | {tok_s:.1f} | {tok_s / base:.2f}x | {accept} | "
                        f"{per_call} | {'yes' if tokens == reference else 'NO'} |")
            print(rows[-1], flush=True)
    return rows


def beam_rows(target, new_tokens: int = 32) -> list[str]:
    import torch

    from onnxlm.frontend import load_source

    model = load_source("smollm2-135m").torch_model
    eos = list(target.info.eos_token_ids)
    rows = ["| prompt | beams | tokens | equal to transformers | onnxlm s | transformers s |", "|---|---|---|---|---|---|"]
    for prompt in ("Name three colors.", "What is the capital of France?", PROMPTS["free"]):
        ids = target.prompt_ids(prompt)
        start = time.perf_counter()
        ours = beam_search(target.session, ids, new_tokens, num_beams=4, eos_ids=tuple(eos)).tokens
        ours_s = time.perf_counter() - start
        start = time.perf_counter()
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 num_beams=4, do_sample=False, max_new_tokens=new_tokens, eos_token_id=eos,
                                 pad_token_id=eos[0])[0, len(ids):].tolist()
        ref_s = time.perf_counter() - start
        equal = ours == ref[: len(ours)] and all(t == eos[0] for t in ref[len(ours):])
        rows.append(f"| {prompt[:40]!r} | 4 | {len(ours)} | {'yes' if equal else 'NO'} | {ours_s:.2f} | {ref_s:.2f} |")
        print(rows[-1], flush=True)
    return rows


def sarathi_rows(target, runs: int, budgets=(None, 512, 256, 128)) -> list[str]:
    """Three requests decode; 0.5 s in, a 1,536-token prompt arrives. TTFT of the long prompt, and the
    inter-token latency of the running requests while it is prefilled."""
    tok = target.tokenizer
    text = tok.encode(PASSAGE * 12, add_bos=False)
    long_prompt = text[:1536]
    rows = ["| prefill | long-prompt TTFT s | running ITL median ms | running ITL p99 ms | running ITL max ms | "
            "all done s |", "|---|---|---|---|---|---|"]
    for budget in budgets:
        ttft, med, p99, worst, total = [], [], [], [], []
        for _ in range(runs):
            requests = [Request(text[i * 40 : i * 40 + 32], 96) for i in range(3)]
            requests.append(Request(long_prompt, 8, arrival_s=0.5))
            start = time.perf_counter()
            serve(target.session, requests, slots=4, token_budget=budget)
            total.append(time.perf_counter() - start)
            gaps = np.concatenate([r.inter_token_s for r in requests[:3]]) * 1000
            ttft.append(requests[3].ttft_s)
            med.append(np.median(gaps))
            p99.append(np.percentile(gaps, 99))
            worst.append(gaps.max())
        label = "whole prompt (no chunking)" if budget is None else f"chunked, budget {budget} tokens"
        m = statistics.median
        rows.append(f"| {label} | {m(ttft):.2f} | {m(med):.1f} | {m(p99):.0f} | {m(worst):.0f} | {m(total):.2f} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()

    target = onnxlm.load(ROOT / "out" / "fp32", threads=args.threads)
    turns_target = onnxlm.load(ROOT / "out" / "fp32", threads=args.threads, spinning=False)
    self_draft = turns_target.self_draft()
    removed = next(p for p in self_draft.manifest["passes"] if p["name"] == "remove_layers")["check"]["removed_layers"]
    drafts = {f"self-draft (-{len(removed)} layers, {self_draft.manifest['recipe']['name']})": self_draft,
              "draft model int4-fast": onnxlm.load(ROOT / "out" / "int4-fast", threads=args.threads, spinning=False)}
    lines = [f"Machine: {machine()}; {args.threads} threads; target `out/fp32`; self-draft removed layers "
             f"{removed}.", "",
             f"Speculative decoding, greedy verification, up to {args.new_tokens} new tokens (stops at EOS), chat "
             f"template; tok/s = new tokens / wall time including prefill; median of {args.runs} round-robin runs.",
             "Model drafts run with ORT's spinning workers off in both sessions (they take turns on the same cores); "
             "greedy and prompt lookup keep them on.",
             "", *speculative_rows(target, turns_target, drafts, args.runs, args.new_tokens), "",
             "Beam search (num_beams 4, length_penalty 1, early_stopping False, 32 new tokens) against transformers "
             "4.57 `generate` on the same GGUF weights:", "", *beam_rows(target), "",
             "Sarathi-Serve: 3 requests decode (32-token prompts, 96 new tokens); 0.5 s in, a 1,536-token prompt "
             f"arrives (8 new tokens). 4 slots; median of {max(args.runs // 2, 1)} runs.", "",
             *sarathi_rows(target, max(args.runs // 2, 1))]
    publish("decoding", lines, f"python bench/bench_decoding.py --runs {args.runs} --threads {args.threads}")


if __name__ == "__main__":
    main()
