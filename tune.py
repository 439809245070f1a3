"""`onnxlm tune`: search recipes for the fastest (or smallest) artifact within a PPL budget, with Optuna.

The search space is data (SPACE below, or `--space FILE.json`):

    {"extends": "lowered", "finish": [{"pass": "logits_to_keep"}],
     "dimensions": [{"name": "quant", "choices": {"fp32": [], "int8": [{"pass": "quant_weight_only", ...}]}}, ...]}

A trial picks one choice per dimension; its recipe is the base's passes, each choice's passes placed where their
graph forms hold (Recipe.inserting, earliest), then `finish`. Each trial's artifact is built by `optimize` and
cached by a key of the source's hash and the recipe, so a repeated trial costs nothing. It is scored against a
reference artifact (the base recipe plus `finish`) in the same process: decode tok/s and 512-token prefill timed
round-robin with the reference (the score is the ratio), PPL on the calibration text, bytes on disk. Optuna's TPE
searches one objective, NSGA-II several; trials over the PPL budget are infeasible (Optuna's constraints).

The graph after the export and first pass, and after the base recipe, is cached too (passes/graph_cache.py), so
a trial pays only for the passes it does not share with an earlier one. DIR holds: best_recipe.json (rebuilds its
artifact byte for byte through `onnxlm optimize --recipe`), best/ (that artifact), pareto.json, trials.csv,
study.db (Optuna's storage: a second run resumes), cache/ and graphs/.
Not built yet: the Ray fan-out, vocabulary trimming and session tuning (issue 23).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import shutil
import statistics
from collections.abc import Callable
from pathlib import Path

from onnxlm.errors import OnnxlmError, first_line

OBJECTIVES = {"decode": "maximize", "prefill": "maximize", "size": "minimize"}

SPACE = {
    "extends": "lowered",
    "finish": [{"pass": "logits_to_keep"}],
    "dimensions": [
        {"name": "quant", "choices": {
            "fp32": [],
            "int8": [{"pass": "quant_weight_only", "bits": 8, "block_size": 32, "accuracy_level": 4}],
            "int4-rtn-32": [{"pass": "quant_weight_only", "bits": 4, "block_size": 32, "accuracy_level": 4}],
            "int4-rtn-64": [{"pass": "quant_weight_only", "bits": 4, "block_size": 64, "accuracy_level": 4}],
            "int4-gguf": [{"pass": "quant_gguf_exact", "accuracy_level": 4, "head_accuracy_level": 4},
                          {"pass": "quant_weight_only", "bits": 4, "block_size": 32, "accuracy_level": 4},
                          {"pass": "share_tied_embedding"}],
        }},
        {"name": "remove_layers", "choices": {"0": [], "1": [{"pass": "remove_layers", "n": 1}],
                                              "2": [{"pass": "remove_layers", "n": 2}]}},
    ],
}


@dataclasses.dataclass
class Space:
    extends: str
    finish: list[dict]
    dimensions: dict[str, dict[str, list[dict]]]

    @classmethod
    def from_dict(cls, data: dict, origin: str = "the search space") -> Space:
        from onnxlm.passes.registry import make_pass

        if not isinstance(data, dict) or not isinstance(data.get("dimensions"), list) or not data["dimensions"]:
            raise OnnxlmError(f"{origin} is empty: it needs a non-empty 'dimensions' list")
        dimensions = {}
        for d in data["dimensions"]:
            if not isinstance(d, dict) or not isinstance(d.get("choices"), dict) or not d["choices"]:
                raise OnnxlmError(f"{origin}: every dimension needs a name and a non-empty 'choices' object")
            dimensions[str(d.get("name", len(dimensions)))] = d["choices"]
        space = cls(str(data.get("extends", "lowered")), list(data.get("finish", [])), dimensions)
        for choices in space.dimensions.values():  # unknown passes or options: one line now, not in trial 17
            for passes in choices.values():
                for spec in passes:
                    make_pass(spec)
        return space

    def recipe(self, picks: dict[str, str]):
        """The recipe of one trial: the base, each dimension's picked passes where they fit, then `finish`."""
        from onnxlm.passes.recipe import Recipe, load_recipe
        from onnxlm.passes.registry import make_pass

        recipe = load_recipe(self.extends)
        name = "tuned-" + "-".join(f"{k}_{v}" for k, v in picks.items())
        recipe = Recipe(name, f"onnxlm tune: {picks}", list(recipe.passes))
        for dimension, choice in picks.items():
            passes = [make_pass(spec) for spec in self.dimensions[dimension][choice]]
            if passes:
                recipe = recipe.inserting(passes, where="earliest")
        return Recipe(name, recipe.description, [*recipe.passes, *(make_pass(s) for s in self.finish)]).checked()


