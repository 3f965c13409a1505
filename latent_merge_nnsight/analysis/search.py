"""`search`: find the latent-merge schedule that maximises a metric subject to constraints, with Optuna.

    result = analysis.search(base, ft, trials=40, target="reasoning", constraints={"skill_kept": 0.9},
                             out="runs/search")
    result.winner            # the best feasible Recipe (also OUT/winner.yaml, OUT/system.yaml)
    result.test              # its scores on the test split: the numbers to report
    result.pareto            # the trials' Pareto front of (skill_kept, target), also .md and .png

**What is searched.** Each trial is one `Recipe`: an op, a site, a run of 1..`max_layers` consecutive
layers ending at a chosen top layer, one alpha per layer, and positions (`SearchSpace`). Optuna's TPE
sampler, seeded, proposes them; the constraints (`metric >= value`) steer it (`Trial.set_constraint`).

**What is measured.** Greedy exact-match accuracy (a fraction in [0, 1]) on the toy tasks (`TaskAccuracy`,
its fast engine kept between trials) on a *search split* of held-out questions; the metrics are the
categories, `skill` (the mean over the non-reasoning categories), `skill_kept` (skill / the base's skill
on the same split), `mean` and `balanced` ((skill + reasoning) / 2). The winner is the feasible trial
with the highest target; it is then scored once on a disjoint *test split*, and only those test numbers
are reported (no selection on them).

**Resuming.** Every trial is stored in an SQLite file (Optuna's RDB storage, no pickle). A rerun with the
same `out` (or `storage`) and study name continues: finished trials are kept and never rerun, a trial
that was running when the process died is run again with the same parameters, and the study runs only
the trials left to reach `trials`. The search settings are stored with the study; resuming with
different ones is an error. One process per study.
"""

import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeAlias

import pandas as pd

from latent_merge_nnsight.analysis.evaluators import TaskAccuracy
from latent_merge_nnsight.analysis.pareto import pareto_figure, pareto_front
from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.evaluation.tasks import CATEGORIES, Example, make_eval_set
from latent_merge_nnsight.generation import release_engine
from latent_merge_nnsight.models import model_info
from latent_merge_nnsight.nouns import Model
from latent_merge_nnsight.ops import get_op
from latent_merge_nnsight.recipe import Recipe

if TYPE_CHECKING:  # optuna is the optional `search` extra
    from optuna import Study, Trial
    from optuna.trial import FrozenTrial

Models: TypeAlias = Model | Sequence[Model]
Accuracies: TypeAlias = Callable[[Recipe | None], dict[str, float]]
"""A recipe's (None: the base's) accuracy per task category on one split."""
Objectives: TypeAlias = 'tuple[Callable[["Trial"], float], Callable[[list["Trial"]], list[float]], int]'
"""One trial's objective, k trials' in one pass, and k (`_run_trials`)."""

# optuna (the `search` extra) is imported inside functions only: the package works without it.
__all__ = [
    "GAINED", "SKILLS", "SearchResult", "SearchSpace", "metric_names", "search", "skill_kept", "task_metrics",
]  # fmt: skip

SKILLS: tuple[str, ...] = ("knowledge", "math", "coding")
"""The toy-task categories whose mean accuracy is "skill" (what a merge should keep of the base)."""
GAINED = "reasoning"
"""The category the toy fine-tune was trained for."""
DERIVED = ("skill", "skill_kept", "mean", "balanced")
SAMPLERS = ("tpe", "random")


def metric_names() -> tuple[str, ...]:
    """Every metric a target or constraint may name."""
    return (*SKILLS, GAINED, *DERIVED)


def skill_kept(skill: float, base_skill: float | None) -> float:
    """*Skill kept*, the one definition (`lmn search`, the demo's report and figures, the notebooks):
    skill (mean accuracy over `SKILLS`) / the base's skill on the same examples; nan without a base skill.
    1 keeps all of the base's skill; above 1 is more than the base had."""
    return skill / base_skill if base_skill else math.nan


