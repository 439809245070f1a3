"""`onnxlm tune`: search recipes for the fastest (or smallest) artifact within a PPL budget, with Optuna.

The search space is data (SPACE below, or `--space FILE.json`):

    {"extends": "lowered", "finish": [{"pass": "logits_to_keep"}],
     "dimensions": [{"name": "quant", "choices": {"fp32": [], "int8": [{"pass": "quant_weight_only", ...}]}}, ...]}

A trial picks one choice per dimension; its recipe is the base's passes, each choice's passes placed where their
graph forms hold (Recipe.inserting, earliest), then `finish`. Each trial's artifact is built by `optimize` (on the
same calibration text, DIR/calibration.txt) and cached by a key of the source's hash, that text and the recipe, so
a repeated trial costs nothing. It is scored against a reference artifact (the base recipe plus `finish`) in the
same process: decode tok/s and 512-token prefill timed round-robin with the reference (the score is the ratio),
PPL on the calibration text, bytes on disk. Optuna's TPE searches one objective, NSGA-II several; trials over the
PPL budget are infeasible (Optuna's constraints). A `trim_vocab` choice (e.g. {"full": [], "english":
[{"pass": "trim_vocab", "corpus": "english.txt"}]}) is scored by the whole text's NLL over the reference's token
count, since its tokenizer may split the text into more tokens. It is not in the default space: trimmed to the
calibration text, the artifact would pass the budget on that text and fall back to bytes on every other.

The graph after the export and first pass, and after the base recipe, is cached too (passes/graph_cache.py), so
a trial pays only for the passes it does not share with an earlier one. DIR holds: best_recipe.json (rebuilds its
artifact byte for byte through `onnxlm optimize --recipe`, with `--calibration DIR/calibration.txt` when the
search had its own text), best/ (that artifact), pareto.json, pareto.png (PPL against decode speed, point area =
size; needs matplotlib, the `onnxlm[tune]` extra), trials.csv, study.db (Optuna's storage: a second run resumes),
cache/ and graphs/. With `--ray local|ADDRESS` the trials run as Ray tasks (ray_trials), Optuna staying on the
driver. A "session" dimension ({"name": "session", "session": {choice: {option: value}}} or "auto") times each
trial's artifact with those ORT session options (tune_session.py); best/'s manifest records the best trial's.
`time_budget` is Optuna's timeout: no trial starts after it.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import math
import os
import shutil
import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from onnxlm.errors import OnnxlmError, first_line

OBJECTIVES = {"decode": "maximize", "prefill": "maximize", "size": "minimize"}
PPL_TOKENS = 4096  # the calibration text is scored on its first PPL_TOKENS tokens (the reference's tokenizer)

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
    dimensions: dict[str, dict[str, list[dict]]]  # recipe dimensions: choice -> passes
    # session dimensions: choice -> session options (a part of SessionSettings' fields; a trial's picks are merged)
    sessions: dict[str, dict[str, dict]] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict, origin: str = "the search space") -> Space:
        """A dimension is {"name", "choices": {choice: [pass, ...]}} (the recipe), or {"name", "session":
        {choice: {session option: value}}} or {"name", "session": "auto"} (the ORT session options a trial's
        artifact is timed with; "auto": tune_session.candidates on this machine)."""
        from onnxlm.backends.base import SessionSettings
        from onnxlm.passes.registry import make_pass

        if not isinstance(data, dict) or not isinstance(data.get("dimensions"), list) or not data["dimensions"]:
            raise OnnxlmError(f"{origin} is empty: it needs a non-empty 'dimensions' list")
        dimensions, sessions = {}, {}
        for d in data["dimensions"]:
            if isinstance(d, dict) and d.get("session") == "auto":
                sessions[str(d.get("name", "session"))] = auto_session_choices()
                continue
            kind = "session" if isinstance(d, dict) and "session" in d else "choices"
            if not isinstance(d, dict) or not isinstance(d.get(kind), dict) or not d[kind]:
                raise OnnxlmError(f"{origin}: every dimension needs a name and a non-empty 'choices' object (or "
                                  f"'session': an object of session options, or \"auto\")")
            (sessions if kind == "session" else dimensions)[str(d.get("name", len(dimensions)))] = d[kind]
        space = cls(str(data.get("extends", "lowered")), list(data.get("finish", [])), dimensions, sessions)
        for choices in space.dimensions.values():  # unknown passes or options: one line now, not in trial 17
            for passes in choices.values():
                for spec in passes:
                    make_pass(spec)
        for name, choices in space.sessions.items():
            for choice, options in choices.items():
                SessionSettings.from_dict(options, f"{origin}: session dimension '{name}', choice '{choice}'")
        return space

    def choices(self) -> dict[str, list[str]]:
        """Every dimension's choice names, recipe dimensions first."""
        return {d: list(c) for d, c in {**self.dimensions, **self.sessions}.items()}

    def recipe(self, picks: dict[str, str]):
        """The recipe of one trial: the base, each dimension's picked passes where they fit, then `finish`."""
        from onnxlm.passes.recipe import Recipe, load_recipe
        from onnxlm.passes.registry import make_pass

        picks = {k: v for k, v in picks.items() if k in self.dimensions}
        recipe = load_recipe(self.extends)
        name = "tuned-" + "-".join(f"{k}_{v}" for k, v in picks.items())
        recipe = Recipe(name, f"onnxlm tune: {picks}", list(recipe.passes))
        for dimension, choice in picks.items():
            passes = [make_pass(spec) for spec in self.dimensions[dimension][choice]]
            if passes:
                recipe = recipe.inserting(passes, where="earliest")
        return Recipe(name, recipe.description, [*recipe.passes, *(make_pass(s) for s in self.finish)]).checked()

    def session(self, picks: dict[str, str]):
        """The session options (SessionSettings) a trial is timed with: its session dimensions' picks merged in
        order; None when the space has no session dimension (the defaults, or --threads)."""
        from onnxlm.backends.base import SessionSettings

        if not self.sessions:
            return None
        merged = {}
        for dimension, choices in self.sessions.items():
            merged.update(choices[picks[dimension]])
        return SessionSettings.from_dict(merged)


