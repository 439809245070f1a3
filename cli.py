"""The `onnxlm` command line: optimize, generate, eval, bench, inspect, serve, recipes.

Every user error is one line on stderr and exit code 2; progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from onnxlm.errors import OnnxlmError, first_line

app = typer.Typer(
    name="onnxlm",
    help="Optimize causal language models into ONNX Runtime artifacts, and run them.",
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
err = Console(stderr=True)
out = Console(soft_wrap=True)  # long lines (pipelines, paths) stay whole for grep

Threads = Annotated[Optional[int], typer.Option(min=1, help="Intra-op threads (default: ORT's choice, one per physical core, pinned).")]
Ep = Annotated[Optional[str], typer.Option(help="Execution provider to run on (default: the artifact's target).")]
KvPolicy = Annotated[str, typer.Option(help="KV cache: full | sinks-window | h2o | veda (h2o and veda need an "
                                            "artifact built with --kv-scores).")]
KvBudget = Annotated[Optional[int], typer.Option(min=1, help="KV policy: most cache slots kept.")]
Sinks = Annotated[int, typer.Option(min=0, help="KV policy: first tokens always kept (attention sinks).")]
HaltThreshold = Annotated[Optional[float], typer.Option(
    min=0.0, help="QuickSilver token halting on a quicksilver artifact: a token skips the deeper layers (and their "
                  "K/V) once a layer moves its residual by less than TAU x its norm.")]
ExitThreshold = Annotated[Optional[float], typer.Option(
    min=0.0, help="Early exit on an early-exit artifact: a decode step stops at the exit layer when that layer "
                  "moved the residual by less than T x its norm.")]


def kv_config(policy: str, budget: int | None, sinks: int):
    from onnxlm.runtime.kv_policy import KVPolicyConfig

    if policy == "full" and budget is not None:
        raise OnnxlmError("--kv-budget needs an evicting --kv-policy (sinks-window, h2o or veda)")
    return KVPolicyConfig(policy, budget, sinks)


@contextlib.contextmanager
def steps() -> Iterator:
    """A spinner per step with its elapsed time; `say(msg)` ends the current step and starts the next."""
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err,
                  disable=not err.is_terminal) as progress:
        current = []

        def say(message: str) -> None:
            if current:
                progress.update(current[-1], completed=1, total=1)
            current.append(progress.add_task(message, total=None))

        yield say
        if current:
            progress.update(current[-1], completed=1, total=1)


@contextlib.contextmanager
def counted(description: str) -> Iterator:
    """A bar for work of a known count; yields `advance(done, total)`."""
    with Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err,
                  transient=True, disable=not err.is_terminal) as progress:
        task = progress.add_task(description, total=None)
        yield lambda done, total: progress.update(task, completed=done, total=total)


def emit(result: dict, as_json: bool, text: str) -> None:
    """A command's result: one JSON object with --json, else one human-readable line."""
    if as_json:
        out.print_json(json.dumps(result))
    else:
        out.print(text)


def check_summary(check: dict) -> str:
    """A pass report's check on one line: the logit bound of a lossless pass, the PPL cost of a lossy one."""
    if check.get("max_abs_logit_diff") is not None and check.get("tolerance") is not None:
        text = f"|dlogit| {check['max_abs_logit_diff']:.2e} <= {check['tolerance']:.2e}"
        if check.get("static_max_abs_logit_diff") is not None:
            text += (f"; static prefill/decode vs dynamic |dlogit| {check['static_max_abs_logit_diff']:.2e} <= "
                     f"{check['static_tolerance']:.2e} over {check['static_tokens_checked']} tokens")
        return text
    if check.get("ppl_after") is not None and check.get("ppl_before") is not None:
        text = f"PPL {check['ppl_before']:.3f} -> {check['ppl_after']:.3f} on {check.get('ppl_tokens', '?')} " \
               "calibration tokens"
        if check.get("max_abs_logit_diff") is not None:
            text += f", probe |dlogit| {check['max_abs_logit_diff']:.2e}"
        if check.get("weight_rel_error") is not None:
            text += f", weight error {check['weight_rel_error']:.4f}"
        if check.get("bytes_after") and check.get("bytes_before") is not None:
            text += f", {check['bytes_before'] / 1e6:.0f} -> {check['bytes_after'] / 1e6:.0f} MB"
        if check.get("vocab_after") is not None:
            text += (f", vocabulary {check['vocab_before']} -> {check['vocab_after']} (OOV {check['oov_rate']:.1%} of "
                     "the calibration tokens)")
        if wide := check.get("probe_float32_ops"):  # convert_float16 checked on the CPU
            text += f", CPU ran in float32: {', '.join(f'{op} x{n}' for op, n in wide.items())}"
        if choice := check.get("accuracy_choice"):
            steps = " vs ".join(f"{v} ms at level {k}" for k, v in choice["decode_step_ms"].items())
            text += f", accuracy_level {choice['chosen']} chosen here ({steps} per decode step)"
        return text
    return "lossy"


