"""The Python API: `optimize` a model into an artifact, `load` an artifact to generate, score or benchmark.

    art = onnxlm.optimize("smollm2-135m", recipe="fp32", output="out/fp32")
    for piece in art.generate("Write a haiku about the sea", max_new_tokens=64, stream=True): print(piece, end="")
    onnxlm.load("out/fp32").perplexity("some.txt")
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from onnxlm.backends.base import SessionSettings
from onnxlm.errors import OnnxlmError
from onnxlm.schema import read_text

Progress = Callable[[str], None]


def optimize(
    model: str = "smollm2-135m",
    recipe: str = "fp32",
    output: str | Path = "out/fp32",
    ep: str = "cpu",
    progress: Progress | None = None,
    overrides: dict[str, dict] | None = None,
    calibration: str | Path | None = None,
    self_draft_layers: int | None = None,
    draft_recipe: str | None = None,
    remove_layers: int | None = None,
    max_ppl_increase: float | None = None,
    kv_scores: bool = False,
    sparsity: float | None = None,
    overwrite: bool = False,
    graph_cache=None,
    trim_vocab: str | Path | None = None,
    cross: bool = False,
) -> Artifact:
    """Load `model`, export it, run the recipe's passes and `ep`'s lowering passes (backends/), and write the
    artifact to `output`, with `ep` as its target.

    `overrides` sets options of the recipe's passes by pass name, e.g. {"quant_nested": {"budget_bits": 4.5}};
    `calibration` is a UTF-8 text file for calibrating passes and lossy-pass PPL reports (default: a short
    English text shipped with onnxlm). `remove_layers` N or `max_ppl_increase` X (percent) add the
    `remove_layers` pass to the recipe where its graph forms first hold (after its first cleanup).
    `self_draft_layers` N also writes `output/draft/`: the same model built with `draft_recipe` (default: the
    same recipe) plus `remove_layers` N, for self-speculative decoding. `kv_scores` appends the
    `expose_attention` pass (positions apart from cache slots, attention probabilities as outputs): what the h2o
    and veda KV policies need. `trim_vocab` (a UTF-8 corpus) adds the `trim_vocab` pass before the first
    quantizing pass: the embedding, head and tokenizer keep the corpus's tokens, special and byte tokens.

    `graph_cache` (a directory, or a passes.graph_cache.GraphCache) keeps the graph after the recipe's first pass,
    so that a later build of a recipe with the same start skips the export: `onnxlm tune` uses it.

    The whole artifact, draft included, is staged and moved into place in one rename (staging.py): a failed run
    writes nothing and leaves an existing artifact as it was. An existing artifact at `output` is replaced only
    with `overwrite=True`.

    An `ep` this machine cannot run (backends/: the package, the driver) is an error before anything is read or
    written, unless `cross`: then the artifact is built for it here, and the pass manager's checks run on the
    CPU (the manifest's target records where)."""
    from onnxlm.artifact import DRAFT_DIR
    from onnxlm.backends import get_backend, probe_backend
    from onnxlm.frontend import load_source
    from onnxlm.passes.graph_cache import GraphCache
    from onnxlm.passes.larosa.recipe import with_sparsity
    from onnxlm.passes.recipe import load_recipe
    from onnxlm.staging import check_output, staged_output

    say = progress or (lambda _msg: None)
    output = Path(output)
    # Everything that can be checked cheaply is checked before the slow work starts.
    backend = get_backend(ep)
    if not cross and not backend.builds_anywhere:
        backend.require("build on a machine that has it, or here with --cross (checks on the CPU)")
    check_output(output, overwrite)
    lowering = {spec["pass"] for spec in backend.lowering}  # overrides may set their options too
    the_recipe = with_layer_removal(apply_overrides(load_recipe(recipe), overrides or {}, lowering), remove_layers,
                                    max_ppl_increase)
    the_recipe = with_sparsity(the_recipe, sparsity)
    if kv_scores:
        the_recipe = with_pass(the_recipe, {"pass": "expose_attention"})
    trim = {"pass": "trim_vocab", "corpus": str(trim_vocab)} if trim_vocab is not None else None
    the_recipe = with_pass(the_recipe, trim, where="earliest") if trim else the_recipe
    builds = [(the_recipe, Path())]
    if self_draft_layers is not None:
        base = load_recipe(draft_recipe) if draft_recipe else apply_overrides(load_recipe(recipe), overrides or {},
                                                                              lowering)
        base = with_pass(base, trim, where="earliest") if trim else base
        builds.append((with_layer_removal(base, self_draft_layers, None), Path(DRAFT_DIR)))
        if len({json.dumps([p.to_dict() for p in r.passes if p.name == "trim_vocab"]) for r, _ in builds}) > 1:
            raise OnnxlmError("the self-draft must keep the model's vocabulary: its recipe needs the same trim_vocab "
                              "pass (or none in either)")
    builds = [(with_lowering(r, backend, overrides or {}), where) for r, where in builds]
    calibration_text = read_text(Path(calibration) if calibration else CALIBRATION_TEXT)
    if not calibration_text.strip():
        raise OnnxlmError(f"the calibration text {calibration} is empty: lossy passes need it for their PPL report")

    with staged_output(output, overwrite) as stage:
        for i, (build_recipe, where) in enumerate(builds):
            if where != Path():
                say(f"self-draft: the model without {self_draft_layers} layers")
            say(f"loading {model}")
            source = load_source(model)
            if i == 0:  # the model's facts are known: the recipes' options must fit it, and the disk must hold it
                for r, _ in builds:
                    r.check_fits(source.info)
                stage.check_space(source.fp32_bytes() * 2 * len(builds))  # the artifact and a scratch copy
            cache = (graph_cache if isinstance(graph_cache, GraphCache) else GraphCache(Path(graph_cache))
                     ) if graph_cache and where == Path() else None
            compile_source(source, build_recipe, backend, stage.directory / where, stage.scratch,
                           calibration_text, say, cache)
    return load(output, ep=probe_backend(backend).name)  # on the target when this machine has it


def compile_source(source, recipe, backend, output: Path, scratch: Path, calibration_text: str,
                   say: Progress, graph_cache=None) -> None:
    """Export a loaded source, run the recipe, lower it, write the artifact into `output` (a staging directory).
    With a `graph_cache` (passes/graph_cache.py), start from the graph after the longest cached recipe prefix."""
    from onnxlm.artifact import write_artifact
    from onnxlm.backends import probe_backend
    from onnxlm.frontend.export import export_decoder
    from onnxlm.interface import Interface
    from onnxlm.model_info import ModelInfo
    from onnxlm.passes.base import PassContext, PassReport
    from onnxlm.passes.manager import run_pipeline
    from onnxlm.passes.recipe import Recipe

    sha = source.describe()["sha256"]
    hit = graph_cache.lookup(sha, recipe.passes) if graph_cache else None
    start, done, interface = 0, [], Interface()
    if hit:
        start, graph, prior, info, saved_interface, tokenizer = hit
        say(f"resuming after {start} pass(es) from the graph cache")
        source.info, interface = ModelInfo.from_dict(info), Interface.from_dict(saved_interface)
        source.tokenizer = tokenizer or source.tokenizer
        done = [PassReport(**r) for r in prior]
        source.torch_model = None
    elif source.kind == "onnx":
        graph = source.onnx_model
    else:
        say("exporting to ONNX (torch.onnx, dynamo)")
        graph = export_decoder(source.torch_model, source.info)
        source.torch_model = None  # free the torch weights before the passes run
    calibration_ids = source.tokenizer.encode(calibration_text).ids
    if len(calibration_ids) < 2:
        raise OnnxlmError("the calibration text has fewer than 2 tokens: lossy passes need it for their PPL report")
    probe = probe_backend(backend)
    if probe is not backend:
        say(f"{backend.providers[0]} is not available here: the pass manager's checks run on {probe.providers[0]}")
    ctx = PassContext(info=source.info, source=source.describe(), scratch=scratch, calibration_ids=calibration_ids,
                      calibration_text=calibration_text, tokenizer=source.tokenizer,
                      quantized_tensors=source.quantized_tensors, interface=interface, probe=probe)

    def snapshot(i: int, reports: list) -> None:
        graph_cache.save(sha, recipe.passes[: start + i], graph, [r.to_dict() for r in [*done, *reports]],
                         ctx.info.to_dict(), ctx.interface.to_dict(), ctx.tokenizer)

    rest = Recipe(recipe.name, recipe.description, recipe.passes[start:])
    reports = [*done, *run_pipeline(graph, rest, ctx, on_pass=lambda name: say(f"pass {name}"),
                                    after_pass=snapshot if graph_cache else None)]
    source.info = ctx.info  # a pass may change the model's facts (remove_layers: num_layers; trim_vocab: vocab)
    source.tokenizer = ctx.tokenizer  # and the vocabulary (trim_vocab)
    say(f"writing {output}")
    output.mkdir(parents=True, exist_ok=True)
    write_artifact(output, graph, source, recipe, reports, ctx.interface, backend.target(probe),
                   exit_segments(graph, source.info), source.generation)


def exit_segments(graph, info) -> dict:
    """The early-exit segments (exits/lower, upper, head) of a graph built with the early_exit pass, else {}."""
    from onnxlm.artifact import EXITS_DIR
    from onnxlm.passes.layers.exits import has_exit, split_at_exit

    if not has_exit(graph):
        return {}
    return {f"{EXITS_DIR}/{name}.onnx": model for name, model in split_at_exit(graph, info).items()}


CALIBRATION_TEXT = Path(__file__).parent / "passes" / "data" / "calibration.txt"


def with_layer_removal(recipe, n: int | None, max_ppl_increase: float | None):
    """`recipe` with a `remove_layers` pass as early as the graph forms it requires allow: once cleanup has
    folded the graph, before the lowering fuses the residual Adds (after the first cleanup of every built-in)."""
    from onnxlm.passes.registry import make_pass

    if n is None and max_ppl_increase is None:
        return recipe
    if any(p.name == "remove_layers" for p in recipe.passes):
        raise OnnxlmError(f"recipe '{recipe.name}' already removes layers")
    spec = {"pass": "remove_layers", **({"n": n} if n is not None else {}),
            **({"max_ppl_increase": float(max_ppl_increase)} if max_ppl_increase is not None else {})}
    return recipe.inserting([make_pass(spec)], where="earliest")


def with_lowering(recipe, backend, overrides: dict[str, dict] | None = None):
    """`recipe` with the backend's lowering passes at its end (unless it ends with them already, as the static
    recipes end with static_kv), with their `overrides`, order-checked like the recipe's own passes and run by
    the manager like any other pass."""
    from onnxlm.passes.recipe import Recipe
    from onnxlm.passes.registry import make_pass

    lowering = [s["pass"] for s in backend.lowering]
    if not lowering or [p.name for p in recipe.passes[-len(lowering):]] == lowering:
        return recipe  # none, or the recipe already ends with them (the static recipes end with static_kv)
    extra = [make_pass({**s, **(overrides or {}).get(s["pass"], {})}) for s in backend.lowering]
    return Recipe(recipe.name, recipe.description, [*recipe.passes, *extra]).checked()


def with_pass(recipe, spec: dict, where: str = "latest"):
    """`recipe` with one more pass, as late (or early) as the graph forms it requires allow (expose_attention: at
    the end; trim_vocab: after the first cleanup)."""
    from onnxlm.passes.registry import make_pass

    if any(p.name == spec["pass"] for p in recipe.passes):
        raise OnnxlmError(f"recipe '{recipe.name}' already has the pass {spec['pass']}")
    return recipe.inserting([make_pass(spec)], where=where)


def apply_overrides(recipe, overrides: dict[str, dict], elsewhere: set[str] = frozenset()):
    """A copy of `recipe` with options set on its passes by name; an override for a pass it lacks is an error,
    unless the pass is one of `elsewhere` (the backend's lowering passes, which take their overrides there)."""
    from onnxlm.passes.recipe import Recipe
    from onnxlm.passes.registry import make_pass

    if not overrides:
        return recipe
    missing = [name for name in overrides if name not in {p.name for p in recipe.passes} | set(elsewhere)]
    if missing:
        raise OnnxlmError(f"recipe '{recipe.name}' has no pass {', '.join(missing)} to take that option")
    passes = [make_pass({**p.to_dict(), **overrides.get(p.name, {})}) for p in recipe.passes]
    return Recipe(recipe.name, recipe.description, passes)


def load(directory: str | Path, threads: int | None = None, ep: str | None = None, spinning: bool = True,
         session: SessionSettings | None = None) -> Artifact:
    """An artifact ready to decode, on execution provider `ep` (default: the one it was built for, its manifest's
    target). It runs with the session options `onnxlm tune-session` recorded for this machine (same CPU model and
    core count), unless `threads` or `session` (backends.base.SessionSettings) are given: they replace them.
    spinning=False for sessions that take turns on the same cores (a speculative target and its draft model):
    ORT's idle workers would otherwise spin against the working session."""
    return Artifact(Path(directory), threads=threads, ep=ep, spinning=spinning, session=session)


class Artifact:
    """A written artifact, loaded for decoding: generate, perplexity, bench."""

    def __init__(self, directory: Path, threads: int | None = None, ep: str | None = None, spinning: bool = True,
                 session: SessionSettings | None = None):
        from onnxlm.runtime.session import DecoderSession
        from onnxlm.runtime.tokenizer import TextTokenizer

        self.directory = directory
        self.session = DecoderSession(directory, threads=threads, ep=ep, spinning=spinning, session=session)
        self.manifest = self.session.manifest
        self.info = self.session.info
        self.tokenizer = TextTokenizer(directory, self.info)
        self._exits = None  # early-exit segments, loaded by exit_segments()
        self.prefix_cache = None  # runtime.prefix_cache.PrefixCache: see reuse_prefixes()

    def reuse_prefixes(self, megabytes: float = 256.0) -> Artifact:
        """Keep the K/V of prompt prefixes (up to `megabytes`, LRU) across this artifact's greedy and sampled
        generations: several questions over one shared context prefill the context once, the way `onnxlm serve`
        does (runtime/prefix_cache.py). Returns the artifact."""
        from onnxlm.runtime.prefix_cache import PrefixCache

        self.prefix_cache = PrefixCache(int(megabytes * 2**20))
        return self

    def prompt_ids(self, prompt: str | list[dict], chat: bool = True) -> list[int]:
        """Token ids for a user prompt, or a conversation ([{"role": ..., "content": ...}, ...]), wrapped in the
        model's chat template when it has one and chat=True."""
        from onnxlm.runtime.chat import render_chat

        template = self.tokenizer.config.get("chat_template")
        if chat and template:
            text = render_chat(template, prompt, self.tokenizer.config.get("bos_token"),
                               self.tokenizer.config.get("eos_token"))
            return self.tokenizer.encode(text, add_bos=False)
        if not isinstance(prompt, str):
            raise OnnxlmError("this model has no chat template: send its prompt as text, not as messages")
        return self.tokenizer.encode(prompt)

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int = 128, ignore_eos: bool = False,
                     decoding=None, draft: Artifact | None = None, stats=None) -> Iterator[int]:
        """New token ids under `decoding` (a runtime.decoding.Decoding; default: the artifact's recorded default,
        `default_decoding()`; `Decoding()` is greedy). `draft` is the artifact
        that drafts for speculative decoding; `stats` (a SpeculativeStats) collects its acceptance counts."""
        from onnxlm.runtime.decoding import decode

        stop = () if ignore_eos else tuple(self.info.eos_token_ids)
        decoding = decoding or self.default_decoding()
        exits = self.exit_segments() if decoding.exit_threshold is not None else None
        return decode(self.session, prompt_ids, max_new_tokens, decoding, stop,
                      draft.session if draft is not None else None, stats, exits, self.prefix_cache)

    def default_decoding(self, **sampling_overrides):
        """The decoding this artifact records as its default (the source's recommendation, seeded; see
        frontend/generation_defaults.py), with sampling options (temperature=..., seed=...) on top."""
        from onnxlm.runtime.decoding import default_decoding

        return default_decoding(self.manifest.get("generation"), sampling_overrides)

    def exit_segments(self):
        """The early-exit segments (DIR/exits/, from the early-exit recipe), loaded on first use."""
        from onnxlm.runtime.early_exit import ExitSegments

        if self._exits is None:
            self._exits = ExitSegments(self.session)
        return self._exits

    def self_draft(self, spinning: bool = False) -> Artifact:
        """The artifact's own cheaper variant (its `draft/` directory, built by `optimize --self-draft-layers`),
        loaded to take turns with this one (see `load`)."""
        from onnxlm.artifact import DRAFT_DIR

        path = self.directory / DRAFT_DIR
        if not path.is_dir():
            raise OnnxlmError(f"{self.directory} has no {DRAFT_DIR}/ to self-draft with: build it with "
                              f"`onnxlm optimize ... --self-draft-layers N`")
        return load(path, ep=self.session.backend.name, spinning=spinning, session=self.session.settings)

    def generate(self, prompt: str, max_new_tokens: int = 128, stream: bool = False, chat: bool = True,
                 decoding=None, draft: Artifact | None = None, stop: Sequence[str] = (), stats=None):
        """Generate text under `decoding` (default: the artifact's recorded default decoding, the model's own
        recommendation, seeded; pass `Decoding()` for greedy). With stream=True, an iterator of text pieces
        (UTF-8 safe across token boundaries); else the whole text. Generation ends at EOS, at max_new_tokens, or
        where one of the `stop` strings appears (the stop string is not returned)."""
        from onnxlm.runtime.tokenizer import cut_at_stop_strings

        if max_new_tokens < 1:
            raise OnnxlmError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        ids = self.generate_ids(self.prompt_ids(prompt, chat), max_new_tokens, decoding=decoding, draft=draft,
                                stats=stats)
        pieces = self.tokenizer.stream(t for t in ids if t not in self.info.eos_token_ids)
        pieces = cut_at_stop_strings(pieces, stop)
        return pieces if stream else "".join(pieces)

    def perplexity(self, path: str | Path | None = None, *, text: str | None = None, max_tokens: int = 4096,
                   window: int = 512, on_window=None, kv_policy=None, halt_threshold: float | None = None,
                   exit_threshold: float | None = None) -> dict:
        """PPL over the first `max_tokens` tokens of a UTF-8 text file (or of `text=`), in windows of `window`.
        Under an evicting `kv_policy` (a runtime.kv_policy.KVPolicyConfig) each window is scored token by token
        from what the policy keeps. `halt_threshold`: QuickSilver token halting (a quicksilver artifact).
        `exit_threshold`: early exit (an early-exit artifact), scored one token per decode step."""
        from onnxlm.runtime.decoding import executor_for
        from onnxlm.runtime.perplexity import perplexity

        if (path is None) == (text is None):
            raise OnnxlmError("give either a text file path or text=, not both")
        if path is not None:
            text = read_text(Path(path))
        if max_tokens < 2:
            raise OnnxlmError(f"max_tokens must be at least 2, got {max_tokens}")
        full = kv_policy is None or kv_policy.name == "full"
        if window > self.info.context_length and full:
            raise OnnxlmError(f"--window {window} exceeds the model's context length {self.info.context_length}")
        ids = self.tokenizer.encode(text, add_bos=False)[:max_tokens]
        exits = self.exit_segments() if exit_threshold is not None else None
        executor = executor_for(self.session, kv_policy, halt_threshold, exit_threshold, exits)
        return perplexity(executor, ids, window, on_window)

    def bench(self, runs: int = 5, on_run=None, context: int = 32, kv_policy=None,
              halt_threshold: float | None = None, exit_threshold: float | None = None) -> dict:
        """TTFT and decode tok/s after a `context`-token prompt (under `kv_policy`; with token halting at
        `halt_threshold` on a quicksilver artifact), and prefill-512 time."""
        from onnxlm.runtime.bench import bench

        exits = (self.exit_segments(), exit_threshold) if exit_threshold is not None else None
        return bench(self.session, self.tokenizer, runs=runs, on_run=on_run, context=context, kv_policy=kv_policy,
                     halt_threshold=halt_threshold, exits=exits)