def auto_session_choices() -> dict[str, dict]:
    """tune_session.candidates on this machine, named by their options (e.g. "2t-nospin-compact")."""
    from onnxlm.tune_session import candidates

    def name(s) -> str:
        return "-".join([f"{s.threads or 'ort'}t", "spin" if s.spinning else "nospin", s.pinning,
                         *([f"par{s.inter_op_threads or ''}"] if s.parallel else [])])

    return {name(s): s.to_dict() for s in candidates()}


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
    worker: str = ""  # host:pid that scored it
    repeats: int = 1  # trials of the same picks whose timings this one's decode/prefill are the median of (pooled)
    machine: dict = dataclasses.field(default_factory=dict)  # its CPU model and cores (session_settings.this_machine)


class Tuner:
    def __init__(self, model: str, output: Path, space: Space, objectives: list[str], max_ppl_increase: float,
                 calibration_text: str, runs: int = 3, threads: int | None = None,
                 say: Callable[[str], None] = lambda _m: None, reference: tuple | None = None):
        """Builds (or loads from the cache) the reference artifact and scores it, unless `reference` gives its
        (scored text, PPL, scored tokens): a Ray worker gets them from the driver (Tuner.setup)."""
        self.model, self.output, self.space, self.objectives = model, Path(output), space, objectives
        self.max_ppl_increase, self.runs, self.threads, self.say = max_ppl_increase, runs, threads, say
        self.calibration_text = calibration_text
        from onnxlm.passes.graph_cache import GraphCache
        from onnxlm.passes.recipe import load_recipe

        self.cache = self.output / "cache"
        self.calibration = self.output / "calibration.txt"  # the builds' too: lossy reports, GPTQ, trim_vocab
        if not self.calibration.is_file() or self.calibration.read_text(encoding="utf-8") != calibration_text:
            staged = self.calibration.with_name(f".calibration.{os.getpid()}")  # Ray workers' builds may read it
            staged.write_text(calibration_text, encoding="utf-8")
            staged.replace(self.calibration)
        self.text_key = hashlib.sha256(calibration_text.encode()).hexdigest()  # passes read it: part of the keys
        # the graph after the export and first pass, and after the base recipe: what most trials share
        self.graphs = GraphCache(self.output / "graphs" / self.text_key[:12],
                                 (1, len(load_recipe(space.extends).passes)))
        self.source = source_key(model)
        self.trials: list[Trial] = []
        self.reference = self.build(space.recipe({}))
        if reference is None:
            ids = self.reference.tokenizer.encode(calibration_text, add_bos=False)
            self.text = self.reference.tokenizer.decode(ids[:PPL_TOKENS])  # every trial scores the same text
            self.reference_ppl, self.reference_tokens = self.perplexity(self.reference)
        else:
            self.text, self.reference_ppl, self.reference_tokens = reference

    def setup(self) -> dict:
        """Plain data from which Tuner(**setup) scores trials elsewhere (a Ray worker) without scoring the
        reference again."""
        return {"model": self.model, "output": self.output, "space": self.space, "objectives": self.objectives,
                "max_ppl_increase": self.max_ppl_increase, "calibration_text": self.calibration_text,
                "runs": self.runs, "threads": self.threads,
                "reference": (self.text, self.reference_ppl, self.reference_tokens)}

    def perplexity(self, art) -> tuple[float, int]:
        """(PPL, scored tokens) on the calibration text. A trial whose tokenizer splits the text into more tokens
        (trim_vocab's dropped tokens become bytes) is compared by the whole text's NLL: its PPL is given over the
        reference's token count, exp(total NLL / reference tokens)."""
        result = art.perplexity(text=self.text, max_tokens=1 << 30)
        tokens = result["scored_tokens"]
        reference = getattr(self, "reference_tokens", tokens)
        return math.exp(result["nll"] * tokens / reference), tokens

    def build(self, recipe, session=None):
        """The artifact of `recipe`, from the cache when an earlier trial built it, loaded with `session` options
        (SessionSettings; None: the defaults, or --threads)."""
        import onnxlm

        key = hashlib.sha256(json.dumps([self.source, self.text_key, recipe.to_dict()["passes"]],
                                        sort_keys=True).encode())
        directory = self.cache / key.hexdigest()[:20]
        directory.parent.mkdir(parents=True, exist_ok=True)
        with locked(self.cache / f"{directory.name}.lock"):  # trials in other processes may build the same recipe
            if not (directory / "manifest.json").is_file():
                recipe_file = self.cache / f"{directory.name}.json"
                recipe_file.write_text(json.dumps(recipe.to_dict(), indent=2) + "\n")
                onnxlm.optimize(self.model, recipe=str(recipe_file), output=directory, overwrite=True,
                                calibration=self.calibration, graph_cache=self.graphs)
        return onnxlm.load(directory, threads=self.threads if session is None else None, session=session)

    def score(self, number: int, picks: dict[str, str]) -> Trial:
        from onnxlm.runtime.session_settings import this_machine

        trial = Trial(number, picks, worker=f"{socket.gethostname()}:{os.getpid()}", machine=this_machine())
        try:
            with locked(TIMING_LOCK, shared=True):  # builds and PPL run side by side; timing waits for them
                art = self.build(self.space.recipe(picks), self.space.session(picks))
                trial.key = art.directory.name
                trial.ppl = self.perplexity(art)[0]
            trial.ppl_increase = 100 * (trial.ppl / self.reference_ppl - 1)
            trial.size = sum(p.stat().st_size for p in art.directory.rglob("*") if p.is_file())
            with locked(TIMING_LOCK):  # one timing per machine at a time, and nothing else of ours running
                trial.decode, trial.prefill = timed_against(art, self.reference, self.runs)
            if trial.ppl_increase > self.max_ppl_increase:
                trial.state = "over budget"
        except OnnxlmError as exc:
            trial.state, trial.reason = "failed", first_line(exc)
        return trial

    def values(self, trial: Trial) -> list[float]:
        return [{"decode": trial.decode, "prefill": trial.prefill, "size": trial.size}[o] for o in self.objectives]