@app.command()
def optimize(
    model: Annotated[str, typer.Argument(help="HF checkpoint dir, .gguf file, decoder .onnx, or the alias "
                                         "smollm2-135m.")] = "smollm2-135m",
    output: Annotated[Path, typer.Option("--output", "-o", help="Artifact directory to write.")] = ...,
    recipe: Annotated[str, typer.Option(help="Built-in recipe name (see `onnxlm recipes`) or a recipe .json file.")] = "fp32",
    ep: Annotated[str, typer.Option(help="Execution provider to build for: its lowering passes join the recipe, "
                                         "and the manifest records it as the artifact's target (cpu; cuda; openvino, "
                                         "openvino:GPU, openvino:NPU: static graphs).")] = "cpu",
    cross: Annotated[bool, typer.Option(
        "--cross", help="Build for an --ep this machine cannot run (e.g. cuda on a CPU-only machine): the pass "
                        "manager's checks run on the CPU.")] = False,
    budget_bits: Annotated[Optional[float], typer.Option(
        min=2.0, max=8.0, help="Average code bits per decoder weight for the `nested` recipe's per-layer choice.")] = None,
    block_size: Annotated[Optional[int], typer.Option(
        help="Block size of the recipe's quant_weight_only pass (a power of 2 >= 16; the int4/int8 recipes use 32). "
             "Larger blocks: fewer scale bytes and faster MatMulNBits, more weight error.")] = None,
    accuracy_level: Annotated[Optional[int], typer.Option(
        min=-1, max=4, help="A GGUF source's 4-bit blocks (quant_gguf_exact): 0 float activations (exact), 4 int8 "
                            "activations (faster), -1 measure both on this machine and keep the faster within "
                            "+0.5% PPL (the int4 recipe's default).")] = None,
    exact: Annotated[bool, typer.Option(
        "--exact", help="The same as --accuracy-level 0: the GGUF's weights and float activations, PPL = fp32.")] = False,
    calibration: Annotated[Optional[Path], typer.Option(
        help="UTF-8 text for calibration and lossy-pass PPL reports (default: a text shipped with onnxlm).")] = None,
    self_draft_layers: Annotated[Optional[int], typer.Option(
        min=1, help="Also write OUTPUT/draft: the model without its N least important layers (as "
                    "--remove-layers), for `generate --self-draft`.")] = None,
    draft_recipe: Annotated[Optional[str], typer.Option(
        help="Recipe for the self-draft (default: --recipe).")] = None,
    remove_layers: Annotated[Optional[int], typer.Option(
        min=1, help="Remove the N least important decoder layers (PPL without each layer on the calibration "
                    "text; the remove_layers pass).")] = None,
    max_ppl_increase: Annotated[Optional[float], typer.Option(
        min=0.0, help="Remove layers, least important first, while the calibration PPL rises by at most X "
                      "percent.")] = None,
    kv_scores: Annotated[bool, typer.Option(
        help="Also output each layer's attention probabilities and take positions apart from cache slots (the "
             "expose_attention pass), for --kv-policy h2o / veda.")] = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace an artifact already at OUTPUT (without it, an existing artifact is refused).")] = False,
    trim_vocab: Annotated[Optional[Path], typer.Option(
        help="Keep only the tokens this UTF-8 corpus uses (plus special and byte tokens): a smaller embedding, LM "
             "head and tokenizer (the trim_vocab pass, before quantization).")] = None,
    sparsity: Annotated[Optional[float], typer.Option(
        min=0.0, max=0.83, help="La RoSA: rotate the residual stream (lossless) and keep the top (1 - S) of each "
                               "linear's input per token in decode (0.8 S on rotated inputs, 1.2 S on o/down).")] = None,
    context_length: Annotated[Optional[int], typer.Option(
        min=2, help="Static artifacts (recipe static*, --ep openvino): KV cache slots C (default 2048).")] = None,
    prefill_chunk: Annotated[Optional[int], typer.Option(
        min=1, help="Static artifacts: tokens per prefill call P (default 128).")] = None,
):
    """Export MODEL, run a recipe of passes over it, and write a self-contained artifact to OUTPUT."""
    from onnxlm.api import optimize as run_optimize

    overrides = {}
    if budget_bits is not None:
        overrides["quant_nested"] = {"budget_bits": budget_bits}
    if block_size is not None:
        overrides["quant_weight_only"] = {"block_size": block_size}
    if exact and accuracy_level not in (None, 0):
        raise OnnxlmError(f"--exact and --accuracy-level {accuracy_level} disagree")
    if exact or accuracy_level is not None:
        overrides["quant_gguf_exact"] = {"accuracy_level": 0 if exact else accuracy_level}
    static = {k: v for k, v in (("context_length", context_length), ("prefill_chunk", prefill_chunk)) if v is not None}
    if static:
        overrides["static_kv"] = static
    with steps() as say:
        art = run_optimize(model, recipe=recipe, output=output, ep=ep, progress=say, overrides=overrides,
                           calibration=calibration, self_draft_layers=self_draft_layers, draft_recipe=draft_recipe,
                           remove_layers=remove_layers, max_ppl_increase=max_ppl_increase,
                           kv_scores=kv_scores, sparsity=sparsity, overwrite=overwrite, trim_vocab=trim_vocab,
                           cross=cross)
    for report in art.manifest["passes"]:
        err.print(f"  {report['name']}: {report['nodes_before']} -> {report['nodes_after']} nodes, "
                  f"{check_summary(report['check'])}")
    err.print(f"wrote {output}")


