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

**Reuse below the merge layer.** Cells are visited layer by layer (all ops and alphas of a layer in a row),
so an evaluator can keep per-layer work between cells. `Perplexity` does: per (texts, layer) it runs the
base and the sources once up to the merge layer, then for each (op, alpha) it runs only the blocks from
the merge layer up (the lower blocks are skipped with nnsight's `skip`, fed the cached residual).
Generation-based evaluators (`TaskAccuracy`) cannot reuse prefixes across alphas: after the first new
token the merged and base streams differ at every layer.
"""

import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from latent_merge_nnsight.analysis.representations import as_model_list, as_recipe, model_device
from latent_merge_nnsight.capture import Capture, capture
from latent_merge_nnsight.deltas import Deltas, compute_deltas
from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.inputs import Batch, encode
from latent_merge_nnsight.jsonl import read_resumable
from latent_merge_nnsight.merge import merge_into
from latent_merge_nnsight.models import check_compatible, model_info
from latent_merge_nnsight.ops import check_alpha, get_op
from latent_merge_nnsight.positions import check_positions
from latent_merge_nnsight.recipe import Recipe
from latent_merge_nnsight.sites import check_layer, check_site, get_layers

__all__ = ["COLUMNS", "Perplexity", "TaskAccuracy", "best_cells", "sweep"]

Evaluate = Callable[[Any, list[Any], Recipe | None, Any], Mapping[str, Any]]

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


def _non_empty(name: str, values: Any) -> list[Any]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        values = [values]
    values = list(values)
    if not values:
        raise LatentMergeError(f"{name}=[] is empty; expected at least one value")
    return values


def _check_grid(
    base: Any, ops: Any, layers: Any, alphas: Any, op_params: Mapping[str, Any], allow_extrapolation: bool
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


def _jsonable(obj: Any) -> Any:
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


def _evaluate_name(evaluate: Any) -> str:
    name = getattr(evaluate, "__qualname__", None) or type(evaluate).__qualname__
    return f"{getattr(evaluate, '__module__', '') or type(evaluate).__module__}.{name}"


def _fingerprint(config: Mapping[str, Any]) -> str:
    text = json.dumps(_jsonable(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _flatten(results: Any, cell: _Cell) -> list[tuple[str, str, float]]:
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


def _read_done(path: Path, fingerprint: str) -> dict[tuple, dict[str, Any]]:
    """Finished cells in a results file; a torn last line (from a kill mid-write) is cut off."""
    done: dict[tuple, dict[str, Any]] = {}
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


def _progress(total: int, initial: int, enabled: bool, desc: str) -> Any:
    with warnings.catch_warnings():  # tqdm.auto warns when ipywidgets is missing and falls back to text
        warnings.simplefilter("ignore")
        from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit="cell")


def sweep(
    base: Any,
    sources: Any,
    *,
    ops: Sequence[str],
    layers: Sequence[int],
    alphas: Sequence[float],
    evaluate: Evaluate,
    prompts: Any,
    out: str | Path | None = None,
    site: Literal["pre", "post"] = "pre",
    positions: Any = None,
    op_params: Mapping[str, Any] | None = None,
    baselines: Sequence[str] = ("base",),
    models: Mapping[str, Any] | None = None,
    allow_extrapolation: bool = False,
    resume: bool = True,
    progress: bool = True,
) -> pd.DataFrame:
    """Evaluate every (op, layer, alpha) latent merge of `sources` into `base` with `evaluate`.

    Arguments:
        base, sources: nnsight models (`sources`: one model or a list, for RegMean).
        ops, layers, alphas: the grid; each cell is `Recipe(op=op, layers={layer: alpha}, site, positions)`.
        evaluate: `evaluate(model, sources, recipe, prompts)` returning `{metric: number}` or
            `{category: {metric: number}}`; `recipe=None` means "the model alone". `Perplexity()` and
            `TaskAccuracy()` are ready-made ones.
        prompts: whatever `evaluate` takes (texts, chats, task examples); it is passed through unchanged.
        out: a JSONL file to append finished cells to and to resume from (see the module docstring).
        site, positions: the recipe's site and positions (positions None: the op's default).
        op_params: extra recipe fields for the ops, e.g. `{"weights": [0.7, 0.3]}` for regmean.
        baselines: any of "base" (the base alone) and "source" (the first source alone).
        models: more whole models evaluated alone, `{label: model}`, e.g. weight merges.
        resume: False starts `out` afresh instead of skipping its finished cells.
        progress: show a tqdm bar.

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
    if positions is not None:
        positions = check_positions(positions)
        if isinstance(positions, (slice, Tensor)):
            raise LatentMergeError(
                f"positions={positions!r}: a sweep writes its cells as Recipes, which hold 'last', 'all' "
                "or a list of real-token indices; pass one of those"
            )
    op_params = dict(op_params or {})
    ops_, layers_, alphas_ = _check_grid(base, ops, layers, alphas, op_params, allow_extrapolation)
    baselines = list(baselines)
    for i, b in enumerate(baselines):
        if b not in _BASELINES:
            raise LatentMergeError(f"baselines[{i}]={b!r}; expected any of: {', '.join(_BASELINES)}")
    models = dict(models or {})
    for label in models:
        if label in _BASELINES or label == "latent":
            raise LatentMergeError(f"models has a model labelled {label!r}; that label is reserved")
        check_compatible(base, models[label])
    if isinstance(prompts, Sequence) and not isinstance(prompts, str) and len(prompts) == 0:
        raise LatentMergeError("prompts=[] is empty; expected at least one prompt")

    # One Recipe per cell, validated up front so a bad combination fails before any work.
    recipes: dict[tuple, Recipe] = {}
    cells = [_Cell(b) for b in dict.fromkeys(baselines)] + [_Cell(label) for label in models]
    for layer in layers_:
        for op in ops_:
            for a in alphas_:
                spec = get_op(op)
                params = {k: v for k, v in op_params.items() if k in spec.params}
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
                cell = _Cell("latent", op, layer, a)
                recipes[cell.key] = recipe
                cells.append(cell)

    fingerprint = _fingerprint(
        {
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
    done: dict[tuple, dict[str, Any]] = {}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not resume and path.exists():
            path.unlink()
        done = _read_done(path, fingerprint)

    todo = [c for c in cells if c.key not in done]
    bar = _progress(len(cells), len(cells) - len(todo), progress, "sweep")
    try:
        for cell in todo:
            bar.set_postfix_str(cell.label(), refresh=False)
            if cell.system == "base":
                model, cell_sources, recipe = base, srcs, None
            elif cell.system == "source":
                model, cell_sources, recipe = srcs[0], [], None
            elif cell.system in models:
                model, cell_sources, recipe = models[cell.system], [], None
            else:
                model, cell_sources, recipe = base, srcs, recipes[cell.key]
            start = time.perf_counter()
            results = evaluate(model, cell_sources, recipe, prompts)
            flat = _flatten(results, cell)
            record = {
                "format": _FORMAT,
                "fingerprint": fingerprint,
                "cell": dataclasses.asdict(cell),
                "results": [list(r) for r in flat],
                "elapsed_s": round(time.perf_counter() - start, 6),
            }
            if path is not None:
                with path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            done[cell.key] = record
            bar.update(1)
    finally:
        bar.close()

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


# ---------------------------------------------------------------------------------------- evaluators


def _nll_sums(
    logits: Float[Tensor, "b p v"], ids: Int[Tensor, "b p"], mask: Int[Tensor, "b p"]
) -> tuple[float, int]:
    """Summed next-token negative log-likelihood over real (token, next token) pairs, and their count."""
    wd = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = torch.log_softmax(logits[:, :-1].to(wd), dim=-1)
    target = ids[:, 1:].to(logp.device)
    nll = -logp.gather(-1, target[..., None]).squeeze(-1)
    real = (mask[:, 1:].bool() & mask[:, :-1].bool()).to(nll.device)
    return float(nll[real].sum()), int(real.sum())


@dataclasses.dataclass
class _Prefix:
    """What one (texts, layer) needs for every alpha: cached base residual and source captures."""

    key: tuple
    chunks: list[Batch]
    base_states: list[Tensor | tuple]  # what the skipped blocks hand on (the residual entering the layer)
    sources: list[Any]  # per chunk: a Capture, a list of Captures (multi-source) or Deltas


class Perplexity:
    """Evaluator: token-level negative log-likelihood and perplexity of given texts under a (merged) model.

    Use as `sweep(..., evaluate=Perplexity(), prompts=texts)`; the texts are scored whole (every real
    token after the first), teacher-forced. The merge is applied with `merge_into` in an nnsight trace.
    Positions: the recipe's, or "all" when the recipe leaves them unset: teacher forcing stands in for
    generation, where lockstep merging mixes every new token (with the paper's "last", only the final
    position would change, and its prediction is not scored).

    Reuse: for single-layer recipes it keeps, for the latest (model, sources, texts, layer, site), the
    base residual entering the merge layer and the sources' captures; each further (op, alpha) skips the
    base's blocks below the layer (nnsight `skip`, fed the cached residual) and runs no source forward.
    `reuse_prefix=False` runs everything per call (same numbers, to float rounding).

    Returns `{"nll": mean nats per token, "perplexity": exp(nll), "n_tokens": count}`.
    """

    def __init__(self, *, batch_size: int = 8, reuse_prefix: bool = True, padding_side: str = "right"):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise LatentMergeError(f"batch_size={batch_size!r}; expected an int >= 1")
        if padding_side not in ("left", "right"):
            raise LatentMergeError(f"padding_side={padding_side!r}; expected 'left' or 'right'")
        self.batch_size = batch_size
        self.reuse_prefix = reuse_prefix
        self.padding_side = padding_side
        self._prefix: _Prefix | None = None
        self.prefix_runs = 0
        """How many times a prefix (base and sources up to the merge layer) was computed."""

    def __repr__(self) -> str:
        return f"Perplexity(batch_size={self.batch_size}, reuse_prefix={self.reuse_prefix})"

    def _chunks(self, model: Any, texts: Any) -> list[Batch]:
        batch = encode(getattr(model, "tokenizer", None), texts, padding_side=self.padding_side)  # type: ignore[arg-type]
        ids, mask = batch.input_ids, batch.attention_mask
        return [
            Batch(ids[i : i + self.batch_size], mask[i : i + self.batch_size])
            for i in range(0, ids.shape[0], self.batch_size)
        ]

    def __call__(
        self, model: Any, sources: Sequence[Any], recipe: Recipe | None, prompts: Any
    ) -> dict[str, float]:
        chunks = self._chunks(model, prompts)
        total, count = 0.0, 0
        if recipe is None:
            for chunk in chunks:
                c = chunk.to(model_device(model))
                with torch.no_grad(), model.trace(input_ids=c.input_ids, attention_mask=c.attention_mask):
                    logits = model.lm_head.output.save()
                s, k = _nll_sums(logits, c.input_ids, c.attention_mask)
                total, count = total + s, count + k
            return self._result(total, count)

        recipe = as_recipe(recipe)
        spec = get_op(recipe.op)
        srcs = list(sources)
        if not srcs and not (spec.static_source and recipe.deltas):
            raise LatentMergeError(f"sources is empty; recipe op {recipe.op!r} needs a source model")
        alphas = recipe.layer_alphas(model_info(model).n_layers)
        positions = recipe.positions if recipe.positions is not None else "all"
        params = recipe.op_params()
        layers = sorted(alphas)
        prefix = self._get_prefix(model, srcs, recipe, prompts, chunks, layers)
        reuse = self.reuse_prefix and len(layers) == 1 and layers[0] > 0
        blocks = get_layers(model)
        for i, chunk in enumerate(chunks):
            c = chunk.to(model_device(model))
            with torch.no_grad(), model.trace(input_ids=c.input_ids, attention_mask=c.attention_mask):
                if reuse:
                    for b in range(layers[0]):
                        blocks[b].skip(prefix.base_states[i])
                for layer in layers:
                    merge_into(
                        layer=layer,
                        source=prefix.sources[i],
                        op=spec,
                        alpha=alphas[layer],
                        positions=positions,
                        site=recipe.site,
                        allow_extrapolation=recipe.allow_extrapolation,
                        **params,
                    )
                logits = model.lm_head.output.save()
            s, k = _nll_sums(logits, c.input_ids, c.attention_mask)
            total, count = total + s, count + k
        return self._result(total, count)

    @staticmethod
    def _result(total: float, count: int) -> dict[str, float]:
        if count == 0:
            raise LatentMergeError(
                "prompts have no token pairs to score; each text needs at least two tokens"
            )
        nll = total / count
        return {"nll": nll, "perplexity": math.exp(nll), "n_tokens": float(count)}

    def _get_prefix(
        self, model: Any, srcs: list[Any], recipe: Recipe, texts: Any, chunks: list[Batch], layers: list[int]
    ) -> _Prefix:
        spec = get_op(recipe.op)
        key = (
            id(model),
            tuple(id(s) for s in srcs),
            _fingerprint({"texts": texts}),
            tuple(layers),
            recipe.site,
            spec.static_source,
            recipe.deltas,
            self.padding_side,
        )
        if self._prefix is not None and self._prefix.key == key:
            return self._prefix
        self.prefix_runs += 1
        base_states: list[Any] = []
        per_chunk_sources: list[Any] = []
        deltas: Deltas | None = None
        if spec.static_source:
            if recipe.deltas is not None:
                deltas = Deltas.load(recipe.deltas, device=model_device(model))
            else:
                deltas = compute_deltas(
                    model, srcs[0], texts, layers, site=recipe.site, batch_size=self.batch_size
                )
        blocks = get_layers(model)
        for chunk in chunks:
            if deltas is not None:
                per_chunk_sources.append(deltas)
            else:
                caps: list[Capture] = [
                    capture(
                        s,
                        input_ids=chunk.input_ids,
                        attention_mask=chunk.attention_mask,
                        layers=layers,
                        site=recipe.site,
                    )
                    for s in srcs
                ]
                per_chunk_sources.append(caps if spec.multi_source else caps[0])
            if self.reuse_prefix and len(layers) == 1 and layers[0] > 0:
                c = chunk.to(model_device(model))
                with (
                    torch.no_grad(),
                    model.trace(input_ids=c.input_ids, attention_mask=c.attention_mask) as tracer,
                ):
                    out = blocks[layers[0] - 1].output
                    state = (out[0].clone(),) if isinstance(out, tuple) else out.clone()
                    state = state.save()
                    tracer.stop()
                base_states.append(state)
        self._prefix = _Prefix(key, chunks, base_states, per_chunk_sources)
        return self._prefix


class TaskAccuracy:
    """Evaluator for the toy tasks: greedy exact-match accuracy per category, generated with `lmn.generate`.

    `prompts` is a list of `lmn.evaluation.tasks.Example`; each is asked as one user turn (the chat the toy
    models were trained on), answered greedily within the category's token budget (`tasks.MAX_NEW_TOKENS`
    unless `max_new_tokens` is given) and scored with `tasks.score`. Op `delta` steers with the recipe's
    `deltas` file, or else with `compute_deltas(model, sources[0], the prompts' chats, layers)`.
    Returns `{category: {"accuracy": x}}`.
    """

    def __init__(self, *, max_new_tokens: int | None = None, batch_size: int = 64, engine: str = "auto"):
        if max_new_tokens is not None and (
            isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1
        ):
            raise LatentMergeError(f"max_new_tokens={max_new_tokens!r}; expected an int >= 1 or None")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise LatentMergeError(f"batch_size={batch_size!r}; expected an int >= 1")
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.engine = engine
        self._deltas: tuple[tuple, Deltas] | None = None

    def __repr__(self) -> str:
        return f"TaskAccuracy(max_new_tokens={self.max_new_tokens}, batch_size={self.batch_size})"

    def __call__(
        self, model: Any, sources: Sequence[Any], recipe: Recipe | None, prompts: Any
    ) -> dict[str, Any]:
        from latent_merge_nnsight.evaluation.tasks import MAX_NEW_TOKENS, Example, accuracy, chat_messages
        from latent_merge_nnsight.generate import generate

        examples = list(prompts)
        if not examples:
            raise LatentMergeError("prompts=[] is empty; expected a list of evaluation.tasks.Example")
        for i, ex in enumerate(examples):
            if not isinstance(ex, Example):
                raise LatentMergeError(
                    f"prompts[{i}] has type {type(ex).__name__}; TaskAccuracy expects "
                    "evaluation.tasks.Example items (e.g. from tasks.make_eval_set)"
                )
        chats = [chat_messages(ex.prompt) for ex in examples]
        merge_sources: Any = None
        if recipe is not None:
            recipe = as_recipe(recipe)
            merge_sources = list(sources)
            if get_op(recipe.op).static_source:
                merge_sources = self._steering(model, merge_sources, recipe, chats)
        outputs: list[str] = [""] * len(examples)
        by_category: dict[str, list[int]] = {}
        for i, ex in enumerate(examples):
            by_category.setdefault(ex.category, []).append(i)
        for category, idx in by_category.items():
            budget = self.max_new_tokens or MAX_NEW_TOKENS.get(category, 64)
            for start in range(0, len(idx), self.batch_size):
                rows = idx[start : start + self.batch_size]
                result = generate(
                    model,
                    merge_sources,
                    [chats[i] for i in rows],
                    recipe,
                    max_new_tokens=budget,
                    engine=self.engine,
                )
                for i, text in zip(rows, result.texts, strict=True):
                    outputs[i] = text
        return {c: {"accuracy": a} for c, a in accuracy(examples, outputs).items()}

    def _steering(self, model: Any, sources: list[Any], recipe: Recipe, chats: list[Any]) -> Deltas:
        if recipe.deltas is not None:
            return Deltas.load(recipe.deltas, device=model_device(model))
        if not sources:
            raise LatentMergeError(
                "op 'delta' needs a source model to compute deltas from (or a recipe with a deltas file)"
            )
        layers = sorted(recipe.layer_alphas(model_info(model).n_layers))
        key = (id(model), id(sources[0]), _fingerprint({"chats": chats}), recipe.site)
        if self._deltas is None or self._deltas[0] != key or not set(layers) <= set(self._deltas[1].vectors):
            n = model_info(model).n_layers
            every = sorted(set(range(min(n, model_info(sources[0]).n_layers))))
            self._deltas = (key, compute_deltas(model, sources[0], chats, every, site=recipe.site))
        return self._deltas[1]