def task_metrics(accuracy: Mapping[str, float], base_skill: float | None) -> dict[str, float]:
    """The search metrics from accuracies per category (`base_skill`: the base's skill on the same
    examples, for `skill_kept`; None gives `skill_kept = nan`)."""
    acc = {c: float(accuracy[c]) for c in (*SKILLS, GAINED) if c in accuracy}
    skill = sum(acc[c] for c in SKILLS if c in acc) / max(1, sum(c in acc for c in SKILLS))
    kept = skill_kept(skill, base_skill)
    return acc | {
        "skill": skill,
        "skill_kept": kept,
        "mean": sum(acc.values()) / len(acc),
        "balanced": (skill + acc.get(GAINED, math.nan)) / 2,
    }


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """What a trial may choose.

    Attributes:
        ops: merge ops (live-source ops: lerp, slerp, regmean or a registered one).
        sites: "pre" and/or "post".
        layers: candidate top layers of the merged run; None = every layer of the base.
        max_layers: at most this many consecutive layers merged, ending at the top layer.
        alpha_range: (low, high) of every per-layer alpha.
        positions: "last" and/or "all".
    """

    ops: tuple[str, ...] = ("lerp", "slerp")
    sites: tuple[str, ...] = ("pre", "post")
    layers: tuple[int, ...] | None = None
    max_layers: int = 2
    alpha_range: tuple[float, float] = (0.0, 1.0)
    positions: tuple[str, ...] = ("last",)

    def check(self, n_layers: int) -> "SearchSpace":
        for name, values in (("ops", self.ops), ("sites", self.sites), ("positions", self.positions)):
            if not values:
                raise LatentMergeError(f"space.{name} is empty; give at least one")
        for op in self.ops:
            if get_op(op).static_source:
                raise LatentMergeError(
                    f"space.ops contains {op!r}, which steers with static vectors; search live-source ops "
                    "(lerp, slerp, regmean)"
                )
        bad = [s for s in self.sites if s not in ("pre", "post")]
        if bad:
            raise LatentMergeError(f"space.sites={list(self.sites)}; expected 'pre' and/or 'post'")
        bad = [p for p in self.positions if p not in ("last", "all")]
        if bad:
            raise LatentMergeError(f"space.positions={list(self.positions)}; expected 'last' and/or 'all'")
        layers = self.layers if self.layers is not None else tuple(range(n_layers))
        out = [layer for layer in layers if not 0 <= layer < n_layers]
        if not layers or out:
            raise LatentMergeError(
                f"space.layers={list(layers)}; expected a non-empty list with 0 <= layer < {n_layers}"
            )
        if isinstance(self.max_layers, bool) or not isinstance(self.max_layers, int) or self.max_layers < 1:
            raise LatentMergeError(f"space.max_layers={self.max_layers!r}; expected an int >= 1")
        lo, hi = self.alpha_range
        if not (0.0 <= lo < hi <= 1.0):
            raise LatentMergeError(f"space.alpha_range={self.alpha_range}; expected 0 <= low < high <= 1")
        return dataclasses.replace(self, layers=tuple(sorted(set(layers))))

    def suggest(self, trial: "Trial") -> Recipe:
        """The trial's recipe (parameters: op, site, top, n_layers, alpha_0 for the top layer, alpha_1 for
        the one below, ..., positions)."""
        assert self.layers is not None
        op = trial.suggest_categorical("op", list(self.ops))
        site = trial.suggest_categorical("site", list(self.sites))
        top = trial.suggest_categorical("top", list(self.layers))
        k = trial.suggest_int("n_layers", 1, self.max_layers) if self.max_layers > 1 else 1
        k = min(k, top + 1)
        lo, hi = self.alpha_range
        alphas = {top - i: round(trial.suggest_float(f"alpha_{i}", lo, hi), 4) for i in range(k)}
        positions = trial.suggest_categorical("positions", list(self.positions))
        return Recipe(op=op, site=site, layers=alphas, positions=positions)


@dataclasses.dataclass
class SearchResult:
    """What `search` returns.

    Attributes:
        trials: one row per finished trial: number, recipe (YAML-able dict as JSON), the search-split
            metrics, feasible.
        pareto: the trials' Pareto front on (`pareto[0]`, `pareto[1]`).
        winner: the best feasible trial's Recipe.
        winner_trial: its trial number.
        search_scores: its metrics on the search split (used for the choice; not to report).
        test: its metrics on the test split (the numbers to report).
        base_test: the base's metrics on the test split.
        n_evaluated: trials this call evaluated (a resumed search runs only the remaining ones).
        paths: files written (name -> path).
    """

    trials: pd.DataFrame
    pareto: pd.DataFrame
    winner: Recipe
    winner_trial: int
    search_scores: dict[str, float]
    test: dict[str, float]
    base_test: dict[str, float]
    n_evaluated: int
    paths: dict[str, Path] = dataclasses.field(default_factory=dict)


