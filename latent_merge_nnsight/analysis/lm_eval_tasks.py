"""`LmEvalTasks`: lm-eval tasks as a sweep evaluator (the paper's Experiment C on standard tasks).

    from latent_merge_nnsight import analysis

    df = analysis.sweep(base, ft, ops=["lerp", "slerp"], layers=[8, 16], alphas=[0.3, 0.7],
                        evaluate=analysis.LmEvalTasks(["arc_easy", "gsm8k"], limit=100), prompts=None)
    analysis.heatmaps(df, "arc_easy/acc")

The evaluator brings its own data (the tasks' documents), so the sweep runs with `prompts=None`. Each
`batch` of cells is one `LatentMergeLM.from_models(base, sources, recipes)`: every request lm-eval sends
becomes one row per cell, scored (`lmn.score`) or generated (`lmn.generate`) with per-row recipes in
shared batches of `batch_size` rows. lm-eval's own evaluator then runs once per cell on that cell's
answers (the models do not run again), so each cell's metrics are lm-eval's, computed by its metric code,
and equal a one-recipe `lm_eval.simple_evaluate` with the `latent-merge` model (greedy generations token
for token; sampled ones are drawn per row of the shared pass).

Metrics are named `TASK/METRIC` (lm-eval's filter "none"), else `TASK/METRIC/FILTER`, e.g. `toy_mc/acc`,
`gsm8k/exact_match/strict-match`; standard errors (`TASK/acc_stderr`) come with `bootstrap_iters > 0`.
Needs the `lmeval` extra; this module imports lm-eval only when an evaluator is made.
"""

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from latent_merge_nnsight.analysis.representations import as_recipe
from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.nouns import Model
from latent_merge_nnsight.ops import get_op
from latent_merge_nnsight.recipe import Recipe

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

    from latent_merge_nnsight.evaluation.lm_eval_model import LatentMergeLM

__all__ = ["LmEvalTasks"]

MISSING = "lm-eval is not installed; install the extra: pip install 'latent_merge_nnsight[lmeval]'"
ENGINES = ("auto", "fast", "nnsight")

Metrics = dict[str, float]


def _int_at_least(name: str, value: object, low: int, none_ok: bool = False) -> None:
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        alt = " or None" if none_ok else ""
        raise LatentMergeError(f"{name}={value!r}; expected an int >= {low}{alt}")