# A machine-wide lock file (not in DIR: each node of a Ray cluster has its own /tmp): trials on one machine build
# under a shared lock and time under an exclusive one, so that no timing shares the cores with another trial.
TIMING_LOCK = Path(tempfile.gettempdir()) / f"onnxlm-tune-timing-{os.getuid()}.lock"


@contextlib.contextmanager
def locked(path: Path, shared: bool = False) -> Iterator[None]:
    """An advisory lock (flock) on `path` across processes: shared or exclusive."""
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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


def pooled(trials: list[Trial]) -> list[Trial]:
    """One trial per set of picks among the feasible ones: the first, with the median of every timing of those
    picks. TPE asks again for what scored well, so without pooling the best would be the luckiest single timing
    (SmolLM2's 40-trial search picked int8 for one 2.83x, where its four repeats timed 2.30-2.41x and the 16
    timings of int4-gguf, the faster recipe in a head-to-head run, had a median of 2.47x)."""
    groups: dict[str, list[Trial]] = {}
    for t in trials:
        if t.state == "ok":
            groups.setdefault(json.dumps(t.picks, sort_keys=True), []).append(t)
    return [dataclasses.replace(group[0], decode=statistics.median(t.decode for t in group),
                                prefill=statistics.median(t.prefill for t in group), repeats=len(group))
            for group in groups.values()]


