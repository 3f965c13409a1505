"""`lmn demo`: the paper's Experiment A in miniature, offline, on the shipped toy pair.

`run_demo()` evaluates, on held-out toy tasks (`evaluation.tasks`, greedy exact match per category):

- the base (`toy-base`) and the fine-tune (`toy-reasoner`) alone;
- the logit ensemble `(1-b)*logits_base + b*logits_ft` for a few `b`;
- weight merges: LERP and SLERP through mergekit, and RegMean (Jin et al. 2023) in weight space, for a few
  alphas (each model's Gram matrices from its own training-like text);
- latent merges, all generated in lockstep with `lmn.generate`: LERP, SLERP, the paper's latent RegMean
  and delta steering at site `pre` of every layer and at site `post` of the last layer (alpha = 1
  included: the limiting rows), a finer alpha grid wherever reasoning jumps between neighbouring alphas,
  and a few multi-layer schedules per op at both sites;

and writes `results.csv`, `report.md` and PNG figures to `out`. Per latent setup it also records the mean
norm ratio `|h_source|/|h_base|` at the merged layers and, merged at the last block's output, the
effective logit-ensemble weight of the source (`demo.probe`).

**Sites.** Site `post` of layer L is the same residual stream as site `pre` of layer L+1, so `post` adds
one new place to merge: the last block's output, which feeds the base's final norm and LM head directly.
The demo runs `post` there, plus one mid-layer `post` curve to check the identity against `pre`.

**Latent RegMean with one fine-tune.** The toy pair has one FT, so latent RegMean runs with
`sources=[reasoner]` in the paper's lambda parametrisation, `beta = 1/(1+lambda)`; with one source the
paper's formula `(1-beta)*h_base + beta*h_ft` is LERP at `alpha = beta`, and the report checks that its
outputs equal LERP's where the grids meet. Weight-space RegMean is a different, data-dependent method.

**Delta steering** adds `alpha * mean(h_ft - h_base)` at one layer to every token (the means over the
calibration texts of both models); alpha is its strength.

**Comparing alphas across spaces.** A nominal alpha does not mean the same in weight and latent space, so
the report compares families by what they trade: skill kept (mean accuracy over knowledge, math and
coding) against reasoning accuracy, with each family's Pareto front.
"""

import contextlib
import json
import platform
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from latent_merge_nnsight.baselines.weights import collect_grams, merge_weights
from latent_merge_nnsight.deltas import compute_deltas
from latent_merge_nnsight.demo.probe import NormProbe
from latent_merge_nnsight.demo.report import (
    GAINED,
    WEIGHT_OPS,
    best_row,
    mean_table,
    setup_label,
    write_figures,
    write_report,
)
from latent_merge_nnsight.ensemble import Ensemble
from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.evaluation.tasks import (
    CATEGORIES,
    MAX_NEW_TOKENS,
    chat_messages,
    direct_target,
    make_eval_set,
    make_train_set,
    score,
)
from latent_merge_nnsight.generation import generate, release_engine
from latent_merge_nnsight.generation.prefix import share_prompt_states
from latent_merge_nnsight.inputs import encode
from latent_merge_nnsight.models import load, model_info, quiet_hf_progress
from latent_merge_nnsight.ops import regmean_beta
from latent_merge_nnsight.recipe import Recipe
from latent_merge_nnsight.zoo import ZOO, zoo_path

__all__ = [
    "COLUMNS",
    "DEFAULT_GRID",
    "QUICK_GRID",
    "DemoGrid",
    "DemoResult",
    "Schedule",
    "export_docs",
    "run_demo",
]

COLUMNS = [
    "system", "op", "site", "layer", "alpha", "lam", "schedule", "category", "accuracy", "n",
    "norm_ratio", "source_weight", "seconds",
]  # fmt: skip
SAMPLE_SYSTEMS = ("base", "reasoner", "ensemble", "weight", "latent")
"""Systems whose generations the run keeps for the report's sample table."""


