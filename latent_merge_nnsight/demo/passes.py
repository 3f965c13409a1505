"""Running the demo's setups: the pair loaded once, every setup of the grid and then of the finer alphas
evaluated by one `TaskAccuracy` evaluator (`analysis.evaluators`), category by category.

**Per-row passes.** Latent merges of the pair's live states share their sources, so consecutive ones run
together as per-row recipes (`TaskAccuracy.generations`, `lmn.generate(recipe=[...])`), up to `max_batch`
rows (setups x prompts of a category) per engine pass, as `analysis.sweep` runs its cells. The single
models, logit ensembles, weight merges and steering run one setup a call. `max_batch=1` runs every setup
alone (the one-setup-at-a-time path: the same results, except where a float32 near-tie flips a token).
The probe (`NormProbe`) measures every setup of a pass; a pass never holds two setups that merge at the
same (op, site, layer, alpha), which is how it tells their rows apart.
"""

import contextlib
import math
import time
from dataclasses import dataclass, replace

from latent_merge_nnsight.analysis.evaluators import TaskAccuracy
from latent_merge_nnsight.analysis.representations import as_model_list
from latent_merge_nnsight.demo.grid import (
    QUICK_GRID,
    DemoGrid,
    Setup,
    calibration,
    default_layers,
    eval_sets,
    refined,
    setups,
)
from latent_merge_nnsight.demo.probe import NormProbe
from latent_merge_nnsight.demo.report import GAINED
from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.evaluation.tasks import Example, accuracy
from latent_merge_nnsight.generation import release_engine
from latent_merge_nnsight.generation.prefix import share_prompt_states
from latent_merge_nnsight.models import load, model_info, quiet_hf_progress
from latent_merge_nnsight.nouns import Model
from latent_merge_nnsight.recipe import Recipe

__all__ = ["DEFAULT_MAX_BATCH", "GridRun", "passes", "run_grid"]

DEFAULT_MAX_BATCH = 384
"""Rows (setups x a category's prompts) per engine pass: 8 setups of the full grid's 48 prompts."""

Row = dict[str, object]
Texts = dict[str, dict[str, list[str]]]
Result = tuple[Setup, str, float, int, list[str], dict[str, object]]


@dataclass
class GridRun:
    """What evaluating a grid produced: one row per (setup, category), the texts by setup label, and the
    recipe of each per-row setup by label."""

    rows: list[Row]
    texts: Texts
    eval_sets: dict[str, list[Example]]
    grid: DemoGrid  # with its layers filled in for the model
    n_layers: int
    n_refined: int
    recipes: dict[str, Recipe]
    bars: list[tuple[int, int]]
    """Per progress bar (one per phase): (its total, the setups it counted)."""
    n_passes: int = 0
    """Passes run (a pass: one setup, or per-row setups together, on each category)."""


def passes(todo: list[Setup], per_pass: int, n_layers: int) -> list[list[Setup]]:
    """The setups to run, one list per engine pass: consecutive per-row setups together, up to `per_pass`
    of them and never two that merge at the same (op, site, layer, alpha); the others alone."""
    out: list[list[Setup]] = []
    seen: set[tuple] = set()
    for setup in todo:
        keys = NormProbe.keys(setup.recipe, n_layers) if setup.rows else set()
        last = out[-1] if out else None
        if setup.rows and last and last[0].rows and len(last) < per_pass and not keys & seen:
            last.append(setup)
            seen |= keys
        else:
            out.append([setup])
            seen = set(keys)
    return out


def _evaluate(
    group: list[Setup],
    evaluator: TaskAccuracy,
    sets: dict[str, list[Example]],
    probe: NormProbe,
    n_layers: int,
) -> tuple[Model, list[Result]]:
    """The model that ran a pass, and each setup of the pass on each category: (setup, category,
    accuracy, n, texts, probe summary)."""
    made = [s.make() for s in group]
    out: list[Result] = []
    model, sources = made[0][0], made[0][1]
    recipes = [m[2] for m in made]
    if len(group) > 1:
        sources = as_model_list(sources)  # the per-row setups' common source (a list for RegMean)
    for category, examples in sets.items():
        probe.reset()
        with probe.recording(recipes if len(recipes) > 1 else recipes[0], n_layers):
            texts = evaluator.generations(model, sources, recipes, examples)
        for setup, recipe, outs in zip(group, recipes, texts, strict=True):
            seen = (
                probe.summary(recipe)
                if isinstance(recipe, Recipe)
                else {"norm_ratio": math.nan, "source_weight": {}}
            )
            out.append((setup, category, accuracy(examples, outs)[category], len(outs), outs, seen))
    order = {id(setup): k for k, setup in enumerate(group)}
    return model, sorted(out, key=lambda r: order[id(r[0])])  # setup by setup, categories in turn


