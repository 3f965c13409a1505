"""Layer x alpha sweeps of latent merges over any evaluation, resumable, as a tidy DataFrame (Experiment C).

A sweep is a grid of *cells*: every (op, layer, alpha) is one single-layer `Recipe`, evaluated by a
callable `evaluate(model, sources, recipe, prompts) -> {metric: value}` (or `{category: {metric: value}}`).
Baseline cells run the same callable with `recipe=None`: `"base"` evaluates the base alone, `"source"`
the first source alone, and each entry of `models=` (e.g. weight merges) alone.

**Resuming.** With `out=path.jsonl`, each finished cell is appended as one JSON line and flushed before the
next starts. A rerun reads the file and skips the cells already there, so a sweep that was killed (or whose
evaluate raised) continues where it stopped: no finished cell is computed twice, none is lost. A line cut
short by a kill is dropped and its cell recomputed. Each line records a fingerprint of the sweep's inputs
(prompts, evaluate, site, positions, op params, model names); a file written for other inputs is refused
rather than mixed in (pass `resume=False` to start it afresh).

Ready-made evaluators (`Perplexity`, `TaskAccuracy`) live in `analysis.evaluators`, and `LmEvalTasks`
(lm-eval tasks) in `analysis.lm_eval_tasks`; cells are visited layer by layer so that an evaluator can
keep per-layer work between cells.

**Many cells per pass.** An evaluator with a `batch(model, sources, recipes, prompts)` method (returning
one result per recipe, e.g. `TaskAccuracy`) gets the latent cells several at a time: they share the
sources, so they run as per-row recipes in one engine pass, up to `max_batch` rows (cells x prompts).
A pass's cells are written when the pass ends; a kill loses at most that pass.

**Evaluators with their own data.** An evaluator whose `needs_prompts` is False (e.g. `LmEvalTasks`, which
reads the documents of lm-eval tasks) runs with `prompts=None`; then a cell is one row of a pass, so
`max_batch` counts cells (default: the evaluator's `batch_size`). An evaluator's `settings` (a dict, when
it has one) join the fingerprint, so a results file of other settings (other tasks, limits) is refused.
"""

import dataclasses
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd
import torch
from torch import Tensor

from latent_merge_nnsight.analysis.representations import as_model_list
from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.generation.run import release_engine
from latent_merge_nnsight.jsonl import read_resumable
from latent_merge_nnsight.models import check_compatible, model_info
from latent_merge_nnsight.nouns import Model, Prompts
from latent_merge_nnsight.ops import check_alpha, get_op
from latent_merge_nnsight.plan import Sources
from latent_merge_nnsight.positions import Positions, check_positions
from latent_merge_nnsight.recipe import Recipe
from latent_merge_nnsight.sites import check_layer, check_site

if TYPE_CHECKING:
    from tqdm import tqdm

__all__ = ["COLUMNS", "best_cells", "sweep"]

EvalData = Prompts | Sequence[object] | None
"""What an evaluator reads (texts, chats, task examples), passed through unchanged; None for one with its
own data."""
Results = Mapping[str, object]
"""An evaluator's `{metric: number}` or `{category: {metric: number}}`."""
Evaluate = Callable[[Model, list[Model], Recipe | None, EvalData], Results]
Record = dict[str, Any]
"""A cell's JSON record in the results file."""

COLUMNS: tuple[str, ...] = ("system", "op", "layer", "alpha", "category", "metric", "value")
"""Columns of the sweep table: one row per (cell, category, metric). `category` is "all" for metrics
that are not per category; `op`, `layer` and `alpha` are empty for baseline systems."""

_BASELINES = ("base", "source")
_FORMAT = "lmn.sweep.v1"


# ------------------------------------------------------------------------------------------ the grid


@dataclasses.dataclass(frozen=True)
class _Cell:
    system: str
    op: str | None = None
    layer: int | None = None
    alpha: float | None = None

    @property
    def key(self) -> tuple:
        return (self.system, self.op, self.layer, self.alpha)

    def label(self) -> str:
        if self.op is None:
            return self.system
        return f"{self.op} L{self.layer} a={self.alpha:g}"


def _non_empty(name: str, values: object) -> list[Any]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        values = [values]
    values = list(values)
    if not values:
        raise LatentMergeError(f"{name}=[] is empty; expected at least one value")
    return values