@app.command()
def generate(
    directory: Annotated[Path, typer.Argument(help="Artifact directory.")],
    prompt: Annotated[str, typer.Option(help="The prompt text.")],
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Most tokens to generate.")] = 128,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the model's chat template.")] = True,
    decoding: Annotated[Optional[str], typer.Option(
        help="greedy | sample | beam | speculative. Default: speculative when a draft source is given, else the "
             "artifact's recorded default (the model's recommended sampling, seeded; see `onnxlm inspect`).")] = None,
    greedy: Annotated[bool, typer.Option("--greedy", help="Greedy decoding: the same as --decoding greedy.")] = False,
    temperature: Annotated[Optional[float], typer.Option(help="Sampling: divide logits by T (> 0).")] = None,
    top_k: Annotated[Optional[int], typer.Option(help="Sampling: keep the K most likely tokens (0: off).")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Sampling: keep the smallest set with mass P.")] = None,
    min_p: Annotated[Optional[float], typer.Option(help="Sampling: drop tokens below P x the top probability.")] = None,
    repetition_penalty: Annotated[Optional[float], typer.Option(
        help="Sampling: CTRL penalty on tokens already in the context (1.0: off).")] = None,
    seed: Annotated[Optional[int], typer.Option(
        min=0, max=2**64 - 1, help="Sampling: random seed (default: the artifact's, 0), for a reproducible run.")] = None,
    num_beams: Annotated[int, typer.Option(min=1, help="Beam search: number of beams.")] = 4,
    length_penalty: Annotated[float, typer.Option(help="Beam search: score / length ** P for finished beams.")] = 1.0,
    early_stopping: Annotated[bool, typer.Option(help="Beam search: stop once num_beams hypotheses are done.")] = False,
    draft: Annotated[Optional[Path], typer.Option(help="Speculative: an artifact with the same tokenizer that drafts.")] = None,
    prompt_lookup: Annotated[bool, typer.Option(help="Speculative: draft from n-gram matches in the context.")] = False,
    self_draft: Annotated[bool, typer.Option(help="Speculative: draft with the artifact's own draft/ variant.")] = False,
    max_draft: Annotated[int, typer.Option(min=1, help="Speculative: most tokens per draft.")] = 8,
    chunk_size: Annotated[Optional[int], typer.Option(min=1, help="Prefill the prompt in chunks of C tokens.")] = None,
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop where this text appears (repeatable).")] = None,
    stats: Annotated[bool, typer.Option(help="Print the time taken (and speculative decoding's acceptance) to stderr.")] = False,
    kv_policy: KvPolicy = "full",
    kv_budget: KvBudget = None,
    sinks: Sinks = 4,
    halt_threshold: HaltThreshold = None,
    exit_threshold: ExitThreshold = None,
    threads: Threads = None,
    ep: Ep = None,
):
    """Generate text from an artifact, streamed to stdout as it is decoded."""
    import time

    from onnxlm.api import load
    from onnxlm.runtime.decoding import Decoding
    from onnxlm.runtime.sampling import SamplingConfig
    from onnxlm.runtime.speculative import SpeculativeStats

    sources = [s for s, given in (("--draft", draft is not None), ("--prompt-lookup", prompt_lookup),
                                  ("--self-draft", self_draft)) if given]
    if len(sources) > 1:
        raise OnnxlmError(f"give one draft source, not {' and '.join(sources)}")
    given = {k: v for k, v in dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                   repetition_penalty=repetition_penalty, seed=seed).items() if v is not None}
    if greedy and decoding not in (None, "greedy"):
        raise OnnxlmError(f"--greedy and --decoding {decoding} disagree")
    mode = "greedy" if greedy else decoding or ("speculative" if sources else None)
    if sources and mode != "speculative":
        raise OnnxlmError(f"{sources[0]} drafts for --decoding speculative, not {mode}")
    kv = kv_config(kv_policy, kv_budget, sinks)
    if mode in (None, "sample"):  # the artifact's recorded default decoding, sampling options on top
        from onnxlm.artifact import read_manifest
        from onnxlm.runtime.decoding import default_decoding

        base = default_decoding(read_manifest(directory).get("generation"), given, sample=mode == "sample")
        mode, sampling = base.mode, base.sampling
    else:
        sampling = SamplingConfig(**given) if given else None  # speculative verification may sample
    spec = Decoding(mode, sampling, num_beams, length_penalty, early_stopping, prompt_lookup, max_draft, chunk_size,
                    kv, halt_threshold, exit_threshold)
    # sessions taking turns (a draft, the early-exit segments): no spinning workers (backends/cpu.py)
    turns = self_draft or draft is not None or exit_threshold is not None
    art = load(directory, threads=threads, ep=ep, spinning=not turns)
    drafter = art.self_draft() if self_draft else load(draft, threads=threads, ep=ep, spinning=False) if draft else None
    if mode == "speculative" and not sources:
        raise OnnxlmError("--decoding speculative needs --draft DIR, --prompt-lookup or --self-draft")
    counts = SpeculativeStats()
    start, pieces = time.perf_counter(), 0
    for piece in art.generate(prompt, max_new_tokens=max_new_tokens, stream=True, chat=chat, decoding=spec,
                              draft=drafter, stop=stop or (), stats=counts):
        sys.stdout.write(piece)
        sys.stdout.flush()
        pieces += 1
    sys.stdout.write("\n")
    if stats:
        line = f"{time.perf_counter() - start:.2f} s, decoding {mode}"
        if mode == "speculative":
            line += (f", {counts.emitted} tokens in {counts.target_calls} target calls, {counts.acceptance_rate:.0%} "
                     f"of {counts.drafted} drafted tokens accepted")
        err.print(line, soft_wrap=True)