def run_grid(
    base: str,
    source: str,
    grid: DemoGrid,
    engine: str,
    progress: bool,
    max_batch: int = DEFAULT_MAX_BATCH,
    quick: bool = False,
) -> GridRun:
    """Load the pair and evaluate every setup of the coarse grid, then those of the finer alpha grid
    (`quick`: a grid without layers gets the quick grid's, as `QUICK_GRID` does)."""
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise LatentMergeError(f"max_batch={max_batch!r}; expected an int >= 1 (rows per engine pass)")
    from tqdm.auto import tqdm

    rows: list[Row] = []
    texts: Texts = {}
    recipes: dict[str, Recipe] = {}
    bars: list[tuple[int, int]] = []
    n_passes = 0
    probe = NormProbe()
    evaluator = TaskAccuracy(batch_size=max_batch, engine=engine)
    with quiet_hf_progress(), contextlib.ExitStack() as shared:
        base_model = load(base)
        ft_model = load(source)
        # every setup prefills the same prompts: the pair's unmerged blocks are computed once
        shared.enter_context(share_prompt_states(base_model, ft_model))
        n_layers = model_info(base_model).n_layers
        last = n_layers - 1
        layers = (
            grid.layers if grid.layers is not None else default_layers(n_layers, quick or grid is QUICK_GRID)
        )
        post = grid.post_layers if grid.post_layers is not None else sorted({max(0, last - 1), last})
        grid = replace(grid, layers=tuple(layers), post_layers=tuple(post))
        sets = eval_sets(grid.n_per_category, grid.seed)
        texts_cal = calibration(base_model.tokenizer, grid.n_calibration, grid.seed)
        per_pass = max(1, max_batch // grid.n_per_category)

        def run(todo: list[Setup], desc: str) -> None:
            nonlocal n_passes
            # one bar per phase, each with its total from the start (the finer alphas are known only
            # after the grid has run)
            bar = tqdm(total=len(todo), desc=desc, unit="setup", disable=not progress, dynamic_ncols=True)
            counted = 0
            for group in passes(todo, per_pass, n_layers):
                more = f" (+{len(group) - 1})" if len(group) > 1 else ""
                bar.set_postfix_str(group[0].label + more, refresh=False)
                t0 = time.perf_counter()
                model, results = _evaluate(group, evaluator, sets, probe, n_layers)
                if model is not base_model and model is not ft_model:
                    release_engine(model)
                seconds = (time.perf_counter() - t0) / len(group)
                for setup, category, acc, n, outs, seen in results:
                    weights = seen["source_weight"]
                    assert isinstance(weights, dict)
                    weight = weights.get(last, float("nan")) if setup.site == "post" else None
                    rows.append(
                        {"system": setup.system, "op": setup.op, "site": setup.site, "layer": setup.layer,
                         "alpha": setup.alpha, "lam": setup.lam, "schedule": setup.schedule,
                         "category": category, "accuracy": acc, "n": n, "norm_ratio": seen["norm_ratio"],
                         "source_weight": weight, "seconds": seconds / len(sets)}
                    )  # fmt: skip
                    texts.setdefault(setup.label, {})[category] = outs
                for setup in group:
                    if setup.rows:
                        recipes[setup.label] = setup.recipe  # type: ignore[assignment]
                bar.update(len(group))
                counted += len(group)
                n_passes += 1
            bar.close()
            bars.append((len(todo), counted))

        run(list(setups(base_model, ft_model, (base, source), grid, n_layers, texts_cal)), "lmn demo: grid")
        base_reasoning = next(
            r["accuracy"] for r in rows if r["system"] == "base" and r["category"] == GAINED
        )
        finer = refined(rows, base_model, ft_model, grid, float(base_reasoning), last)  # type: ignore[arg-type]
        run(finer, "lmn demo: finer alphas")
        release_engine(base_model)
        release_engine(ft_model)
    return GridRun(rows, texts, sets, grid, n_layers, len(finer), recipes, bars, n_passes)