def _check_grid(
    base: Model,
    ops: Sequence[str],
    layers: Sequence[int],
    alphas: Sequence[float],
    op_params: Mapping[str, object],
    allow_extrapolation: bool,
) -> tuple[list[str], list[int], list[float]]:
    ops = _non_empty("ops", ops)
    layers = _non_empty("layers", layers)
    alphas = _non_empty("alphas", alphas)
    names = []
    for i, op in enumerate(ops):
        try:
            names.append(get_op(op).name)
        except LatentMergeError as e:
            raise LatentMergeError(f"ops[{i}]: {e}") from None
    info = model_info(base)
    for i, layer in enumerate(layers):
        check_layer(layer, info.n_layers, what=f"layers[{i}]", model_name=info.name)
    floats = []
    for i, a in enumerate(alphas):
        for op in names:
            check_alpha(a, op, allow_extrapolation=allow_extrapolation, what=f"alphas[{i}]")
        floats.append(float(a))
    for what, values in (("ops", names), ("layers", layers), ("alphas", floats)):
        if len(set(values)) != len(values):
            raise LatentMergeError(f"{what}={values} repeats a value; give each once")
    for key in op_params:
        if not any(key in get_op(op).params for op in names):
            raise LatentMergeError(
                f"op_params has {key!r}, which none of ops {names} takes; "
                f"their parameters: {sorted({p for op in names for p in get_op(op).params}) or 'none'}"
            )
    return names, sorted(layers), floats


# --------------------------------------------------------------------------------------- the results