def pareto(trials: list[Trial], objectives: list[str]) -> list[Trial]:
    """The feasible picks (pooled: one trial each, its timings the median of its repeats) that no other feasible
    picks beat on every objective."""
    sign = {o: (1 if OBJECTIVES[o] == "maximize" else -1) for o in objectives}
    ok = pooled(trials)

    def key(t):
        return [sign[o] * {"decode": t.decode, "prefill": t.prefill, "size": t.size}[o] for o in objectives]

    return [t for t in ok if not any(all(a >= b for a, b in zip(key(u), key(t))) and key(u) != key(t) for u in ok)]


def tune(model: str, output: Path, objectives: list[str], max_ppl_increase: float, trials: int,
         space: Space | None = None, calibration_text: str | None = None, runs: int = 3, threads: int | None = None,
         seed: int = 0, say: Callable[[str], None] = lambda _m: None, ray_address: str | None = None,
         concurrency: int | None = None, time_budget: float | None = None) -> dict:
    """Run the search and write DIR's files; returns {"best": Trial | None, "pareto": [Trial], "trials": [...],
    "notes": [str]}. With `ray_address` ("local", or a cluster's address) the trials run as Ray tasks
    (ray_trials), `concurrency` at a time. `time_budget` (seconds) is Optuna's `timeout`: its clock starts with
    the first trial (after the reference is built and scored), and no trial starts after it ran out (the
    running ones finish); at least one trial runs."""
    import optuna

    from onnxlm.api import CALIBRATION_TEXT
    from onnxlm.schema import read_text

    if not objectives or any(o not in OBJECTIVES for o in objectives):
        raise OnnxlmError(f"objectives must be among {', '.join(OBJECTIVES)}, got {objectives}")
    if not (max_ppl_increase >= 0) or math.isinf(max_ppl_increase):
        raise OnnxlmError(f"--max-ppl-increase must be a number >= 0, got {max_ppl_increase}")
    if trials < 1:
        raise OnnxlmError(f"--trials must be at least 1, got {trials}")
    if concurrency is not None and (ray_address is None or concurrency < 1):
        raise OnnxlmError(f"--concurrency needs --ray and a count >= 1, got {concurrency}")
    if time_budget is not None and not (math.isfinite(time_budget) and time_budget > 0):
        raise OnnxlmError(f"--time-budget must be a number of seconds > 0, got {time_budget}")
    space = space or Space.from_dict(SPACE)
    if space.sessions and threads is not None:
        raise OnnxlmError("--threads and a session dimension in the search space both set the threads: give one")
    output = Path(output)
    with contextlib.ExitStack() as stack:
        cluster = stack.enter_context(ray_cluster(ray_address)) if ray_address else None  # reachable, or 1 line
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

        def ask():
            trial = study.ask()
            picks = {d: trial.suggest_categorical(d, c) for d, c in space.choices().items()}
            say(f"trial {trial.number + 1}/{trials}: {picks}")
            return trial, picks

        def tell(trial, result: Trial) -> None:
            tuner.trials.append(result)
            trial.set_user_attr("state", result.state)
            if result.state == "failed":
                trial.set_user_attr("reason", result.reason)
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                return
            trial.set_constraint("ppl_budget", result.ppl_increase - max_ppl_increase)  # feasible when <= 0
            values = tuner.values(result)
            study.tell(trial, values if len(values) > 1 else values[0])

        deadline = time.monotonic() + time_budget if time_budget else math.inf
        if cluster is None:
            for i in range(trials):
                if i and time.monotonic() > deadline:
                    break
                trial, picks = ask()
                tell(trial, tuner.score(trial.number, picks))
        else:
            ray_trials(tuner, ask, tell, trials, concurrency or max(2, cluster), deadline)
    front = pareto(tuner.trials, objectives)
    best = max(front, key=lambda t: tuner.values(t)[0] * (1 if OBJECTIVES[objectives[0]] == "maximize" else -1),
               default=None)
    notes = write_outputs(output, tuner, front, best)
    if len(tuner.trials) < trials:
        notes.insert(0, f"the time budget of {time_budget:g} s ran out after {len(tuner.trials)} of {trials} trials")
    return {"best": best, "pareto": front, "trials": tuner.trials, "notes": notes}