@dataclass(frozen=True)
class Schedule:
    """A multi-layer latent merge of the grid: `op` at `site` with per-layer alphas (`layers`), or one
    `alpha` (a number or a gradient list over depth) for a list of layers / "all"."""

    op: str
    site: str
    layers: dict[int, float] | tuple[int, ...] | str
    alpha: float | tuple[float, ...] | None = None

    def recipe(self) -> Any:
        layers = self.layers if isinstance(self.layers, (dict, str)) else list(self.layers)
        alpha = list(self.alpha) if isinstance(self.alpha, tuple) else self.alpha
        return Recipe(op=self.op, site=self.site, layers=layers, alpha=alpha)

    @property
    def text(self) -> str:
        """The schedule as the report shows it, e.g. `{4: 0.25, 5: 0.875}` or `[4, 5] x 0.75`."""
        if isinstance(self.layers, dict):
            return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(self.layers.items())) + "}"
        where = self.layers if isinstance(self.layers, str) else "[" + ", ".join(map(str, self.layers)) + "]"
        if isinstance(self.alpha, tuple):
            return f"{where} x [" + ", ".join(f"{a:g}" for a in self.alpha) + "]"
        return f"{where} x {self.alpha:g}"


DEFAULT_SCHEDULES: tuple[Schedule, ...] = tuple(
    s
    for op in ("lerp", "slerp")
    for s in (
        Schedule(op, "post", {4: 0.25, 5: 0.875}),
        Schedule(op, "post", (4, 5), 0.75),
        Schedule(op, "pre", (3, 4, 5), 0.5),
        Schedule(op, "pre", "all", (0.0, 1.0)),
    )
) + (Schedule("delta", "pre", (2, 3, 4), 0.5),)
"""Multi-layer schedules (layers refer to the toy pair's 6 blocks; the run drops any past the model)."""


@dataclass(frozen=True)
class DemoGrid:
    """What the demo evaluates.

    Attributes:
        n_per_category: held-out examples per category.
        layers: site-`pre` merge layers; None = every layer from 1 to the last (quick: the middle and last).
        post_layers: site-`post` merge layers; None = the last layer and the one before it (whose `post`
            equals `pre` of the last layer: the report checks the identity).
        alphas: latent LERP/SLERP alphas (coarse grid; 1.0 gives the limiting rows). At alpha = 1 SLERP and
            RegMean return the source state itself, as LERP does, so only LERP runs there.
        regmean_lambdas: latent RegMean lambdas (beta = 1/(1+lambda); lambda 0 is beta 1, left to LERP).
        limits: also run LERP alpha = 1 at site `pre` of layer 0 (the base's blocks on the source's
            embeddings), the other end from `post` of the last layer (the source's blocks under the base's
            final norm and head).
        delta_strengths: delta-steering strengths.
        schedules: multi-layer latent merges.
        refine: alphas inserted between two neighbouring alphas of a single-layer LERP/SLERP curve whose
            reasoning accuracies differ by at least `refine_jump` (0: no refinement).
        refine_jump: the jump in reasoning accuracy that counts as a transition.
        weight_alphas: weight-merge alphas (LERP, SLERP, RegMean).
        ensemble_bs: logit-ensemble weights of the fine-tune.
        n_calibration: training-like texts per model for weight RegMean and the steering deltas.
        off_diagonal: weight RegMean's factor on off-diagonal Gram entries (the paper's alpha).
        seed: seed of the evaluation and calibration sets.
    """

    n_per_category: int = 48
    layers: tuple[int, ...] | None = None
    post_layers: tuple[int, ...] | None = None
    alphas: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    regmean_lambdas: tuple[float, ...] = (3.0, 1.0 / 3.0)
    delta_strengths: tuple[float, ...] = (0.5, 1.0)
    limits: bool = True
    schedules: tuple[Schedule, ...] = DEFAULT_SCHEDULES
    refine: int = 4
    refine_jump: float = 0.25
    weight_alphas: tuple[float, ...] = (0.25, 0.5, 0.75)
    ensemble_bs: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9)
    n_calibration: int = 64
    off_diagonal: float = 0.9
    seed: int = 0