def _jsonable(obj: object) -> Any:
    """A JSON-serialisable stand-in for prompts and parameters (tensors by content hash)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"__dataclass__": type(obj).__name__, **dataclasses.asdict(obj)}
    if isinstance(obj, Tensor):
        data = obj.detach().cpu().contiguous()
        if data.dtype == torch.bfloat16:
            data = data.float()
        digest = hashlib.sha256(data.numpy().tobytes())
        return {"__tensor__": list(obj.shape), "dtype": str(obj.dtype), "sha256": digest.hexdigest()}
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


def _evaluate_name(evaluate: Evaluate) -> str:
    name = getattr(evaluate, "__qualname__", None) or type(evaluate).__qualname__
    return f"{getattr(evaluate, '__module__', '') or type(evaluate).__module__}.{name}"


def fingerprint_of(config: Mapping[str, object]) -> str:
    text = json.dumps(_jsonable(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _flatten(results: object, cell: _Cell) -> list[tuple[str, str, float]]:
    """`{metric: v}` / `{category: {metric: v}}` -> [(category, metric, value)], checked."""
    if not isinstance(results, Mapping) or not results:
        raise LatentMergeError(
            f"evaluate returned {type(results).__name__} {results!r} for cell {cell.label()}; expected a "
            "non-empty dict {metric: number} or {category: {metric: number}}"
        )
    out = []
    for key, value in results.items():
        items = value.items() if isinstance(value, Mapping) else [(None, value)]
        for sub, v in items:
            category, metric = ("all", str(key)) if sub is None else (str(key), str(sub))
            if isinstance(v, Tensor) and v.numel() == 1:
                v = v.item()
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise LatentMergeError(
                    f"evaluate returned {metric}={v!r} (category {category!r}) for cell {cell.label()}; "
                    "expected a number"
                )
            out.append((category, metric, float(v)))
    return out


def _read_done(path: Path, fingerprint: str) -> dict[tuple, Record]:
    """Finished cells in a results file; a torn last line (from a kill mid-write) is cut off."""
    done: dict[tuple, Record] = {}
    if not path.exists():
        return done
    for _, record in read_resumable(path):
        if record.get("format") != _FORMAT:
            raise LatentMergeError(
                f"out={str(path)!r} is not a sweep results file (format={record.get('format')!r}); "
                "use another path"
            )
        if record.get("fingerprint") != fingerprint:
            raise LatentMergeError(
                f"out={str(path)!r} holds results of a different sweep (other prompts, evaluate, site, "
                "positions, op params or models); pass resume=False to overwrite it, or use another path"
            )
        cell = record["cell"]
        done[(cell["system"], cell["op"], cell["layer"], cell["alpha"])] = record
    return done


def _progress(total: int, initial: int, enabled: bool, desc: str) -> "tqdm":
    with warnings.catch_warnings():  # tqdm.auto warns when ipywidgets is missing and falls back to text
        warnings.simplefilter("ignore")
        from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit="cell")


def _cell_recipes(
    ops: list[str],
    layers: list[int],
    alphas: list[float],
    op_params: dict[str, object],
    site: str,
    positions: Positions | None,
    allow_extrapolation: bool,
) -> dict[tuple, Recipe]:
    """One Recipe per latent cell (by cell key, in grid order), validated up front so a bad combination
    fails before any work."""
    recipes: dict[tuple, Recipe] = {}
    for layer in layers:
        for op in ops:
            for a in alphas:
                params = {k: v for k, v in op_params.items() if k in get_op(op).params}
                if "lam" in params:
                    params["lambda"] = params.pop("lam")
                try:
                    recipe = Recipe(
                        op=op,
                        layers={layer: a},
                        site=site,
                        positions=positions,
                        allow_extrapolation=allow_extrapolation,
                        **params,
                    )
                except ValueError as e:
                    raise LatentMergeError(f"cell op={op!r} layer={layer} alpha={a}: {e}") from None
                recipes[_Cell("latent", op, layer, a).key] = recipe
    return recipes


def _cell_run(
    cell: _Cell, base: Model, srcs: list[Model], models: dict[str, Model], recipes: dict[tuple, Recipe]
) -> tuple[Model, list[Model], Recipe | None]:
    """What a cell evaluates: (model, its sources, its recipe or None)."""
    if cell.system == "base":
        return base, srcs, None
    if cell.system == "source":
        return srcs[0], [], None
    if cell.system in models:
        return models[cell.system], [], None
    return base, srcs, recipes[cell.key]


def sweep(
    base: Model,
    sources: Sources,
    *,
    ops: Sequence[str],
    layers: Sequence[int],
    alphas: Sequence[float],
    evaluate: Evaluate,
    prompts: EvalData = None,
    out: str | Path | None = None,
    site: Literal["pre", "post"] = "pre",
    positions: Positions | None = None,
    op_params: Mapping[str, object] | None = None,
    baselines: Sequence[str] = ("base",),
    models: Mapping[str, Model] | None = None,
    allow_extrapolation: bool = False,
    resume: bool = True,
    progress: bool = True,
    max_batch: int | None = None,
) -> pd.DataFrame:
    """Evaluate every (op, layer, alpha) latent merge of `sources` into `base` with `evaluate`.

    Arguments:
        base, sources: nnsight models (`sources`: one model or a list, for RegMean).
        ops, layers, alphas: the grid; each cell is `Recipe(op=op, layers={layer: alpha}, site, positions)`.
        evaluate: `evaluate(model, sources, recipe, prompts)` returning `{metric: number}` or
            `{category: {metric: number}}`; `recipe=None` means "the model alone". `Perplexity()`,
            `TaskAccuracy()` and `LmEvalTasks([...])` are ready-made ones.
        prompts: whatever `evaluate` takes (texts, chats, task examples); it is passed through unchanged.
            None for an evaluator with its own data (`needs_prompts = False`, e.g. `LmEvalTasks`).
        out: a JSONL file to append finished cells to and to resume from (see the module docstring).
        site, positions: the recipe's site and positions (positions None: the op's default).
        op_params: extra recipe fields for the ops, e.g. `{"weights": [0.7, 0.3]}` for regmean.
        baselines: any of "base" (the base alone) and "source" (the first source alone).
        models: more whole models evaluated alone, `{label: model}`, e.g. weight merges.
        resume: False starts `out` afresh instead of skipping its finished cells.
        progress: show a tqdm bar.
        max_batch: rows (cells x prompts; cells with `prompts=None`) per pass for an evaluator with a
            `batch` method (default: its `batch_size`, else 64); 1 cell per call when fewer rows fit or
            the evaluator has no `batch`.

    Returns:
        A tidy DataFrame with `COLUMNS` (system, op, layer, alpha, category, metric, value), baselines
        first, then latent cells in layer-major order.
    """
    if not callable(evaluate):
        raise LatentMergeError(
            f"evaluate={evaluate!r} is not callable; expected evaluate(model, sources, recipe, prompts)"
        )
    srcs = as_model_list(sources)
    for s in srcs:
        check_compatible(base, s)
    check_site(site)
    positions = _sweep_positions(positions)
    op_params = dict(op_params or {})
    ops_, layers_, alphas_ = _check_grid(base, ops, layers, alphas, op_params, allow_extrapolation)
    baselines, models = _check_others(base, baselines, models)
    _check_prompts(evaluate, prompts)

    # One Recipe per cell, validated up front so a bad combination fails before any work.
    recipes = _cell_recipes(ops_, layers_, alphas_, op_params, site, positions, allow_extrapolation)
    cells = [_Cell(b) for b in dict.fromkeys(baselines)] + [_Cell(label) for label in models]
    cells += [_Cell("latent", *key[1:]) for key in recipes]

    settings = getattr(evaluate, "settings", None)
    fingerprint = fingerprint_of(
        {
            **({"evaluate_settings": settings} if isinstance(settings, Mapping) else {}),
            "prompts": prompts,
            "evaluate": _evaluate_name(evaluate),
            "site": site,
            "positions": positions,
            "op_params": op_params,
            "base": model_info(base).name,
            "sources": [model_info(s).name for s in srcs],
            "models": {k: model_info(m).name for k, m in models.items()},
        }
    )
    path = Path(out) if out is not None else None
    per_pass = _cells_per_pass(evaluate, prompts, max_batch)
    done = _open_done(path, resume, fingerprint)
    todo = [c for c in cells if c.key not in done]
    bar = _progress(len(cells), len(cells) - len(todo), progress, "sweep")
    try:
        for group in _passes(todo, per_pass):
            bar.set_postfix_str(group[0].label() + (f" (+{len(group) - 1})" if len(group) > 1 else ""))
            if len(group) > 1:
                records = _run_cells(group, evaluate, base, srcs, [recipes[c.key] for c in group], prompts)
            else:
                model, cell_sources, recipe = _cell_run(group[0], base, srcs, models, recipes)
                records = [_run_cell(group[0], evaluate, (model, cell_sources, recipe), prompts)]
            for cell, (results, elapsed) in zip(group, records, strict=True):
                done[cell.key] = _record(cell, results, elapsed, fingerprint, path)
            bar.update(len(group))
    finally:
        bar.close()
        for model in (base, *srcs, *models.values()):
            release_engine(model)  # an evaluator's kept engine (TaskAccuracy keeps one between cells)
    return _table(cells, done, fingerprint, site)


def _check_prompts(evaluate: Evaluate, prompts: EvalData) -> None:
    """Prompts for an evaluator that reads them (non-empty), none for one with its own data."""
    needs = getattr(evaluate, "needs_prompts", True)
    if prompts is None and needs:
        raise LatentMergeError(
            f"prompts=None, but evaluate={evaluate!r} needs prompts (texts, chats or task examples); "
            "only an evaluator with its own data (needs_prompts = False, e.g. LmEvalTasks) runs without"
        )
    if prompts is not None and not needs:
        raise LatentMergeError(
            f"prompts has type {type(prompts).__name__}, but evaluate={evaluate!r} brings its own data "
            "(needs_prompts = False); pass prompts=None"
        )
    if isinstance(prompts, Sequence) and not isinstance(prompts, str) and len(prompts) == 0:
        raise LatentMergeError("prompts=[] is empty; expected at least one prompt")


def _sweep_positions(positions: Positions | None) -> Positions | None:
    """The sweep's positions, checked: one a Recipe can hold (None: the op's default)."""
    if positions is not None:
        positions = check_positions(positions)
        if isinstance(positions, (slice, Tensor)):
            raise LatentMergeError(
                f"positions={positions!r}: a sweep writes its cells as Recipes, which hold 'last', 'all' "
                "or a list of real-token indices; pass one of those"
            )
    return positions


def _check_others(
    base: Model, baselines: Sequence[str], models: Mapping[str, Model] | None
) -> tuple[list[str], dict[str, Model]]:
    """The baselines (known names) and the extra models (unreserved labels, compatible with `base`)."""
    baselines = list(baselines)
    for i, b in enumerate(baselines):
        if b not in _BASELINES:
            raise LatentMergeError(f"baselines[{i}]={b!r}; expected any of: {', '.join(_BASELINES)}")
    models = dict(models or {})
    for label in models:
        if label in _BASELINES or label == "latent":
            raise LatentMergeError(f"models has a model labelled {label!r}; that label is reserved")
        check_compatible(base, models[label])
    return baselines, models


def _open_done(path: Path | None, resume: bool, fingerprint: str) -> dict[tuple, Record]:
    """The cells `path` already holds for this fingerprint (none when not resuming: the file goes)."""
    done: dict[tuple, Record] = {}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not resume and path.exists():
            path.unlink()
        done = _read_done(path, fingerprint)
    return done


def _cells_per_pass(evaluate: Evaluate, prompts: EvalData, max_batch: int | None) -> int:
    """Latent cells per call of `evaluate.batch`: `max_batch` rows over the prompts' rows (a cell is
    one row with `prompts=None`; 1 cell without a `batch` method)."""
    if max_batch is not None and (
        isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1
    ):
        raise LatentMergeError(f"max_batch={max_batch!r}; expected an int >= 1 (rows per pass) or None")
    if not callable(getattr(evaluate, "batch", None)):
        return 1
    rows = max_batch if max_batch is not None else getattr(evaluate, "batch_size", 64)
    n_prompts = len(prompts) if isinstance(prompts, Sequence) and not isinstance(prompts, str) else 1
    return max(1, rows // max(1, n_prompts))


def _passes(todo: list[_Cell], per_pass: int) -> list[list[_Cell]]:
    """The cells to run, one list per call: each baseline alone, latent cells `per_pass` at a time."""
    out: list[list[_Cell]] = []
    for cell in todo:
        if cell.system == "latent" and out and out[-1][0].system == "latent" and len(out[-1]) < per_pass:
            out[-1].append(cell)
        else:
            out.append([cell])
    return out


def _run_cells(
    group: list[_Cell],
    evaluate: Evaluate,
    base: Model,
    srcs: list[Model],
    recipes: list[Recipe],
    prompts: EvalData,
) -> list[tuple[Results, float]]:
    """Latent cells evaluated together (`evaluate.batch`): one result per cell, the time shared."""
    start = time.perf_counter()
    results = list(evaluate.batch(base, srcs, recipes, prompts))  # type: ignore[attr-defined]
    if len(results) != len(group):
        raise LatentMergeError(
            f"evaluate.batch returned {len(results)} results for {len(group)} recipes; expected one each"
        )
    elapsed = (time.perf_counter() - start) / len(group)
    return [(r, elapsed) for r in results]


def _run_cell(
    cell: _Cell, evaluate: Evaluate, run: tuple[Model, list[Model], Recipe | None], prompts: EvalData
) -> tuple[Results, float]:
    """Evaluate one cell (`run`: model, sources, recipe): its results and the time taken."""
    model, cell_sources, recipe = run
    start = time.perf_counter()
    return evaluate(model, cell_sources, recipe, prompts), time.perf_counter() - start


def _record(cell: _Cell, results: Results, elapsed: float, fingerprint: str, path: Path | None) -> Record:
    """A cell's record, appended to `path` (synced)."""
    flat = _flatten(results, cell)
    record = {
        "format": _FORMAT,
        "fingerprint": fingerprint,
        "cell": dataclasses.asdict(cell),
        "results": [list(r) for r in flat],
        "elapsed_s": round(elapsed, 6),
    }
    if path is not None:
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
    return record