def source_key(model: str) -> str:
    """A digest of the source's files: part of every trial's cache key."""
    from onnxlm.frontend.source import resolve_model_path, sha256_of

    path = resolve_model_path(model)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return sha256_of(files)


@dataclasses.dataclass
class Trial:
    number: int
    picks: dict[str, str]
    state: str = "ok"  # ok | failed | over budget
    reason: str = ""
    decode: float = math.nan  # tok/s / the reference's, same rounds
    prefill: float = math.nan  # the reference's prefill time / this one's
    ppl: float = math.nan
    ppl_increase: float = math.nan  # percent over the reference
    size: int = 0  # bytes on disk
    key: str = ""


class Tuner:
    def __init__(self, model: str, output: Path, space: Space, objectives: list[str], max_ppl_increase: float,
                 calibration_text: str, runs: int = 3, threads: int | None = None,
                 say: Callable[[str], None] = lambda _m: None):
        self.model, self.output, self.space, self.objectives = model, Path(output), space, objectives
        self.max_ppl_increase, self.text, self.runs, self.threads, self.say = (max_ppl_increase, calibration_text,
                                                                                runs, threads, say)
        from onnxlm.passes.graph_cache import GraphCache
        from onnxlm.passes.recipe import load_recipe

        self.cache = self.output / "cache"
        # the graph after the export and first pass, and after the base recipe: what most trials share
        self.graphs = GraphCache(self.output / "graphs", (1, len(load_recipe(space.extends).passes)))
        self.source = source_key(model)
        self.trials: list[Trial] = []
        self.reference = self.build(space.recipe({}))
        self.reference_ppl = self.reference.perplexity(text=self.text)["ppl"]

    def build(self, recipe):
        """The artifact of `recipe`, from the cache when an earlier trial built it."""
        import onnxlm

        key = hashlib.sha256(json.dumps([self.source, recipe.to_dict()["passes"]], sort_keys=True).encode())
        directory = self.cache / key.hexdigest()[:20]
        if not (directory / "manifest.json").is_file():
            recipe_file = self.cache / f"{directory.name}.json"
            recipe_file.parent.mkdir(parents=True, exist_ok=True)
            recipe_file.write_text(json.dumps(recipe.to_dict(), indent=2) + "\n")
            onnxlm.optimize(self.model, recipe=str(recipe_file), output=directory, overwrite=True,
                            graph_cache=self.graphs)
        return onnxlm.load(directory, threads=self.threads)

    def score(self, number: int, picks: dict[str, str]) -> Trial:
        trial = Trial(number, picks)
        try:
            art = self.build(self.space.recipe(picks))
            trial.key = art.directory.name
            trial.ppl = art.perplexity(text=self.text)["ppl"]
            trial.ppl_increase = 100 * (trial.ppl / self.reference_ppl - 1)
            trial.size = sum(p.stat().st_size for p in art.directory.rglob("*") if p.is_file())
            trial.decode, trial.prefill = timed_against(art, self.reference, self.runs)
            if trial.ppl_increase > self.max_ppl_increase:
                trial.state = "over budget"
        except OnnxlmError as exc:
            trial.state, trial.reason = "failed", first_line(exc)
        self.trials.append(trial)
        return trial

    def values(self, trial: Trial) -> list[float]:
        return [{"decode": trial.decode, "prefill": trial.prefill, "size": trial.size}[o] for o in self.objectives]


def timed_against(art, reference, runs: int) -> tuple[float, float]:
    """(decode tok/s ratio, prefill speed ratio) of `art` over `reference`, medians of per-round ratios."""
    from onnxlm.runtime.bench import PREFILL_TOKENS, PROMPT_TOKENS, bench_prompt, time_generation, time_prefill
    from onnxlm.runtime.decoding import executor_for

    short, long = bench_prompt(art.tokenizer, PROMPT_TOKENS), bench_prompt(art.tokenizer, PREFILL_TOKENS)
    pair = [(art, executor_for(art.session)), (reference, executor_for(reference.session))]
    for _, executor in pair:
        time_generation(executor, short, 4)  # warm-up
    decode, prefill = [], []
    for i in range(runs):
        rows = {}
        for a, executor in (pair if i % 2 == 0 else pair[::-1]):
            rows[id(a)] = (time_generation(executor, short, 64)[1], time_prefill(executor, long))
        mine, ref = rows[id(art)], rows[id(reference)]
        decode.append(mine[0] / ref[0])
        prefill.append(ref[1] / mine[1])
    return statistics.median(decode), statistics.median(prefill)