@app.command(name="eval")
def evaluate(
    directory: Annotated[Path, typer.Argument(help="Artifact directory.")],
    text: Annotated[Path, typer.Option(help="UTF-8 text file to score.")],
    max_tokens: Annotated[int, typer.Option(min=2, help="Score the first N tokens of the text.")] = 4096,
    window: Annotated[int, typer.Option(min=2, help="Window length; each window starts from an empty cache.")] = 512,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    kv_policy: KvPolicy = "full",
    kv_budget: KvBudget = None,
    sinks: Sinks = 4,
    halt_threshold: HaltThreshold = None,
    exit_threshold: ExitThreshold = None,
    threads: Threads = None,
    ep: Ep = None,
):
    """Perplexity over non-overlapping windows of a text, no special tokens added. Under an evicting
    --kv-policy each window is scored one token per step, from what the policy kept (StreamingLLM's protocol)."""
    from onnxlm.api import load

    art = load(directory, threads=threads, ep=ep, spinning=exit_threshold is None)
    kv = kv_config(kv_policy, kv_budget, sinks)
    with counted("scoring windows") as advance:
        result = art.perplexity(text, max_tokens=max_tokens, window=window, on_window=advance, kv_policy=kv,
                                halt_threshold=halt_threshold, exit_threshold=exit_threshold)
    policy = "" if kv.name == "full" else f", KV {kv.name} budget {kv.budget}"
    if halt_threshold is not None:
        policy += f", halting at {halt_threshold}: {result['layers_skipped']:.1%} of token-layers skipped"
    if exit_threshold is not None:
        policy += f", early exit at {exit_threshold}: {result['exit_rate']:.1%} of steps exited"
    emit(result, as_json, f"perplexity {result['ppl']:.4f} over {result['tokens']} tokens "
                          f"({result['windows']} windows of {window}{policy}) in {result['seconds']:.1f} s")