@contextlib.contextmanager
def ray_cluster(address: str) -> Iterator[int]:
    """Connected to Ray for the search: "local" starts an instance on loopback (no dashboard) and stops it after;
    an address ("auto", HOST:PORT, ray://HOST:PORT) joins that cluster. Yields its number of alive nodes. An
    address that cannot be reached is one line, before anything is written."""
    try:
        import ray
    except ImportError:
        raise OnnxlmError('--ray needs Ray: pip install "onnxlm[ray]"') from None
    if address != "local" and address != "auto":
        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
        except (OSError, ValueError) as exc:
            raise OnnxlmError(f"the Ray cluster at {address} cannot be reached: {first_line(exc)}") from None
    try:
        if address == "local":
            ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise OnnxlmError(f"the Ray cluster at {address} cannot be reached: {first_line(exc)}") from None
    try:
        yield sum(1 for node in ray.nodes() if node.get("Alive"))
    finally:
        ray.shutdown()


def ray_trials(tuner: Tuner, ask: Callable, tell: Callable, trials: int, concurrency: int,
               deadline: float = math.inf) -> None:
    """Optuna asks on the driver; each trial is scored by a Ray task (one CPU, spread over the nodes) on a Tuner
    made from the driver's setup; `concurrency` tasks run at a time, and each result is told as it arrives. No
    task starts after `deadline` (time.monotonic()); the running ones finish.
    Each node times one trial at a time (TIMING_LOCK). DIR must be on a filesystem every node sees at the same
    path: the tasks build into its cache and read the reference from it."""
    import ray

    score = ray.remote(num_cpus=1, scheduling_strategy="SPREAD", max_retries=0)(score_remotely)
    setup = ray.put(tuner.setup())
    pending, asked = {}, 0

    def more() -> bool:
        return asked < trials and (not asked or time.monotonic() <= deadline)

    while pending or more():
        while len(pending) < concurrency and more():
            trial, picks = ask()
            pending[score.remote(setup, trial.number, picks)] = (trial, picks)
            asked += 1
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            trial, picks = pending.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as exc:  # the task died (a worker lost, a bug): that trial failed, the search goes on
                result = Trial(trial.number, picks, state="failed", reason=first_line(exc))
            tell(trial, result)