DEFAULT_GRID = DemoGrid()
QUICK_GRID = DemoGrid(
    n_per_category=8,
    alphas=(0.5, 1.0),
    regmean_lambdas=(1.0,),
    delta_strengths=(1.0,),
    schedules=(Schedule("slerp", "post", {4: 0.25, 5: 0.875}), Schedule("lerp", "pre", (3, 4, 5), 0.5)),
    refine=1,
    refine_jump=0.5,
    weight_alphas=(0.5,),
    ensemble_bs=(0.5,),
    n_calibration=16,
)


@dataclass
class DemoResult:
    """What `run_demo` returns: the tidy results table and the files written (name -> path)."""

    results: pd.DataFrame
    paths: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass(frozen=True)
class _System:
    """One evaluated setup; `make()` returns (model, sources, recipe) for `lmn.generate`."""

    system: str
    op: str | None
    layer: int | None
    alpha: float | None
    lam: float | None
    make: Callable[[], tuple[Any, Any, Any]]
    site: str | None = None
    schedule: str | None = None

    @property
    def label(self) -> str:
        return setup_label(self.system, self.op, self.layer, self.alpha, self.lam, self.site, self.schedule)


# ---------------------------------------------------------------------------------------------------
# Data


def _eval_sets(n: int, seed: int) -> dict[str, list[Any]]:
    return {c: make_eval_set(c, n, seed) for c in CATEGORIES}