def pareto(trials: list[Trial], objectives: list[str]) -> list[Trial]:
    """The feasible trials that no other feasible trial beats on every objective."""
    sign = {o: (1 if OBJECTIVES[o] == "maximize" else -1) for o in objectives}
    ok = [t for t in trials if t.state == "ok"]

    def key(t):
        return [sign[o] * {"decode": t.decode, "prefill": t.prefill, "size": t.size}[o] for o in objectives]

    return [t for t in ok if not any(all(a >= b for a, b in zip(key(u), key(t))) and key(u) != key(t) for u in ok)]


def tune(model: str, output: Path, objectives: list[str], max_ppl_increase: float, trials: int,
         space: Space | None = None, calibration_text: str | None = None, runs: int = 3, threads: int | None = None,
         seed: int = 0, say: Callable[[str], None] = lambda _m: None) -> dict:
    """Run the search and write DIR's files; returns {"best": Trial | None, "pareto": [Trial], "trials": [...]}."""
    import optuna

    from onnxlm.api import CALIBRATION_TEXT
    from onnxlm.schema import read_text

    if not objectives or any(o not in OBJECTIVES for o in objectives):
        raise OnnxlmError(f"objectives must be among {', '.join(OBJECTIVES)}, got {objectives}")
    if not (max_ppl_increase >= 0) or math.isinf(max_ppl_increase):
        raise OnnxlmError(f"--max-ppl-increase must be a number >= 0, got {max_ppl_increase}")
    if trials < 1:
        raise OnnxlmError(f"--trials must be at least 1, got {trials}")
    space = space or Space.from_dict(SPACE)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    say("building the reference artifact")
    tuner = Tuner(model, output, space, objectives, max_ppl_increase,
                  calibration_text or read_text(CALIBRATION_TEXT), runs, threads, say)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = (optuna.samplers.TPESampler(seed=seed) if len(objectives) == 1 else
               optuna.samplers.NSGAIISampler(seed=seed))
    study = optuna.create_study(study_name="onnxlm-tune", storage=f"sqlite:///{output / 'study.db'}",
                                load_if_exists=True, sampler=sampler,
                                directions=[OBJECTIVES[o] for o in objectives])

    def objective(trial):
        picks = {d: trial.suggest_categorical(d, list(c)) for d, c in space.dimensions.items()}
        say(f"trial {trial.number + 1}/{trials}: {picks}")
        result = tuner.score(trial.number, picks)
        trial.set_user_attr("state", result.state)
        if result.state == "failed":
            raise optuna.TrialPruned(result.reason)
        trial.set_constraint("ppl_budget", result.ppl_increase - max_ppl_increase)  # feasible when <= 0
        return tuple(tuner.values(result)) if len(objectives) > 1 else tuner.values(result)[0]

    study.optimize(objective, n_trials=trials)
    front = pareto(tuner.trials, objectives)
    best = max(front, key=lambda t: tuner.values(t)[0] * (1 if OBJECTIVES[objectives[0]] == "maximize" else -1),
               default=None)
    write_outputs(output, tuner, front, best)
    return {"best": best, "pareto": front, "trials": tuner.trials}


def write_outputs(output: Path, tuner: Tuner, front: list[Trial], best: Trial | None) -> None:
    fields = [f.name for f in dataclasses.fields(Trial)]
    with open(output / "trials.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for t in tuner.trials:
            writer.writerow({**dataclasses.asdict(t), "picks": json.dumps(t.picks)})
    (output / "pareto.json").write_text(json.dumps(
        {"objectives": tuner.objectives, "max_ppl_increase": tuner.max_ppl_increase,
         "reference_ppl": tuner.reference_ppl, "trials": [dataclasses.asdict(t) for t in front]}, indent=2) + "\n")
    if best is None:
        return
    recipe = tuner.space.recipe(best.picks)
    (output / "best_recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2) + "\n")
    if (output / "best").exists():
        shutil.rmtree(output / "best")
    shutil.copytree(tuner.cache / best.key, output / "best")
