"""`lmn demo`: the paper's Experiment A in miniature, offline, on the shipped toy pair.

`run_demo()` evaluates, on held-out toy tasks (`evaluation.tasks`, greedy exact match per category):

- the base (`toy-base`) and the fine-tune (`toy-reasoner`) alone;
- the logit ensemble `(1-b)*logits_base + b*logits_ft` for a few `b`;
- weight merges: LERP and SLERP through mergekit, and RegMean (Jin et al. 2023) in weight space, for a few
  alphas (each model's Gram matrices from its own training-like text);
- latent merges over a layer x alpha grid: LERP, SLERP, the paper's latent RegMean and delta steering,
  all generated in lockstep with `lmn.generate`;

and writes `results.csv`, `report.md` and PNG figures to `out`.

**Latent RegMean with one fine-tune.** The toy pair has one FT, so latent RegMean runs with
`sources=[reasoner]` in the paper's lambda parametrisation, `beta = 1/(1+lambda)`. With one source the
paper's formula `(1-beta)*h_base + beta*h_ft` is LERP at `alpha = beta`: the demo runs it anyway (the table
has the paper's layout) and the report checks that its outputs equal LERP's where the grids meet. (Adding
the base as a second source would change nothing either: at a site "pre" merge the base's own state
entering the merge layer is never modified by that merge, so it would be LERP at `alpha = beta/2`.)
Weight-space RegMean is a different, data-dependent method and has no such identity.

**Delta steering** adds `alpha * mean(h_ft - h_base)` at one layer to every token (the means over the
calibration texts of both models); alpha is its strength.

**Comparing alphas across spaces.** A nominal alpha does not mean the same in weight and latent space, so
the report also draws the trade-off (skill kept: mean accuracy over knowledge, math and coding; against
reasoning accuracy) for every family, which compares them fairly. A latent merge at the last layer behaves
much like the logit ensemble (only the last block and head run on the mixed state), so it is reported
apart from mid-layer merges.
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

import pandas as pd
import torch

from latent_merge_nnsight.demo_report import (
    GAINED,
    WEIGHT_OPS,
    mean_table,
    setup_label,
    write_figures,
    write_report,
)
from latent_merge_nnsight.errors import LatentMergeError

__all__ = ["DEFAULT_GRID", "QUICK_GRID", "DemoGrid", "DemoResult", "run_demo", "write_report"]

COLUMNS = ["system", "op", "layer", "alpha", "lam", "category", "accuracy", "n", "seconds"]


@dataclass(frozen=True)
class DemoGrid:
    """What the demo evaluates.

    Attributes:
        n_per_category: held-out examples per category.
        layers: latent merge layers; None = every layer from 1 to the last (quick: the middle and last).
        alphas: latent LERP/SLERP alphas.
        regmean_lambdas: latent RegMean lambdas (beta = 1/(1+lambda)).
        delta_strengths: delta-steering strengths.
        weight_alphas: weight-merge alphas (LERP, SLERP, RegMean).
        ensemble_bs: logit-ensemble weights of the fine-tune.
        n_calibration: training-like texts per model for weight RegMean and the steering deltas.
        off_diagonal: weight RegMean's factor on off-diagonal Gram entries (the paper's alpha).
        seed: seed of the evaluation and calibration sets.
    """

    n_per_category: int = 48
    layers: tuple[int, ...] | None = None
    alphas: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    regmean_lambdas: tuple[float, ...] = (3.0, 1.0, 1.0 / 3.0, 0.0)
    delta_strengths: tuple[float, ...] = (0.5, 1.0)
    weight_alphas: tuple[float, ...] = (0.25, 0.5, 0.75)
    ensemble_bs: tuple[float, ...] = (0.25, 0.5, 0.75)
    n_calibration: int = 64
    off_diagonal: float = 0.9
    seed: int = 0


DEFAULT_GRID = DemoGrid()
QUICK_GRID = DemoGrid(
    n_per_category=8,
    alphas=(0.5, 1.0),
    regmean_lambdas=(1.0,),
    delta_strengths=(1.0,),
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

    @property
    def label(self) -> str:
        return setup_label(self.system, self.op, self.layer, self.alpha, self.lam)


# ---------------------------------------------------------------------------------------------------
# Data


def _eval_sets(n: int, seed: int) -> dict[str, list[Any]]:
    from latent_merge_nnsight.evaluation.tasks import CATEGORIES, make_eval_set

    return {c: make_eval_set(c, n, seed) for c in CATEGORIES}


def _calibration(tokenizer: Any, n: int, seed: int) -> tuple[list[str], list[str]]:
    """Training-like chats (prompt and reference response) for each model: the base's mix of the four
    categories (reasoning answered directly, as the base was taught) and the reasoner's scratchpad
    reasoning."""
    from latent_merge_nnsight.evaluation.tasks import CATEGORIES, chat_messages, direct_target, make_train_set

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


def _evaluate(model: Any, sources: Any, recipe: Any, eval_sets: dict[str, list[Any]], engine: str) -> dict:
    """Greedy accuracy per category, each category with its own token budget (`tasks.MAX_NEW_TOKENS`)."""
    from latent_merge_nnsight.evaluation.tasks import MAX_NEW_TOKENS, chat_messages, score
    from latent_merge_nnsight.generate import generate

    scores = {}
    for category, examples in eval_sets.items():
        out = generate(
            model,
            sources,
            [chat_messages(e.prompt) for e in examples],
            recipe,
            max_new_tokens=MAX_NEW_TOKENS[category],
            engine=engine,
        )
        hits = [score(category, text, e.answer) for text, e in zip(out.texts, examples, strict=True)]
        scores[category] = (sum(hits) / len(hits), len(hits), out.texts)
    return scores


# ---------------------------------------------------------------------------------------------------
# The systems


def _systems(
    base: Any,
    ft: Any,
    paths: tuple[str, str],
    grid: DemoGrid,
    layers: Sequence[int],
    calibration: tuple[list, list],
) -> Iterator[_System]:
    """Every setup of the grid, in order: references, ensembles, weight merges, then latent merges layer by
    layer. Weight merges, Gram matrices and deltas are built only when their setup runs."""
    from latent_merge_nnsight.baselines.ensemble import Ensemble
    from latent_merge_nnsight.baselines.weights import collect_grams, merge_weights
    from latent_merge_nnsight.deltas import compute_deltas
    from latent_merge_nnsight.recipe import Recipe

    yield _System("base", None, None, 0.0, None, lambda: (base, None, None))
    yield _System("reasoner", None, None, 1.0, None, lambda: (ft, None, None))
    for b in grid.ensemble_bs:
        yield _System("ensemble", None, None, b, None, lambda b=b: (base, ft, Ensemble(b=b)))

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

    deltas: list[Any] = []

    def steer(layer: int, strength: float) -> tuple[Any, Any, Any]:
        if not deltas:
            deltas.append(compute_deltas(base, ft, calibration[0] + calibration[1], list(layers)))
        return base, deltas[0], Recipe(op="delta", layers={layer: strength})

    for layer in layers:
        for op in ("lerp", "slerp"):
            for a in grid.alphas:
                recipe = Recipe(op=op, layers={layer: a})
                yield _System("latent", op, layer, a, None, lambda r=recipe: (base, ft, r))
        for lam in grid.regmean_lambdas:
            recipe = Recipe(op="regmean", layers=[layer], **{"lambda": lam})
            yield _System(
                "latent", "regmean", layer, 1.0 / (1.0 + lam), lam, lambda r=recipe: (base, [ft], r)
            )
        for s in grid.delta_strengths:
            yield _System("latent", "delta", layer, s, None, lambda layer=layer, s=s: steer(layer, s))


# ---------------------------------------------------------------------------------------------------
# The job


@contextlib.contextmanager
def _quiet_hf() -> Iterator[None]:
    """Hide transformers' per-load progress bars while the demo's own bar runs."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


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
        out: output folder; gets `results.csv`, `report.md`, `meta.json` and the PNG figures.
        quick: a small grid (`QUICK_GRID`, about 30 s) instead of `DEFAULT_GRID` (about 3 minutes on 2 cores).
        progress: show a tqdm progress bar.
        base, source: zoo names or checkpoint folders of the pair.
        grid: evaluate this grid instead (overrides `quick`).
        threads: torch CPU threads for the run (restored afterwards); None leaves the setting alone. One
            by default: the toy models are too small to gain from more, and on a shared machine extra
            threads slow them down many times over.
        engine: `lmn.generate` engine for every system.

    Returns a `DemoResult`: `results` (columns system, op, layer, alpha, lam, category, accuracy, n,
    seconds; `system` is base / reasoner / ensemble / weight / latent) and `paths` (name -> file).
    """
    from tqdm.auto import tqdm

    from latent_merge_nnsight.models import load, model_info

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
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    texts: dict[tuple, list[str]] = {}
    with _threads(threads), _quiet_hf():
        base_model = load(base)
        ft_model = load(source)
        n_layers = model_info(base_model).n_layers
        layers = grid.layers if grid.layers is not None else _default_layers(n_layers, grid is QUICK_GRID)
        grid = replace(grid, layers=tuple(layers))
        eval_sets = _eval_sets(grid.n_per_category, grid.seed)
        calibration = _calibration(base_model.tokenizer, grid.n_calibration, grid.seed)
        systems = list(_systems(base_model, ft_model, (base, source), grid, layers, calibration))
        bar = tqdm(systems, desc="lmn demo", unit="setup", disable=not progress, dynamic_ncols=True)
        for spec in bar:
            bar.set_postfix_str(spec.label, refresh=False)
            t0 = time.perf_counter()
            model, sources, recipe = spec.make()
            scores = _evaluate(model, sources, recipe, eval_sets, engine)
            seconds = time.perf_counter() - t0
            for category, (acc, n, outs) in scores.items():
                rows.append(
                    {"system": spec.system, "op": spec.op, "layer": spec.layer, "alpha": spec.alpha,
                     "lam": spec.lam, "category": category, "accuracy": acc, "n": n,
                     "seconds": seconds / len(scores)}
                )  # fmt: skip
                if spec.system == "latent":
                    texts[
                        (spec.op, spec.layer, round(float(spec.alpha), 6), spec.lam is not None, category)
                    ] = outs
    df = pd.DataFrame(rows, columns=COLUMNS).astype({"layer": "Int64"})
    elapsed = time.perf_counter() - start
    paths: dict[str, Path] = {"results": out / "results.csv"}
    df.to_csv(paths["results"], index=False)
    wide = mean_table(df)
    paths.update(write_figures(df, wide, n_layers, out))
    meta = {
        "base": base,
        "source": source,
        "n_layers": n_layers,
        "n_per_category": grid.n_per_category,
        "n_systems": len(wide),
        "seconds": elapsed,
        "threads": torch.get_num_threads() if threads is None else threads,
        "engine": engine,
        "quick": bool(quick and preset),
        "off_diagonal": grid.off_diagonal,
        "grid": asdict(grid),
        "versions": _versions(),
        "regmean_equals_lerp": _regmean_check(texts),
    }
    paths["meta"] = out / "meta.json"
    paths["meta"].write_text(json.dumps(meta, indent=2))
    figures = {
        "Trade-off: skill kept vs reasoning gained": "tradeoff.png",
        "Best latent vs best weight merge per category": "bars.png",
        "Layer x alpha heatmaps, mean accuracy": "heatmap_mean.png",
        "Layer x alpha heatmaps, reasoning accuracy": "heatmap_reasoning.png",
    }
    paths["report"] = write_report(df, out / "report.md", meta, figures)
    return DemoResult(results=df, paths=paths, seconds=elapsed)


def _check_checkpoint(name: str) -> None:
    """A missing zoo checkpoint is a clear error (with the command that makes it), not a hub lookup."""
    from latent_merge_nnsight.zoo import ZOO, zoo_path

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


def _regmean_check(texts: dict[tuple, list[str]]) -> tuple[int, int] | None:
    """(equal, compared): latent RegMean outputs against latent LERP's at the same layer and alpha = beta.

    `texts` maps (op, layer, alpha, is_lambda, category) to the generated texts of latent setups."""
    equal = compared = 0
    for (op, layer, alpha, is_lambda, category), outs in texts.items():
        twin = texts.get(("lerp", layer, alpha, False, category))
        if op != "regmean" or not is_lambda or twin is None:
            continue
        compared += 1
        equal += int(twin == outs)
    return (equal, compared) if compared else None


def export_docs(run: str | Path, docs: str | Path = "docs/demo", figure: str = "tradeoff.png") -> list[Path]:
    """Copy a finished run's report and one figure into `docs` (for the README), re-rendering the report
    so that it links only that figure."""
    run, docs = Path(run), Path(docs)
    docs.mkdir(parents=True, exist_ok=True)
    df = pd.read_csv(run / "results.csv")
    meta = json.loads((run / "meta.json").read_text())
    if meta.get("regmean_equals_lerp") is not None:
        meta["regmean_equals_lerp"] = tuple(meta["regmean_equals_lerp"])
    shutil.copyfile(run / figure, docs / figure)
    report = write_report(df, docs / "report.md", meta, {"Trade-off: skill kept vs reasoning gained": figure})
    return [report, docs / figure]