def _calibration(tokenizer: Any, n: int, seed: int) -> tuple[list[str], list[str]]:
    """Training-like chats (prompt and reference response) for each model: the base's mix of the four
    categories (reasoning answered directly, as the base was taught) and the reasoner's scratchpad
    reasoning."""

    def render(prompt: str, target: str) -> str:
        chat = [*chat_messages(prompt), {"role": "assistant", "content": target}]
        return tokenizer.apply_chat_template(chat, tokenize=False)

    per = max(1, n // len(CATEGORIES))
    base_texts = [
        render(e.prompt, direct_target(e.answer) if c == GAINED else e.target)
        for c in CATEGORIES
        for e in make_train_set(c, per, seed)
    ]
    ft_texts = [render(e.prompt, e.target) for e in make_train_set(GAINED, n, seed + 1)]
    return base_texts, ft_texts


def _evaluate(
    model: Any,
    sources: Any,
    recipe: Any,
    eval_sets: dict[str, list[Any]],
    engine: str,
    probe: NormProbe,
    encoded: dict[tuple, Any],
) -> dict:
    """Greedy accuracy per category, each category with its own token budget (`tasks.MAX_NEW_TOKENS`),
    with the probe's measurements per category. The fast engine is kept on the model between calls; the
    chats are encoded once per category and tokenizer (`_encoded`, into `encoded`), not once per setup."""
    scores = {}
    with probe.recording(recipe, model_info(model).n_layers):
        for category, examples in eval_sets.items():
            probe.reset()
            batch = _encoded(model.tokenizer, category, examples, encoded)
            out = generate(
                model,
                sources,
                None,
                recipe,
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                max_new_tokens=MAX_NEW_TOKENS[category],
                engine=engine,
                keep_engine=True,
            )
            hits = [score(category, text, e.answer) for text, e in zip(out.texts, examples, strict=True)]
            scores[category] = (sum(hits) / len(hits), len(hits), out.texts, probe.summary())
    return scores


def _encoded(tokenizer: Any, category: str, examples: list[Any], seen: dict[tuple, Any]) -> Any:
    """The category's chats as `lmn.generate` encodes them (chat template, padded), encoded once per
    tokenizer in `seen` (which holds the tokenizer too, so its id stays its own)."""
    key = (id(tokenizer), category)
    if key not in seen:
        seen[key] = (tokenizer, encode(tokenizer, [chat_messages(e.prompt) for e in examples]))
    return seen[key][1]


# ---------------------------------------------------------------------------------------------------
# The systems


def _latent(op: str, site: str, layer: int, alpha: float, sources: Any, base: Any, **kw: Any) -> _System:
    lam = kw.get("lam")
    if lam is not None:
        recipe = Recipe(op=op, site=site, layers=[layer], **{"lambda": lam})
    else:
        recipe = Recipe(op=op, site=site, layers={layer: alpha})
    return _System("latent", op, layer, alpha, lam, lambda: (base, sources, recipe), site=site)


def _weight_systems(
    base: Any, ft: Any, paths: tuple[str, str], grid: DemoGrid, calibration: tuple[list, list]
) -> Iterator[_System]:
    """The weight merges of the grid (RegMean's Gram matrices collected once, when its first setup runs)."""
    grams: list[Any] = []

    def weight(op: str, alpha: float) -> tuple[Any, Any, Any]:
        if op == "regmean":
            if not grams:
                grams.extend([collect_grams(base, calibration[0]), collect_grams(ft, calibration[1])])
            merged = merge_weights(base, ft, "regmean", alpha, grams=grams, off_diagonal=grid.off_diagonal)
        else:
            merged = merge_weights(paths[0], paths[1], op, alpha)
        return merged.model, None, None

    for op in WEIGHT_OPS:
        for a in grid.weight_alphas:
            yield _System("weight", op, None, a, None, lambda op=op, a=a: weight(op, a))


def _systems(
    base: Any,
    ft: Any,
    paths: tuple[str, str],
    grid: DemoGrid,
    n_layers: int,
    calibration: tuple[list, list],
) -> Iterator[_System]:
    """Every setup of the coarse grid, in order: references, ensembles, weight merges, latent merges layer
    by layer and site by site, then the multi-layer schedules. Weight merges, Gram matrices and deltas
    are built only when their setup runs."""
    yield _System("base", None, None, 0.0, None, lambda: (base, None, None))
    yield _System("reasoner", None, None, 1.0, None, lambda: (ft, None, None))
    for b in grid.ensemble_bs:
        yield _System("ensemble", None, None, b, None, lambda b=b: (base, ft, Ensemble(b=b)))
    yield from _weight_systems(base, ft, paths, grid, calibration)

    deltas: dict[str, Any] = {}

    def steer(site: str) -> Any:
        if site not in deltas:
            texts = calibration[0] + calibration[1]
            deltas[site] = compute_deltas(base, ft, texts, list(range(n_layers)), site=site)
        return deltas[site]

    def steering(site: str, recipe: Any) -> Callable[[], tuple[Any, Any, Any]]:
        return lambda: (base, steer(site), recipe)

    post_mid = set(grid.post_layers or ()) - {n_layers - 1}
    if grid.limits and 0 not in (grid.layers or ()):
        yield _latent("lerp", "pre", 0, 1.0, ft, base)
    cells = [("pre", layer) for layer in grid.layers or ()]
    cells += [("post", layer) for layer in grid.post_layers or ()]
    for site, layer in cells:
        for op in ("lerp", "slerp"):
            if site == "post" and layer in post_mid and op != "lerp":
                continue  # one op suffices for the post L = pre L+1 check
            for a in grid.alphas:
                if op == "lerp" or a < 1:  # at alpha = 1 every live op is the source state: LERP's row
                    yield _latent(op, site, layer, a, ft, base)
        if site == "post" and layer in post_mid:
            continue
        for lam in grid.regmean_lambdas:
            if lam <= 0:
                continue  # beta = 1: LERP's alpha = 1 row
            yield _latent("regmean", site, layer, regmean_beta(lam), [ft], base, lam=lam)
        for s in grid.delta_strengths:
            recipe = Recipe(op="delta", site=site, layers={layer: s})
            yield _System("latent", "delta", layer, s, None, steering(site, recipe), site=site)

    for sched in grid.schedules:
        try:
            recipe = sched.recipe()
            recipe.layer_alphas(n_layers)
        except (LatentMergeError, ValueError):
            continue  # a schedule past this model's depth
        alpha = sched.alpha if isinstance(sched.alpha, float) else None
        if sched.op == "delta":
            make = steering(sched.site, recipe)
        else:
            make = lambda r=recipe: (base, ft, r)  # noqa: E731
        yield _System("latent", sched.op, None, alpha, None, make, site=sched.site, schedule=sched.text)


def refine_alphas(curve: Sequence[tuple[float, float]], n: int, jump: float) -> list[float]:
    """Alphas to add to one curve of (alpha, reasoning accuracy) points: `n` evenly spaced between each
    pair of neighbours (by alpha) whose accuracies differ by at least `jump`.

    Example: `refine_alphas([(0, .04), (.75, .02), (1, .94)], 4, .25)` is `[0.8, 0.85, 0.9, 0.95]`."""
    if n < 1:
        return []
    pts = sorted(curve)
    new: list[float] = []
    known = {round(a, 9) for a, _ in pts}
    for (a0, r0), (a1, r1) in zip(pts, pts[1:], strict=False):
        if abs(r1 - r0) >= jump - 1e-12:
            for a in np.linspace(a0, a1, n + 2)[1:-1]:
                a = round(float(a), 6)
                if round(a, 9) not in known:
                    known.add(round(a, 9))
                    new.append(a)
    return new


def _refined(
    rows: list[dict[str, Any]], base: Any, ft: Any, grid: DemoGrid, base_reasoning: float, last: int
) -> list[_System]:
    """The finer alpha grid: single-layer LERP/SLERP curves (from alpha 0 = the base) where reasoning
    jumps by at least `grid.refine_jump` between neighbouring alphas."""
    curves: dict[tuple, list[tuple[float, float]]] = {}
    for r in rows:
        mid_post = r["site"] == "post" and r["layer"] != last  # equals pre L+1: refined there
        if r["system"] == "latent" and r["op"] in ("lerp", "slerp") and r["schedule"] is None:
            if r["category"] == GAINED and not mid_post:
                curves.setdefault((r["op"], r["site"], r["layer"]), [(0.0, base_reasoning)])
                curves[(r["op"], r["site"], r["layer"])].append((float(r["alpha"]), float(r["accuracy"])))
    for (op, site, layer), curve in curves.items():
        if op == "slerp" and not any(a >= 1 for a, _ in curve):
            # slerp at alpha = 1 is the source state, LERP's alpha = 1 row: the curve ends there too
            curve += [p for p in curves.get(("lerp", site, layer), []) if p[0] >= 1]
    out = []
    for (op, site, layer), curve in curves.items():
        for a in refine_alphas(curve, grid.refine, grid.refine_jump):
            out.append(_latent(op, site, layer, a, ft, base))
    return out


# ---------------------------------------------------------------------------------------------------
# The job


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _versions() -> str:
    import importlib.metadata as md

    names = ("torch", "transformers", "nnsight", "mergekit")
    found = []
    for name in names:
        with contextlib.suppress(md.PackageNotFoundError):
            found.append(f"{name} {md.version(name)}")
    return ", ".join([f"python {platform.python_version()}", *found])


def run_demo(
    out: str | Path = "runs/demo",
    quick: bool = False,
    progress: bool = True,
    *,
    base: str = "toy-base",
    source: str = "toy-reasoner",
    grid: DemoGrid | None = None,
    threads: int | None = 1,
    engine: str = "auto",
) -> DemoResult:
    """Evaluate base, fine-tune, logit ensemble, weight merges and latent merges on the toy tasks.

    Arguments:
        out: output folder; gets `results.csv`, `samples.json`, `report.md`, `meta.json` and the PNG
            figures.
        quick: a small grid (`QUICK_GRID`, about 20 s) instead of `DEFAULT_GRID` (about 2 minutes on 2 cores:
            about 100 s of CPU time on one thread).
        progress: show a tqdm progress bar.
        base, source: zoo names or checkpoint folders of the pair.
        grid: evaluate this grid instead (overrides `quick`).
        threads: torch CPU threads for the run (restored afterwards); None leaves the setting alone. One
            by default: the toy models are too small to gain from more, and on a shared machine extra
            threads slow them down many times over.
        engine: `lmn.generate` engine for every system.

    Returns a `DemoResult`: `results` (columns `COLUMNS`; `system` is base / reasoner / ensemble / weight
    / latent; `schedule` names a multi-layer latent merge) and `paths` (name -> file).
    """
    preset = grid is None
    if grid is None:
        grid = QUICK_GRID if quick else DEFAULT_GRID
    if not isinstance(grid, DemoGrid):
        raise LatentMergeError(f"grid has type {type(grid).__name__}; expected a DemoGrid")
    if grid.n_per_category < 1:
        raise LatentMergeError(f"grid.n_per_category={grid.n_per_category}; expected >= 1")
    for name in (base, source):
        _check_checkpoint(name)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start, cpu_start = time.perf_counter(), time.process_time()
    ran = _run_grid(base, source, grid, threads, engine, progress)
    grid, n_layers, last, texts = ran.grid, ran.n_layers, ran.n_layers - 1, ran.texts
    df = pd.DataFrame(ran.rows, columns=COLUMNS).astype({"layer": "Int64"})
    elapsed = time.perf_counter() - start
    paths: dict[str, Path] = {"results": out / "results.csv"}
    df.to_csv(paths["results"], index=False)
    wide = mean_table(df)
    samples = _samples(wide, texts, ran.eval_sets)
    paths["samples"] = out / "samples.json"
    paths["samples"].write_text(json.dumps(samples, indent=2))
    paths.update(write_figures(df, wide, n_layers, out))
    meta = {
        "base": base,
        "source": source,
        "n_layers": n_layers,
        "n_per_category": grid.n_per_category,
        "n_systems": len(wide),
        "n_refined": ran.n_refined,
        "seconds": elapsed,
        "cpu_seconds": time.process_time() - cpu_start,
        "threads": torch.get_num_threads() if threads is None else threads,
        "engine": engine,
        "quick": bool(quick and preset),
        "off_diagonal": grid.off_diagonal,
        "grid": asdict(grid),
        "versions": _versions(),
        **_identity_checks(texts, wide, last),
    }
    paths["meta"] = out / "meta.json"
    paths["meta"].write_text(json.dumps(meta, indent=2, default=str))
    paths["report"] = write_report(df, out / "report.md", meta, _FIGURES, samples)
    return DemoResult(results=df, paths=paths, seconds=elapsed)


_FIGURES = {
    "Pareto fronts: skill kept vs reasoning, every family": "pareto.png",
    "Trade-off per op: skill kept vs reasoning": "tradeoff.png",
    "Best latent vs best weight merge per category": "bars.png",
    "Layer x alpha heatmaps (site pre), mean accuracy": "heatmap_mean.png",
    "Layer x alpha heatmaps (site pre), reasoning accuracy": "heatmap_reasoning.png",
}
"""The report's figures: caption -> file in the output folder (the first is shown inline)."""


def _identity_checks(texts: dict[str, dict[str, list[str]]], wide: pd.DataFrame, last: int) -> dict[str, Any]:
    """The run's identity checks for the report: latent RegMean vs LERP, post L vs pre L+1, and post at
    the last layer with alpha = 1 vs the reasoner."""
    return {
        "regmean_equals_lerp": _twin_check(texts, wide, "regmean"),
        "post_equals_next_pre": _twin_check(texts, wide, "post"),
        "post_alpha1_vs_reasoner": _agreement(
            texts,
            setup_label("latent", "lerp", last, 1.0, None, "post"),
            setup_label("reasoner", None, None, 1.0),
        ),
    }


@dataclass
class _GridRun:
    """What evaluating a grid produced: one row per (setup, category), the texts by setup label."""

    rows: list[dict[str, Any]]
    texts: dict[str, dict[str, list[str]]]
    eval_sets: dict[str, list[Any]]
    grid: DemoGrid  # with its layers filled in for the model
    n_layers: int
    n_refined: int


def _run_grid(
    base: str, source: str, grid: DemoGrid, threads: int | None, engine: str, progress: bool
) -> _GridRun:
    """Load the pair and evaluate every setup of the coarse grid, then those of the finer alpha grid."""
    from tqdm.auto import tqdm

    rows: list[dict[str, Any]] = []
    texts: dict[str, dict[str, list[str]]] = {}
    probe = NormProbe()
    encoded: dict[tuple, Any] = {}
    with _threads(threads), quiet_hf_progress(), contextlib.ExitStack() as shared:
        base_model = load(base)
        ft_model = load(source)
        # every setup prefills the same prompts: the pair's unmerged blocks are computed once
        shared.enter_context(share_prompt_states(base_model, ft_model))
        n_layers = model_info(base_model).n_layers
        last = n_layers - 1
        layers = grid.layers if grid.layers is not None else _default_layers(n_layers, grid is QUICK_GRID)
        post = grid.post_layers if grid.post_layers is not None else sorted({max(0, last - 1), last})
        grid = replace(grid, layers=tuple(layers), post_layers=tuple(post))
        eval_sets = _eval_sets(grid.n_per_category, grid.seed)
        calibration = _calibration(base_model.tokenizer, grid.n_calibration, grid.seed)
        systems = list(_systems(base_model, ft_model, (base, source), grid, n_layers, calibration))

        def run(specs: list[_System], desc: str) -> None:
            # one bar per phase, each with its total from the start (the finer alphas are known only
            # after the grid has run)
            bar = tqdm(total=len(specs), desc=desc, unit="setup", disable=not progress, dynamic_ncols=True)
            for spec in specs:
                bar.set_postfix_str(spec.label, refresh=False)
                t0 = time.perf_counter()
                model, sources, recipe = spec.make()
                scores = _evaluate(model, sources, recipe, eval_sets, engine, probe, encoded)
                if model is not base_model and model is not ft_model:
                    release_engine(model)
                seconds = time.perf_counter() - t0
                for category, (acc, n, outs, seen) in scores.items():
                    weight = seen["source_weight"].get(last, float("nan")) if spec.site == "post" else None
                    rows.append(
                        {"system": spec.system, "op": spec.op, "site": spec.site, "layer": spec.layer,
                         "alpha": spec.alpha, "lam": spec.lam, "schedule": spec.schedule,
                         "category": category, "accuracy": acc, "n": n, "norm_ratio": seen["norm_ratio"],
                         "source_weight": weight, "seconds": seconds / len(scores)}
                    )  # fmt: skip
                    texts.setdefault(spec.label, {})[category] = outs
                bar.update()
            bar.close()

        run(systems, "lmn demo: grid")
        base_reasoning = next(
            r["accuracy"] for r in rows if r["system"] == "base" and r["category"] == GAINED
        )
        finer = _refined(rows, base_model, ft_model, grid, base_reasoning, last)
        run(finer, "lmn demo: finer alphas")
        release_engine(base_model)
        release_engine(ft_model)
    return _GridRun(rows, texts, eval_sets, grid, n_layers, len(finer))


def _samples(
    wide: pd.DataFrame, texts: dict[str, dict[str, list[str]]], eval_sets: dict[str, list[Any]]
) -> dict[str, Any]:
    """The first held-out prompt of each category, answered by the base, the reasoner, and the best
    (by balanced score) latent merge, weight merge and logit ensemble."""
    picks: dict[str, str] = {}
    for system in SAMPLE_SYSTEMS:
        row = best_row(wide, wide["system"] == system)
        if row is not None:
            picks[system] = row["label"]
    return {
        "systems": picks,
        "prompts": {c: ex[0].prompt for c, ex in eval_sets.items() if ex},
        "answers": {c: ex[0].answer for c, ex in eval_sets.items() if ex},
        "texts": {s: {c: texts[label][c][0] for c in texts[label]} for s, label in picks.items()},
    }


def _check_checkpoint(name: str) -> None:
    """A missing zoo checkpoint is a clear error (with the command that makes it), not a hub lookup."""
    if name in ZOO and not (zoo_path(name) / "config.json").is_file() and not Path(name).exists():
        raise LatentMergeError(
            f"the zoo checkpoint {name!r} is missing from {zoo_path(name)}; "
            "train it with `lmn zoo train` (or reinstall the package)"
        )


def _default_layers(n_layers: int, quick: bool) -> list[int]:
    if n_layers < 2:
        return [0]
    if quick:
        return sorted({n_layers // 2, n_layers - 1})
    return list(range(1, n_layers))


def _twin_check(texts: dict[str, dict[str, list[str]]], wide: pd.DataFrame, kind: str) -> list[int] | None:
    """[equal, compared] (setup, category) pairs of generated texts for one identity of the grid:

    - "regmean": latent RegMean (lambda) against latent LERP at the same site, layer and alpha = beta;
    - "post": LERP at site `post` of layer L against LERP at site `pre` of layer L+1, same alpha."""
    latent = wide[(wide["system"] == "latent") & wide["schedule"].isna()]
    by_key = {
        (r.op, r.site, int(r.layer), round(float(r.alpha), 6), pd.notna(r.lam)): r.label
        for r in latent.itertuples()
        if pd.notna(r.layer)
    }
    equal = compared = 0
    for (op, site, layer, alpha, is_lambda), label in by_key.items():
        if kind == "regmean" and op == "regmean" and is_lambda:
            twin = by_key.get(("lerp", site, layer, alpha, False))
        elif kind == "post" and op == "lerp" and site == "post":
            twin = by_key.get(("lerp", "pre", layer + 1, alpha, False))
        else:
            continue
        if twin is None:
            continue
        for category, outs in texts[label].items():
            compared += 1
            equal += int(texts[twin].get(category) == outs)
    return [equal, compared] if compared else None


def _agreement(texts: dict[str, dict[str, list[str]]], a: str, b: str) -> list[int] | None:
    """[equal, compared] prompts whose generations by setups `a` and `b` are the same text."""
    if a not in texts or b not in texts:
        return None
    pairs = [(x, y) for c in texts[a] for x, y in zip(texts[a][c], texts[b].get(c, []), strict=False)]
    return [sum(x == y for x, y in pairs), len(pairs)]


def export_docs(run: str | Path, docs: str | Path = "docs/demo", figure: str = "pareto.png") -> list[Path]:
    """Copy a finished run's report and one figure into `docs` (for the README), re-rendering the report
    so that it links only that figure."""
    run, docs = Path(run), Path(docs)
    docs.mkdir(parents=True, exist_ok=True)
    df = pd.read_csv(run / "results.csv")
    meta = json.loads((run / "meta.json").read_text())
    samples = json.loads((run / "samples.json").read_text()) if (run / "samples.json").is_file() else None
    shutil.copyfile(run / figure, docs / figure)
    caption = "Pareto fronts: skill kept vs reasoning, every family"
    report = write_report(df, docs / "report.md", meta, {caption: figure}, samples)
    return [report, docs / figure]
