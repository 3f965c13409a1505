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
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch

from latent_merge_nnsight.demo.checks import identity_checks
from latent_merge_nnsight.demo.figures import write_figures
from latent_merge_nnsight.demo.grid import DEFAULT_GRID, QUICK_GRID, DemoGrid, Schedule
from latent_merge_nnsight.demo.passes import DEFAULT_MAX_BATCH, run_grid
from latent_merge_nnsight.demo.report import best_row, mean_table, write_report
from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.evaluation.tasks import Example
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


@dataclass
class DemoResult:
    """What `run_demo` returns: the tidy results table, the files written (name -> path), the wall time,
    every setup's generated texts (label -> category -> one text per prompt), the recipe of each setup
    that ran as a per-row recipe (label -> recipe), and per progress bar its (total, setups counted)."""

    results: pd.DataFrame
    paths: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0
    texts: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    recipes: dict[str, Recipe] = field(default_factory=dict)
    bars: list[tuple[int, int]] = field(default_factory=list)


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
    max_batch: int = DEFAULT_MAX_BATCH,
) -> DemoResult:
    """Evaluate base, fine-tune, logit ensemble, weight merges and latent merges on the toy tasks.

    Arguments:
        out: output folder; gets `results.csv`, `samples.json`, `report.md`, `meta.json` and the PNG
            figures.
        quick: a small grid (`QUICK_GRID`, about 20 s) instead of `DEFAULT_GRID` (about 2 minutes on 2 cores:
            about 100 s of CPU time on one thread).
        progress: show a tqdm progress bar.
        base, source: zoo names or checkpoint folders of the pair.
        grid: evaluate this grid instead (overrides `quick`, except that with `quick` a grid without
            `layers` gets the quick grid's).
        threads: torch CPU threads for the run (restored afterwards); None leaves the setting alone. One
            by default: the toy models are too small to gain from more, and on a shared machine extra
            threads slow them down many times over.
        engine: `lmn.generate` engine for every system.
        max_batch: rows (setups x a category's prompts) per engine pass for the latent merges of the pair,
            which run together as per-row recipes; 1 runs one setup at a time (same results, except where
            a float32 near-tie flips a token).

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
    with _threads(threads):
        ran = run_grid(base, source, grid, engine, progress, max_batch, quick)
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
        "max_batch": max_batch,
        "passes": ran.n_passes,
        **identity_checks(texts, wide, last),
    }
    paths["meta"] = out / "meta.json"
    paths["meta"].write_text(json.dumps(meta, indent=2, default=str))
    paths["report"] = write_report(df, out / "report.md", meta, _FIGURES, samples)
    return DemoResult(df, paths, elapsed, texts, ran.recipes, ran.bars)


_FIGURES = {
    "Pareto fronts: skill kept vs reasoning, every family": "pareto.png",
    "Trade-off per op: skill kept vs reasoning": "tradeoff.png",
    "Best latent vs best weight merge per category": "bars.png",
    "Layer x alpha heatmaps (site pre), mean accuracy": "heatmap_mean.png",
    "Layer x alpha heatmaps (site pre), reasoning accuracy": "heatmap_reasoning.png",
}
"""The report's figures: caption -> file in the output folder (the first is shown inline)."""


def _samples(
    wide: pd.DataFrame, texts: dict[str, dict[str, list[str]]], eval_sets: dict[str, list[Example]]
) -> dict[str, object]:
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


def _check_checkpoint(name: str) -> None:
    """A missing zoo checkpoint is a clear error (with the command that makes it), not a hub lookup."""
    if name in ZOO and not (zoo_path(name) / "config.json").is_file() and not Path(name).exists():
        raise LatentMergeError(
            f"the zoo checkpoint {name!r} is missing from {zoo_path(name)}; "
            "train it with `lmn zoo train` (or reinstall the package)"
        )


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