_WORKER_TUNERS: dict[str, Tuner] = {}  # per Ray worker process: the reference is loaded once


def score_remotely(setup: dict, number: int, picks: dict[str, str]) -> Trial:
    key = json.dumps([str(setup["output"]), setup["reference"][1:]])
    if key not in _WORKER_TUNERS:
        _WORKER_TUNERS[key] = Tuner(**setup)
    return _WORKER_TUNERS[key].score(number, picks)


def write_outputs(output: Path, tuner: Tuner, front: list[Trial], best: Trial | None) -> list[str]:
    """trials.csv, pareto.json, pareto.png (when matplotlib is installed), best_recipe.json and best/; returns
    notes for the user (what was not written)."""
    fields = [f.name for f in dataclasses.fields(Trial)]
    with open(output / "trials.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for t in tuner.trials:
            writer.writerow({**dataclasses.asdict(t), "picks": json.dumps(t.picks), "machine": json.dumps(t.machine)})
    (output / "pareto.json").write_text(json.dumps(
        {"objectives": tuner.objectives, "max_ppl_increase": tuner.max_ppl_increase,
         "reference_ppl": tuner.reference_ppl, "trials": [dataclasses.asdict(t) for t in front]}, indent=2) + "\n")
    notes = [note] if (note := plot_front(output / "pareto.png", tuner, front)) else []
    if best is None:
        return notes
    recipe = tuner.space.recipe(best.picks)
    (output / "best_recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2) + "\n")
    if (output / "best").exists():
        shutil.rmtree(output / "best")
    shutil.copytree(tuner.cache / best.key, output / "best")
    settings = tuner.space.session(best.picks)
    if settings is not None:  # best/ loads with the options it was timed with, on the machine that timed it
        from onnxlm.tune_session import record

        measured = [{"options": tuner.space.session(t.picks).to_dict(), "decode_x_reference": t.decode,
                     "prefill_x_reference": t.prefill}
                    for t in tuner.trials if t.key == best.key and t.machine == best.machine and t.state == "ok"]
        record(output / "best", settings, measured, best.machine)
    return notes


def plot_front(path: Path, tuner: Tuner, front: list[Trial]) -> str | None:
    """PPL against decode speed for every scored trial, the front highlighted, point area = artifact size; a
    note instead when matplotlib is not installed (it is the `onnxlm[tune]` extra)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return "pareto.png not written: matplotlib is not installed (pip install 'onnxlm[tune]')"
    scored = [t for t in tuner.trials if t.state != "failed" and math.isfinite(t.decode) and math.isfinite(t.ppl)]
    largest = max((t.size for t in scored), default=1) or 1
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for trials, style in ((scored, {"c": "lightgray", "edgecolors": "gray", "label": "trials"}),
                          (front, {"c": "tab:blue", "label": "Pareto front"})):
        ax.scatter([t.decode for t in trials], [t.ppl for t in trials], s=[20 + 400 * t.size / largest for t in trials],
                   alpha=0.7, **style)
    for t in front:
        ax.annotate(", ".join(f"{k}={v}" for k, v in t.picks.items()), (t.decode, t.ppl), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.axhline(tuner.reference_ppl * (1 + tuner.max_ppl_increase / 100), ls="--", c="tab:red",
               label=f"PPL budget (+{tuner.max_ppl_increase:g}%)")
    ax.set_xlabel("decode tok/s, x the reference's (round-robin)")
    ax.set_ylabel("PPL on the calibration text")
    ax.set_title("onnxlm tune (point area: artifact size)")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return None