class LmEvalTasks:
    """Evaluator: lm-eval tasks, scored by lm-eval, for each (merged) system of a sweep; see the module.

    Arguments:
        tasks: lm-eval task (or group) names.
        include_path: a folder of extra task YAMLs (lm-eval's `--include_path`).
        include_defaults: also index lm-eval's own tasks (False: only `include_path`'s, faster).
        limit: documents per task at most (an int), or a fraction of each task (a float in (0, 1]).
        num_fewshot: few-shot examples per prompt (None: each task's own).
        batch_size: rows (request x cell) per forward; also the sweep's default cells per pass.
        max_length, max_gen_toks: as the `latent-merge` model's (None: the model's context window).
        apply_chat_template: send prompts through the tokenizer's chat template.
        bootstrap_iters: lm-eval's stderr bootstrap draws (0: no standard errors, no bootstrap per cell).
        seed: lm-eval's random seeds (python, numpy, torch, few-shot sampling).
        engine: "auto", "fast" or "nnsight".

    `evaluator(model, sources, recipe, None)` scores one system; `batch(model, sources, recipes, None)`
    several at once (what `sweep` calls). Returns `{"TASK/METRIC": value}` per system.
    """

    needs_prompts = False
    """`sweep` runs it with `prompts=None`: the documents come from the tasks."""

    def __init__(
        self,
        tasks: str | Sequence[str],
        *,
        include_path: str | Path | None = None,
        include_defaults: bool = True,
        limit: int | float | None = None,
        num_fewshot: int | None = None,
        batch_size: int = 16,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        apply_chat_template: bool = False,
        bootstrap_iters: int = 0,
        seed: int = 0,
        engine: str = "auto",
    ) -> None:
        names = [tasks] if isinstance(tasks, str) else list(tasks)
        if not names or not all(isinstance(t, str) and t for t in names):
            raise LatentMergeError(f"tasks={tasks!r}; expected one or more lm-eval task names")
        if include_path is not None and not Path(include_path).is_dir():
            raise LatentMergeError(f"include_path={str(include_path)!r}: no such folder")
        if limit is not None and not (
            (isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1)
            or (isinstance(limit, float) and 0.0 < limit <= 1.0)
        ):
            raise LatentMergeError(f"limit={limit!r}; expected an int >= 1, a fraction in (0, 1], or None")
        _int_at_least("num_fewshot", num_fewshot, 0, none_ok=True)
        _int_at_least("batch_size", batch_size, 1)
        _int_at_least("max_length", max_length, 2, none_ok=True)
        _int_at_least("max_gen_toks", max_gen_toks, 1)
        _int_at_least("bootstrap_iters", bootstrap_iters, 0)
        _int_at_least("seed", seed, 0)
        if engine not in ENGINES:
            raise LatentMergeError(f"engine={engine!r}; expected one of {', '.join(ENGINES)}")
        self.tasks = names
        self.include_path = None if include_path is None else str(Path(include_path).resolve())
        self.limit = limit
        self.num_fewshot = num_fewshot
        self.batch_size = batch_size
        self.max_length = max_length
        self.max_gen_toks = max_gen_toks
        self.apply_chat_template = bool(apply_chat_template)
        self.bootstrap_iters = bootstrap_iters
        self.seed = seed
        self.engine = engine
        self._manager = _task_manager(self.include_path, include_defaults)
        unknown = [t for t in names if t not in self._manager.all_tasks]
        if unknown:
            where = f" (nor in include_path {self.include_path})" if self.include_path else ""
            raise LatentMergeError(f"tasks: unknown task(s) {unknown}: not lm-eval tasks{where}")

    def __repr__(self) -> str:
        return f"LmEvalTasks({self.tasks}, limit={self.limit}, num_fewshot={self.num_fewshot})"

    @property
    def settings(self) -> dict[str, object]:
        """What decides the results (`sweep`'s fingerprint: a results file of other settings is refused)."""
        return {
            "tasks": self.tasks,
            "include_path": self.include_path,
            "limit": self.limit,
            "num_fewshot": self.num_fewshot,
            "max_length": self.max_length,
            "max_gen_toks": self.max_gen_toks,
            "apply_chat_template": self.apply_chat_template,
            "bootstrap_iters": self.bootstrap_iters,
            "seed": self.seed,
        }

    def __call__(
        self, model: Model, sources: Sequence[Model], recipe: Recipe | None, prompts: object = None
    ) -> Metrics:
        return self.batch(model, sources, [recipe], prompts)[0]

    def batch(
        self, model: Model, sources: Sequence[Model], recipes: Sequence[Recipe | None], prompts: object = None
    ) -> list[Metrics]:
        """`[self(model, sources, r) for r in recipes]`, the live-source recipes (and None) answered
        together (one row per request and recipe); steering (`delta`) recipes one at a time."""
        if prompts is not None:
            raise LatentMergeError(
                f"prompts has type {type(prompts).__name__}; LmEvalTasks reads its documents from the "
                "lm-eval tasks: pass prompts=None"
            )
        rows = [None if r is None else as_recipe(r) for r in recipes]
        srcs = list(sources)
        together = [j for j, r in enumerate(rows) if r is None or not get_op(r.op).static_source]
        groups = ([together] if together else []) + [[j] for j in range(len(rows)) if j not in together]
        results: list[Metrics] = [{} for _ in rows]
        for group in groups:
            merging = any(rows[j] is not None for j in group)
            lm = self._model(model, (srcs[0] if len(srcs) == 1 else srcs) if merging else None, group, rows)
            for k, j in enumerate(group):
                lm.use_recipe(k)
                results[j] = metrics_of(self._evaluate(lm))
        return results

    def _model(
        self, model: Model, sources: Model | list[Model] | None, group: list[int], rows: list[Recipe | None]
    ) -> "LatentMergeLM":
        from latent_merge_nnsight.evaluation.lm_eval_model import LatentMergeLM

        return LatentMergeLM.from_models(
            model,
            sources,
            [rows[j] for j in group],
            engine=self.engine,
            batch_size=self.batch_size,
            max_length=self.max_length,
            max_gen_toks=self.max_gen_toks,
        )

    def _evaluate(self, lm: "LatentMergeLM") -> Mapping[str, object]:
        """lm-eval's `simple_evaluate` of the tasks on `lm` (its chosen recipe), seeded as `lmn eval` is."""
        import lm_eval

        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=self.tasks,
            num_fewshot=self.num_fewshot,
            limit=self.limit,
            task_manager=self._manager,
            apply_chat_template=self.apply_chat_template,
            bootstrap_iters=self.bootstrap_iters,
            log_samples=False,
            random_seed=self.seed,
            numpy_random_seed=self.seed,
            torch_random_seed=self.seed,
            fewshot_random_seed=self.seed,
        )
        if out is None:  # lm-eval answers None on processes other than rank 0
            raise LatentMergeError("lm-eval returned no results (LmEvalTasks runs in one process)")
        return out


def metrics_of(results: Mapping[str, object]) -> Metrics:
    """lm-eval's results (`simple_evaluate`'s) as `{"TASK/METRIC[/FILTER]": value}`: every numeric metric
    of every task and group ("N/A" standard errors are left out)."""
    out: Metrics = {}
    per_task = results["results"]
    assert isinstance(per_task, Mapping)
    for task, metrics in per_task.items():
        for key, value in metrics.items():
            metric, sep, filt = str(key).partition(",")
            if not sep or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # "alias", "name", "N/A"
            out[f"{task}/{metric}" if filt == "none" else f"{task}/{metric}/{filt}"] = float(value)
    if not out:
        raise LatentMergeError(f"lm-eval reported no numeric metric for tasks {sorted(per_task)}")
    return out


def _task_manager(include_path: str | None, include_defaults: bool) -> "TaskManager":
    try:
        from lm_eval.tasks import TaskManager  # (after our package: nnsight's fix-ups come first)
    except ImportError as e:
        if e.name is not None and e.name.split(".")[0] == "lm_eval":
            raise LatentMergeError(MISSING) from None
        raise
    return TaskManager(include_path=include_path, include_defaults=include_defaults)