def _table(cells: list[_Cell], done: dict[tuple, Record], fingerprint: str, site: str) -> pd.DataFrame:
    """The tidy table of every cell's results, in cell order."""
    rows = []
    for cell in cells:
        record = done[cell.key]
        for category, metric, value in record["results"]:
            rows.append((cell.system, cell.op, cell.layer, cell.alpha, category, metric, value))
    df = pd.DataFrame.from_records(rows, columns=list(COLUMNS))
    df["layer"] = df["layer"].astype("Int64")
    df["alpha"] = df["alpha"].astype("float64")
    df.attrs["fingerprint"] = fingerprint
    df.attrs["site"] = site
    return df


def best_cells(df: pd.DataFrame, metric: str, *, higher_is_better: bool = True) -> pd.DataFrame:
    """All rows of the best latent cell of each op by `metric` (mean over categories), plus a `label`.

    Ties go to the first cell in sweep order. Useful to compare "best latent merge per op" with baselines
    and weight merges, as in the paper's table.
    """
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise LatentMergeError(f"df lacks column(s) {missing}; expected the table returned by lmn.sweep")
    latent = df[(df["system"] == "latent") & (df["metric"] == metric)]
    if latent.empty:
        raise LatentMergeError(
            f"metric={metric!r} has no latent rows in df; metrics present: {sorted(df['metric'].unique())}"
        )
    score = latent.groupby(["op", "layer", "alpha"], sort=False)["value"].mean()
    picks = []
    for _, group in score.groupby(level="op", sort=False):
        best = group.idxmax() if higher_is_better else group.idxmin()
        picks.append(best)
    rows = []
    for op, layer, alpha in picks:
        cell = (df["op"] == op) & (df["layer"] == layer) & (df["alpha"] == alpha)
        sel = df[(df["system"] == "latent") & cell]
        rows.append(sel.assign(label=f"latent {op} L{int(layer)} a={float(alpha):g}"))
    return pd.concat(rows, ignore_index=True)