@app.command()
def bench(
    directory: Annotated[Path, typer.Argument(help="Artifact directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    threads: Threads = None,
    runs: Annotated[int, typer.Option(min=1, help="Runs per measurement; the median is reported.")] = 5,
    context: Annotated[int, typer.Option(min=1, help="Prompt tokens before the timed decode.")] = 32,
    kv_policy: KvPolicy = "full",
    kv_budget: KvBudget = None,
    sinks: Sinks = 4,
    halt_threshold: HaltThreshold = None,
    exit_threshold: ExitThreshold = None,
    ep: Ep = None,
):
    """TTFT (a --context-token prompt, default 32), greedy decode tok/s (128 new tokens after it) and 512-token
    prefill time; medians. With a long --context and a --kv-policy: decode speed at long context."""
    from onnxlm.api import load

    art = load(directory, threads=threads, ep=ep, spinning=exit_threshold is None)
    with counted("benchmark runs") as advance:
        result = art.bench(runs=runs, on_run=advance, context=context,
                           kv_policy=kv_config(kv_policy, kv_budget, sinks), halt_threshold=halt_threshold,
                           exit_threshold=exit_threshold)
    emit(result, as_json, f"TTFT {result['ttft_s'] * 1000:.1f} ms ({context}-token prompt) | decode "
                          f"{result['decode_tok_s']:.1f} tok/s | prefill-{result['prefill_tokens']} {result['prefill_s']:.3f} s | "
                          f"{art.session.settings.label()}, median of {runs}")


@app.command()
def inspect(
    directory: Annotated[Path, typer.Argument(help="Artifact directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
):
    """Show an artifact's recipe, target, the inputs and outputs its passes added, each applied pass with its
    report, the op histogram and the file sizes."""
    from onnxlm.artifact import read_manifest
    from onnxlm.interface import Interface

    manifest = read_manifest(directory)
    if as_json:
        out.print_json(json.dumps(manifest))
        return
    recipe = manifest["recipe"]
    out.print(f"[bold]{directory}[/bold]  (onnxlm {manifest['onnxlm_version']}, {manifest['created']})")
    out.print(f"source: {manifest['source']['kind']} {manifest['source']['path']}  sha256 {manifest['source']['sha256'][:16]}")
    m = manifest["model"]
    out.print(f"model: {m['architecture']}, {m['num_layers']} layers, {m['num_heads']} heads / {m['num_kv_heads']} KV heads, "
              f"hidden {m['hidden_size']}, vocab {m['vocab_size']}")
    out.print(f"recipe: {recipe['name']}: {' -> '.join(p['pass'] for p in recipe['passes']) or '(none)'}")
    generation = dict(manifest.get("generation") or {"mode": "greedy", "origin": "none recorded"})
    mode, origin = generation.pop("mode"), generation.pop("origin", "")
    settings = ", ".join(f"{k} {v}" for k, v in generation.items())
    out.print(f"default decoding: {mode}{f' ({settings})' if settings else ''}, from {origin}")
    target = manifest["target"]
    probe = "" if target["probe_providers"] == target["providers"] else \
        f" (its checks ran on {', '.join(target['probe_providers'])}: the target EP was not available)"
    out.print(f"target: {target['ep']} ({', '.join(target['providers'])}, device {target['device']}){probe}")
    if "session" in manifest:
        from onnxlm.backends.base import SessionSettings

        session, machine = manifest["session"], manifest["session"]["machine"]
        out.print(f"session options: {SessionSettings.from_dict(session['options']).label()} (measured on "
                  f"{machine['cpu']}, {machine['cores']} cores; {len(session.get('measured', []))} candidates)",
                  markup=False)
    if static := manifest.get("static"):
        out.print(f"static: {static['prefill']} ({static['prefill_chunk']} tokens) and {static['decode']} (1 token) on "
                  f"a {static['context_length']}-slot KV cache, run by generate/eval/bench; model.onnx is the dynamic "
                  f"graph they were specialized from")
    genai = manifest["genai"]
    out.print(f"onnxruntime-genai: {'deployable' if genai['deployable'] else 'not deployable: ' + genai['reason']}")
    interface = Interface.from_dict(manifest["interface"])
    if interface.ports or interface.features:
        out.print(f"interface: features {', '.join(interface.features)}")
        for port in interface.ports:
            out.print(f"  {port.describe()}")
    passes = Table("pass", "nodes", "seconds", "check", "matched / notes", title="passes")
    for r in manifest["passes"]:
        check_text = check_summary(r["check"])
        matched = ", ".join(f"{k} {v}" for k, v in r["matched"].items())
        passes.add_row(r["name"], f"{r['nodes_before']} -> {r['nodes_after']}", f"{r['seconds']:.1f}", check_text,
                       "; ".join(filter(None, [matched, *r["notes"]])))
    out.print(passes)
    ops = Table("op", "count", title="op histogram")
    for op, count in manifest["op_histogram"].items():
        ops.add_row(op, str(count))
    out.print(ops)
    files = Table("file", "MB", title="files")
    for name, size in manifest["files"].items():
        files.add_row(name, f"{size / 1e6:.2f}")
    files.add_row("total", f"{sum(manifest['files'].values()) / 1e6:.2f}")
    out.print(files)


@app.command()
def serve(
    directory: Annotated[Path, typer.Argument(help="Artifact directory (a GroupQueryAttention recipe: any but fp32-plain).")],
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port (0: any free one).")] = 8000,
    max_batch: Annotated[int, typer.Option(min=1, help="Requests decoding at once (KV cache slots).")] = 8,
    chunk_size: Annotated[Optional[int], typer.Option(
        min=0, help="Tokens per engine iteration: every running decode, then a prompt chunk in the rest "
                    "(Sarathi-Serve): the most a long prompt stalls the others. 0 prefills whole prompts.")] = 128,
    max_queue: Annotated[int, typer.Option(min=1, help="Requests waiting for a slot; more get 429.")] = 64,
    max_context: Annotated[int, typer.Option(min=2, help="Positions per slot: prompt + max_tokens.")] = 2048,
    prefix_cache_mb: Annotated[float, typer.Option(
        min=0.0, help="MB of K/V kept for prompt prefixes (LRU); a prompt that starts like an earlier one "
                      "prefills only the rest. 0: off.")] = 256.0,
    model_name: Annotated[Optional[str], typer.Option(help="The model id clients send (default: the directory name).")] = None,
    ray: Annotated[bool, typer.Option("--ray", help='Run as a Ray Serve deployment behind Ray\'s HTTP proxy (pip install "onnxlm[ray]").')] = False,
    replicas: Annotated[int, typer.Option(min=1, help="--ray: server replicas, each with its own engine.")] = 1,
    ray_address: Annotated[Optional[str], typer.Option(
        help="--ray: an existing cluster to join ('auto', or ray://HOST:10001); default: a local Ray on loopback.")] = None,
    threads: Threads = None,
):
    """Serve an artifact over an OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions, /v1/models,
    /health, /metrics. Continuous batching with chunked prefill and a prefix cache; SIGTERM finishes the requests
    in flight, then exits."""
    from onnxlm.runtime.engine import EngineConfig
    from onnxlm.runtime.server import serve as run_server

    if chunk_size is not None and chunk_size and chunk_size <= max_batch:
        raise OnnxlmError(f"--chunk-size {chunk_size} must exceed --max-batch {max_batch}: each iteration runs "
                          "every decode first")
    config = EngineConfig(slots=max_batch, token_budget=chunk_size or None, max_queue=max_queue,
                          max_context=max_context, prefix_cache_mb=prefix_cache_mb)
    if not ray:
        run_server(directory, host, port, config, threads, model_name)
        return
    import time

    from onnxlm.runtime import ray_serve

    ray_serve.start(directory, replicas, host, port, config, model_name, threads, ray_address)
    err.print(f"serving {directory} on http://{host}:{port} with {replicas} Ray Serve replicas (Ctrl-C stops)")
    try:
        while True:
            time.sleep(3600)
    finally:
        ray_serve.stop()


@app.command()
def tune(
    model: Annotated[str, typer.Argument(help="HF checkpoint dir, .gguf file, decoder .onnx, or smollm2-135m.")] = "smollm2-135m",
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for the search's results.")] = ...,
    max_ppl_increase: Annotated[float, typer.Option(help="PPL budget, percent over the reference recipe, on the calibration text.")] = 2.0,
    objective: Annotated[Optional[list[str]], typer.Option(help="decode | prefill | size; repeat for a Pareto search (NSGA-II).")] = None,
    trials: Annotated[int, typer.Option(min=1, help="Trials to run (a second run into DIR resumes the study).")] = 20,
    time_budget: Annotated[Optional[float], typer.Option(
        help="Seconds: no trial starts after this (Optuna's timeout; the clock starts after the reference is built "
             "and scored, and the running trial finishes).")] = None,
    space: Annotated[Optional[Path], typer.Option(
        help='Search space JSON (default: quantization x layer removal). A dimension {"name": "session", "session": '
             '"auto"} also searches the ORT session options (as tune-session), recorded in best/.')] = None,
    calibration: Annotated[Optional[Path], typer.Option(
        help="UTF-8 text for the PPL budget and the trials' builds (calibrating passes, trim_vocab's default corpus; "
             "default: onnxlm's).")] = None,
    runs: Annotated[int, typer.Option(min=1, help="Timing rounds per trial, round-robin with the reference.")] = 3,
    ray: Annotated[Optional[str], typer.Option(
        "--ray", help='Run the trials as Ray tasks: "local" (a Ray instance on loopback) or a cluster\'s address '
                      '(auto, HOST:PORT, ray://HOST:10001); -o must be on a filesystem every node sees.')] = None,
    concurrency: Annotated[Optional[int], typer.Option(
        min=1, help="--ray: trials at a time (default: the cluster's nodes, at least 2); each machine times one "
                    "trial at a time.")] = None,
    threads: Threads = None,
):
    """Search recipes for the fastest artifact within a PPL budget (Optuna: TPE, or NSGA-II for several
    objectives). Writes best_recipe.json, best/, pareto.json, pareto.png and trials.csv into -o."""
    from onnxlm.schema import read_json, read_text
    from onnxlm.tune import Space
    from onnxlm.tune import tune as run_tune

    the_space = Space.from_dict(read_json(space, "search space"), str(space)) if space else None
    text = read_text(calibration) if calibration else None
    with steps() as say:
        result = run_tune(model, output, objective or ["decode"], max_ppl_increase, trials, the_space, text, runs,
                          threads, say=say, ray_address=ray, concurrency=concurrency, time_budget=time_budget)
    table = Table("trial", "picks", "state", "decode x", "prefill x", "PPL +%", "MB", title="trials")
    for t in result["trials"]:
        table.add_row(str(t.number), json.dumps(t.picks), t.state + (f": {t.reason}" if t.reason else ""),
                      f"{t.decode:.2f}", f"{t.prefill:.2f}", f"{t.ppl_increase:+.2f}", f"{t.size / 1e6:.1f}")
    out.print(table)
    for note in result["notes"]:
        err.print(note, markup=False)
    if result["best"] is None:
        err.print(f"no trial met the budget of +{max_ppl_increase}% PPL; see {output / 'trials.csv'}")
        raise typer.Exit(1)
    out.print(f"best: {json.dumps(result['best'].picks)} -> {output / 'best_recipe.json'}, {output / 'best'}")


@app.command(name="tune-session")
def tune_session(
    directory: Annotated[Path, typer.Argument(help="Artifact directory (CPU target).")],
    runs: Annotated[int, typer.Option(min=1, help="Timing rounds, round-robin over every candidate.")] = 5,
    threads: Annotated[Optional[list[int]], typer.Option(
        "--threads", min=1, help="Intra-op thread counts to try (repeat; default: 1, 2, 4, ... and every core).")] = None,
    objective: Annotated[str, typer.Option(help="decode (tok/s) or prefill (512 tokens).")] = "decode",
    min_gain: Annotated[float, typer.Option(
        help="Record the fastest options only when they beat ORT's defaults by this many percent (else the "
             "defaults).")] = 2.0,
    write: Annotated[bool, typer.Option("--write/--dry-run", help="Record the choice in DIR/manifest.json, or only "
                                                                  "print the table.")] = True,
    clear: Annotated[bool, typer.Option(help="Remove the recorded options and measure nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
):
    """Measure ORT session options on this machine (intra-op threads, spinning, thread pinning, parallel
    execution) round-robin on the artifact's decode steps and prefill, and record the fastest in its manifest.
    `load`, generate, eval, bench and serve then apply them on a machine with the same CPU model and core count
    (elsewhere they are ignored, with one warning); --threads on those commands overrides them."""
    from onnxlm.tune_session import record
    from onnxlm.tune_session import tune_session as measure

    if clear:
        record(directory, None)
        err.print(f"removed the recorded session options from {directory / 'manifest.json'}")
        return
    with steps() as say:
        result = measure(directory, runs, threads, objective, min_gain, write, say=say)
    machine, chosen = result["machine"], result["chosen"]
    if as_json:
        out.print_json(json.dumps({"machine": machine, "chosen": chosen.settings.to_dict(),
                                   "rows": [r.to_dict() for r in result["rows"]], "recorded": write}))
        return
    table = Table("threads", "spinning", "pinning", "execution", "decode tok/s", "x default", "prefill ms",
                  "x default", title=f"{machine['cpu']}, {machine['cores']} cores; medians of {runs} round-robin rounds")
    for r in result["rows"]:
        s = r.settings
        table.add_row(str(s.threads or "default") + (" (chosen)" if r is chosen else ""), "yes" if s.spinning else "no",
                      s.pinning, f"parallel, {s.inter_op_threads or 'default'} inter-op" if s.parallel else "sequential",
                      f"{r.decode_tok_s:.1f}", f"{r.decode_x:.3f}", f"{r.prefill_s * 1000:.1f}", f"{r.prefill_x:.3f}")
    out.print(table)
    where = f"recorded in {directory / 'manifest.json'}" if write else "not recorded (--dry-run)"
    out.print(f"chosen: {chosen.settings.label()}; {where}")


@app.command()
def recipes():
    """List the built-in recipes."""
    from onnxlm.passes.recipe import builtin_recipes

    for name, description in builtin_recipes().items():
        typer.echo(f"{name:16} {description}")


_terminated = []  # set by the SIGTERM handler


def _on_sigterm(signum, frame):
    """SIGTERM unwinds like Ctrl-C, from wherever the process is, so that staging directories are removed."""
    _terminated.append(signum)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Entry point: maps user errors to one line on stderr and exit code 2. Set ONNXLM_DEBUG=1 for tracebacks."""
    import os
    import signal

    argv = sys.argv[1:] if argv is None else argv
    # Warnings and errors only. Installed first, so that a library that calls logging.basicConfig(level=INFO) at
    # import (ORT's MatMulNBitsQuantizer does) cannot turn every INFO line of ORT and onnx-ir into output.
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(levelname)s: %(message)s")
    with contextlib.suppress(ValueError):  # not in the main thread (an embedding program): leave its handler
        signal.signal(signal.SIGTERM, _on_sigterm)
    debug = os.environ.get("ONNXLM_DEBUG") not in (None, "", "0")
    try:
        code = app(args=argv or ["--help"], prog_name="onnxlm", standalone_mode=False)
    except BaseException as exc:
        code = _failure(exc, debug)
    if _terminated or code == 130:  # typer turns Ctrl-C (and so our SIGTERM) into a return code of 130
        _fail("terminated" if _terminated else "aborted", 143 if _terminated else 130)
    sys.exit(code if isinstance(code, int) else 0)


def _failure(exc: BaseException, debug: bool) -> int:
    """One line for whatever ended the command, and its exit code. A SIGTERM wins over the error it caused: it
    can surface inside a library as that library's own error (ORT reports "initialization failed")."""
    if _terminated or isinstance(exc, (typer.Abort, KeyboardInterrupt)):
        return 130
    if isinstance(exc, SystemExit):
        raise exc
    if isinstance(exc, OnnxlmError):
        _fail(f"error: {exc}", 2)
    if isinstance(exc, typer.TyperException):  # usage errors: unknown option, bad value, missing argument
        _fail(f"error: {exc.format_message()}", exc.exit_code)
    if isinstance(exc, OSError):  # the environment: a full disk, a file that vanished, a permission
        _fail(f"error: {exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}", 2)
    if isinstance(exc, MemoryError):
        _fail("error: out of memory", 2)
    if debug:  # a bug in onnxlm: still one line; ONNXLM_DEBUG=1 shows the traceback
        raise exc
    _fail(f"error: internal error (a bug in onnxlm, please report it; ONNXLM_DEBUG=1 shows the traceback): "
          f"{type(exc).__name__}: {first_line(exc)}", 70)
    return 70


def _fail(message: str, code: int) -> None:
    """The one line: control characters that a file or path name may carry are shown escaped, not obeyed."""
    message = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
    err.print(message, markup=False, highlight=False, soft_wrap=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