def _splits(n_search: int, n_test: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Disjoint search and test examples per category, all from the held-out (eval) questions."""
    for name, n in (("n_search", n_search), ("n_test", n_test)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise LatentMergeError(f"{name}={n!r}; expected an int >= 1")
    search_set, test_set = [], []
    for c in CATEGORIES:
        examples = make_eval_set(c, n_search + n_test, seed)
        search_set += examples[:n_search]
        test_set += examples[n_search:]
    return search_set, test_set


def _storage_url(storage: str | Path | None, out: Path | None) -> str | None:
    if storage is None:
        return None if out is None else f"sqlite:///{(out / 'study.db').resolve()}"
    text = str(storage)
    return text if "://" in text else f"sqlite:///{Path(text).resolve()}"


def _check_settings(study: "Study", settings: dict[str, Any], where: str) -> None:
    """Store the settings on a new study; on an existing one, refuse different settings."""
    stored = study.user_attrs.get("settings")
    if stored is None:
        study.set_user_attr("settings", settings)
        return
    for key, value in settings.items():
        if key != "trials" and stored.get(key) != value:
            raise LatentMergeError(
                f"{key}={value!r} differs from the study stored in {where} ({key}={stored.get(key)!r}); "
                "resume with the same settings, or give a new out / study_name to start another search"
            )


def _violations(metrics: Mapping[str, float], constraints: Mapping[str, float]) -> list[float]:
    """Per constraint `metric >= value`: value - metric (feasible when <= 0)."""
    return [float(v) - float(metrics.get(m, -math.inf)) for m, v in constraints.items()]


def _describe(constraints: Mapping[str, float]) -> str:
    return " and ".join(f"{m} >= {v:g}" for m, v in constraints.items()) or "(none)"


def search(
    base: Model,
    sources: Models,
    *,
    trials: int = 20,
    target: str = GAINED,
    constraints: Mapping[str, float] | None = None,
    space: SearchSpace | None = None,
    n_search: int = 16,
    n_test: int = 32,
    seed: int = 0,
    data_seed: int = 0,
    sampler: str = "tpe",
    startup_trials: int | None = None,
    out: str | Path | None = None,
    storage: str | Path | None = None,
    study_name: str = "lmn-search",
    pareto: tuple[str, str] = ("skill_kept", GAINED),
    engine: str = "auto",
    progress: bool = True,
    parallel_trials: int = 1,
) -> SearchResult:
    """Search merge schedules of `sources` into `base` for the highest `target` under `constraints`.

    Arguments:
        base, sources: nnsight models (`lmn.load`); `sources` one model or a list (RegMean).
        trials: the study's total number of trials (a resumed study runs only the missing ones).
        target: the metric to maximise (`metric_names()`).
        constraints: `{metric: minimum}`, e.g. `{"skill_kept": 0.9}` (skill at least 0.9 x the base's).
        space: what a trial may choose (`SearchSpace()` by default).
        n_search, n_test: toy-task questions per category in the search and the (disjoint) test split.
        seed: the sampler's seed; data_seed: the seed of the questions.
        sampler: "tpe" (Optuna's TPESampler) or "random".
        startup_trials: TPE's random start-up trials (default: those of the study being resumed, else a
            third of `trials`, between 2 and 10; so a study extended to more trials keeps its own).
        out: folder for study.db, trials.csv, pareto.csv/.md/.png, winner.yaml, system.yaml, result.json.
        storage: an Optuna storage URL or SQLite file path (default: OUT/study.db; neither: in memory).
        study_name: the study's name in the storage.
        pareto: the two metrics of the Pareto front (both maximised).
        engine: `lmn.generate` engine.
        progress: show a tqdm bar with the best feasible target so far.
        parallel_trials: trials asked of Optuna at once (`study.ask()` K times) and evaluated in one
            pass as per-row recipes (`TaskAccuracy.batch`); the same resume guarantees (a trial asked
            but not told when the process died is run again).

    Raises `LatentMergeError` when no trial meets the constraints (after writing the trials table).
    """
    optuna = _import_optuna()
    constraints = dict(constraints or {})
    _check_search(target, constraints, trials, sampler, pareto)
    if isinstance(parallel_trials, bool) or not isinstance(parallel_trials, int) or parallel_trials < 1:
        raise LatentMergeError(f"parallel_trials={parallel_trials!r}; expected an int >= 1")
    n_layers = model_info(base).n_layers
    space = (space or SearchSpace()).check(n_layers)
    search_set, test_set = _splits(n_search, n_test, data_seed)
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    url = _storage_url(storage, out_dir)
    evaluate = TaskAccuracy(engine=engine)

    source_list = list(sources) if isinstance(sources, (list, tuple)) else [sources]

    def accuracies(recipe: Recipe | None, examples: list[Example]) -> dict[str, float]:
        model_sources = None if recipe is None else source_list
        return {c: r["accuracy"] for c, r in evaluate(base, model_sources, recipe, examples).items()}

    base_search = task_metrics(accuracies(None, search_set), None)
    settings = {
        "target": target, "constraints": constraints, "space": dataclasses.asdict(space),
        "n_search": n_search, "n_test": n_test, "seed": seed, "data_seed": data_seed, "sampler": sampler,
        "startup_trials": startup_trials, "base": model_info(base).name,
    }  # fmt: skip
    # start-up trials: given, else the stored study's (so `trials` can grow), else a third of `trials`
    study = _open_study(optuna, url, study_name, settings, default_startup=min(10, max(2, trials // 3)))

    def objective(trial: "Trial") -> float:
        return _run_trial(trial, space, lambda r: accuracies(r, search_set), base_search, constraints, target)

    def objectives(asked: list["Trial"]) -> list[float]:
        recipes = [space.suggest(trial) for trial in asked]
        scores = evaluate.batch(base, source_list, recipes, search_set)
        return [
            _run_trial(
                trial,
                space,
                lambda _r, acc=acc: {c: x["accuracy"] for c, x in acc.items()},
                base_search,
                constraints,
                target,
                recipe,
            )  # fmt: skip
            for trial, recipe, acc in zip(asked, recipes, scores, strict=True)
        ]

    evaluated = _run_trials(
        study, (objective, objectives, parallel_trials), trials, target, constraints, progress
    )
    table, front, paths = _write_trials(study, constraints, pareto, base_search, out_dir)
    best = _best_feasible(study, constraints)
    if best is None:
        release_engine(base)
        raise LatentMergeError(_no_feasible_message(table, constraints))
    winner, test, base_test = _test_winner(best, lambda r: accuracies(r, test_set))
    release_engine(base)
    result = SearchResult(
        trials=table, pareto=front, winner=winner, winner_trial=best.number,
        search_scores=dict(best.user_attrs["metrics"]), test=test, base_test=base_test,
        n_evaluated=evaluated, paths=paths,
    )  # fmt: skip
    if out_dir is not None:
        result.paths.update(_write_winner(result, base, sources, settings, out_dir))
    return result


def _test_winner(
    best: "FrozenTrial", accuracies: Accuracies
) -> tuple[Recipe, dict[str, float], dict[str, float]]:
    """The best feasible trial's recipe, and its metrics and the base's on the test split."""
    winner = Recipe.model_validate(best.user_attrs["recipe"] | {"name": f"search trial {best.number}"})
    base_test = task_metrics(accuracies(None), None)
    test = task_metrics(accuracies(winner), base_test["skill"])
    base_test["skill_kept"] = 1.0
    return winner, test, base_test


def _run_trial(
    trial: "Trial",
    space: SearchSpace,
    accuracies: Accuracies,
    base_search: dict[str, float],
    constraints: Mapping[str, float],
    target: str,
    recipe: Recipe | None = None,
) -> float:
    """One trial: suggest a recipe (or take the one suggested already), score it on the search split,
    record it; returns its target."""
    recipe = space.suggest(trial) if recipe is None else recipe
    metrics = task_metrics(accuracies(recipe), base_search["skill"])
    trial.set_user_attr("recipe", recipe.to_dict())
    trial.set_user_attr("metrics", metrics)
    for (m, v), violation in zip(constraints.items(), _violations(metrics, constraints), strict=True):
        trial.set_constraint(f"{m}>={v:g}", violation)  # TPE prefers trials that meet them
    return metrics[target]


def _import_optuna() -> ModuleType:
    try:
        import optuna
    except ImportError:
        raise LatentMergeError(
            "search needs Optuna: pip install 'latent_merge_nnsight[search]' (or pip install optuna)"
        ) from None
    return optuna


def _write_trials(
    study: "Study",
    constraints: Mapping[str, float],
    pareto: tuple[str, str],
    base_search: dict[str, float],
    out_dir: Path | None,
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Path]]:
    """The trials table and its Pareto front, written to `out_dir` (trials.csv, pareto.*) when given."""
    table = _trials_table(study, constraints)
    paths: dict[str, Path] = {}
    front = pareto_front(table, *pareto) if not table.empty else table
    if out_dir is not None:
        paths["trials"] = out_dir / "trials.csv"
        table.to_csv(paths["trials"], index=False)
        paths.update(_write_pareto(table, front, pareto, base_search, out_dir))
    return table, front, paths


def _check_search(
    target: str, constraints: Mapping[str, object], trials: object, sampler: str, pareto: tuple[str, str]
) -> None:
    """`search`'s arguments: metrics it knows, finite minimums, a trial count, a sampler."""
    names = metric_names()
    for what, metric in [("target", target), *(("constraints", m) for m in constraints)]:
        if metric not in names:
            raise LatentMergeError(f"{what} names {metric!r}; expected one of: {', '.join(names)}")
    for m, v in constraints.items():
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise LatentMergeError(f"constraints[{m!r}]={v!r}; expected a finite number")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise LatentMergeError(f"trials={trials!r}; expected an int >= 1")
    if sampler not in SAMPLERS:
        raise LatentMergeError(f"sampler={sampler!r}; expected one of: {', '.join(SAMPLERS)}")
    for metric in pareto:
        if metric not in names:
            raise LatentMergeError(f"pareto names {metric!r}; expected two of: {', '.join(names)}")


def _open_study(
    optuna: ModuleType, url: str | None, study_name: str, settings: dict[str, Any], default_startup: int
) -> "Study":
    """The study in `url` (created, or resumed after checking it ran with the same `settings`), with
    trials a dead process left running failed and queued again. `settings["startup_trials"]` None is
    set here: the stored study's, else `default_startup`."""

    def make_sampler(sampler_seed: int) -> Any:
        if settings["sampler"] == "tpe":
            return optuna.samplers.TPESampler(seed=sampler_seed, n_startup_trials=settings["startup_trials"])
        return optuna.samplers.RandomSampler(seed=sampler_seed)

    seed = settings["seed"]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        storage=url,
        study_name=study_name,
        load_if_exists=True,
        direction="maximize",
        sampler=optuna.samplers.RandomSampler(seed=seed),  # replaced below, once the settings are known
    )
    if settings["startup_trials"] is None:
        stored = study.user_attrs.get("settings") or {}
        settings["startup_trials"] = stored.get("startup_trials", default_startup)
    # a resumed study's sampler continues from a seed of its own, so that it does not propose the first
    # trials' parameters again (still deterministic for a given seed and history)
    study.sampler = make_sampler(seed + len(study.get_trials(deepcopy=False)))
    _check_settings(study, json.loads(json.dumps(settings)), url or "memory")
    State = optuna.trial.TrialState
    for t in study.get_trials(deepcopy=False, states=(State.RUNNING,)):
        # a trial the last process was running when it died: fail it and run its parameters again
        study.tell(t.number, state=State.FAIL)
        study.enqueue_trial(t.params)
    return study


def _run_trials(
    study: "Study",
    objective: Objectives,
    trials: int,
    target: str,
    constraints: Mapping[str, float],
    progress: bool,
) -> int:
    """Run the trials the study lacks to reach `trials` complete ones; returns how many ran.

    `objective` is `(one, many, k)`: with k > 1, k trials are asked at once and `many(trials)` scores
    them together (one pass), then each is told its value; a failing pass fails its trials."""
    objective, objectives, parallel = objective
    import optuna
    from tqdm.auto import tqdm

    done = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    remaining = max(0, trials - done)
    bar = tqdm(total=trials, initial=done, desc="lmn search", unit="trial", disable=not progress)
    evaluated = [0]

    def report(study: "Study", trial: "FrozenTrial") -> None:
        evaluated[0] += 1
        best = _best_feasible(study, constraints)
        bar.set_postfix_str(
            f"best {target}={best.value:.3f} (trial {best.number})" if best else "no feasible trial yet",
            refresh=False,
        )
        bar.update()

    try:
        if remaining and parallel == 1:
            study.optimize(objective, n_trials=remaining, callbacks=[report])
        while remaining > 0 and parallel > 1:
            asked = [study.ask() for _ in range(min(parallel, remaining))]
            try:
                values = objectives(asked)
            except BaseException:
                for trial in asked:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                raise
            for trial, value in zip(asked, values, strict=True):
                study.tell(trial, value)
                report(study, study.trials[trial.number])
            remaining -= len(asked)
    finally:
        bar.close()
    return evaluated[0]


def _best_feasible(study: "Study", constraints: Mapping[str, float]) -> "FrozenTrial | None":
    import optuna

    best = None
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        ok = all(v <= 1e-12 for v in _violations(t.user_attrs.get("metrics", {}), constraints))
        if ok and (best is None or t.value > best.value):
            best = t
    return best


def _trials_table(study: "Study", constraints: Mapping[str, float]) -> pd.DataFrame:
    import optuna

    rows = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        metrics = t.user_attrs.get("metrics", {})
        recipe = Recipe.model_validate(t.user_attrs["recipe"])
        rows.append(
            {"trial": t.number, "setup": _setup_text(recipe), "recipe": json.dumps(recipe.to_dict()),
             **metrics, "feasible": all(v <= 1e-12 for v in _violations(metrics, constraints))}
        )  # fmt: skip
    return pd.DataFrame(rows)


def _setup_text(recipe: Recipe) -> str:
    alphas = ", ".join(f"{k}: {v:g}" for k, v in sorted(recipe.layers.items()))  # type: ignore[union-attr]
    return f"{recipe.op} {recipe.site} {{{alphas}}} {recipe.resolved_positions()}"


def _no_feasible_message(table: pd.DataFrame, constraints: Mapping[str, float]) -> str:
    n = len(table)
    if not n:
        return f"no trial finished, so none met the constraints {_describe(constraints)}"
    worst = table.apply(lambda r: max(_violations(r.to_dict(), constraints)), axis=1)
    row = table.loc[worst.idxmin()]
    reached = ", ".join(f"{m}={float(row[m]):.3f}" for m in constraints)
    return (
        f"no trial of {n} met the constraints {_describe(constraints)} on the search split; the closest, "
        f"trial {int(row['trial'])} ({row['setup']}), reached {reached}. Loosen the constraints "
        "(--min METRIC=VALUE) or run more trials (--trials)"
    )


def _write_pareto(
    table: pd.DataFrame, front: pd.DataFrame, axes: Sequence[str], base: Mapping[str, float], out: Path
) -> dict[str, Path]:
    x, y = axes
    paths = {"pareto": out / "pareto.csv", "pareto_md": out / "pareto.md", "pareto_png": out / "pareto.png"}
    front.to_csv(paths["pareto"], index=False)
    lines = [f"| trial | setup | {x} | {y} | feasible |", "|---|---|---|---|---|"]
    lines += [
        f"| {int(r['trial'])} | {r['setup']} | {r[x]:.3f} | {r[y]:.3f} | {bool(r['feasible'])} |"
        for r in front.to_dict("records")
    ]
    paths["pareto_md"].write_text(
        f"Pareto front of {len(table)} trials (search split)\n\n" + "\n".join(lines) + "\n"
    )
    refs = pd.DataFrame([{x: 1.0 if x == "skill_kept" else base.get(x), y: base.get(y), "name": "base"}])
    pareto_figure(
        {"search trials": table}, x, y, references=refs, label="name", path=paths["pareto_png"],
        title="lmn search: trials and their Pareto front (search split)",
    )  # fmt: skip
    return paths


def _write_winner(
    result: SearchResult, base: Model, sources: Models, settings: dict[str, Any], out: Path
) -> dict[str, Path]:
    paths = {"winner": out / "winner.yaml", "system": out / "system.yaml", "result": out / "result.json"}
    result.winner.save(paths["winner"])
    srcs = sources if isinstance(sources, (list, tuple)) else [sources]
    system = {
        "name": f"search-trial-{result.winner_trial}",
        "kind": "latent",
        "base": model_info(base).name,
        "sources": [model_info(s).name for s in srcs],
        "recipe": result.winner.to_dict(),
        "sampling": {"max_new_tokens": 64, "do_sample": False},
    }
    import yaml

    paths["system"].write_text(yaml.safe_dump(system, sort_keys=False))
    record = {
        "winner_trial": result.winner_trial, "winner": result.winner.to_dict(), "test": result.test,
        "base_test": result.base_test, "search": result.search_scores, "settings": settings,
        "n_trials": len(result.trials),
    }  # fmt: skip
    paths["result"].write_text(json.dumps(record, indent=2))
    return paths
