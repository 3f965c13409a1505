"""How a merged residual stream relates to the base and fine-tuned streams, layer by layer (Experiment B).

`representations` runs the base, each source, the latent-merged base (the recipe's `Plan`, applied with
`merge.apply_plan` in one trace) and, optionally, weight-merged models on the same prompts, keeps the
residual states of the same tokens at every analysed layer, and reports per layer:

- linear CKA between base and FT, base and merged, FT and merged (`lmn.metrics.linear_cka`, one row per
  token);
- the midness of the merged state between base and FT (`lmn.metrics.midness`): `midpoint_cos`,
  `arc_ratio`, `arc_deviation`, averaged over the tokens.

**Layer indexing.** `layer` is the index into the residual stream as in HF `hidden_states`: `l < n_layers`
is the residual *entering* block l (`layers.{l}.resid_pre`), `l = n_layers` the output of the last block
(`layers.{n-1}.resid_post`, before the final norm). A latent merge at layer L (site "pre") leaves every
index below L bit-identical to the base, so those rows carry `affected=False` and say nothing about the
merge; with site "post" the first affected index is L+1. A weight merge changes every layer.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Bool, Float
from pydantic import ValidationError
from torch import Tensor

from latent_merge_nnsight.deltas import Deltas, compute_deltas
from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.inputs import Batch, encode
from latent_merge_nnsight.merge import apply_plan
from latent_merge_nnsight.metrics import linear_cka, midness
from latent_merge_nnsight.models import check_compatible, hf_module, model_info
from latent_merge_nnsight.nouns import Model, Prompts
from latent_merge_nnsight.plan import Plan, Sources, load_recipe_deltas, recipe_plan
from latent_merge_nnsight.positions import Positions, last_real_index, position_mask
from latent_merge_nnsight.recipe import Recipe
from latent_merge_nnsight.sites import get_layers, site_name

__all__ = ["METRICS", "as_recipe", "hidden_states", "representations", "summarize"]

Tokens = Literal["merged", "real", "last"]

METRICS: tuple[str, ...] = (
    "cka_base_ft",
    "cka_base_merged",
    "cka_ft_merged",
    "midpoint_cos",
    "arc_ratio",
    "arc_deviation",
)
"""The metric columns of the `representations` table."""

_TOKENS: tuple[str, ...] = ("merged", "real", "last")


# ------------------------------------------------------------------------------------------- helpers


def as_recipe(recipe: Recipe | Mapping[str, object], what: str = "recipe") -> Recipe:
    """A `Recipe`, from a Recipe or a mapping (as written in YAML/JSON)."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        try:
            return Recipe.model_validate(dict(recipe))
        except ValidationError as e:
            problems = "; ".join(
                f"field {'.'.join(map(str, err['loc'])) or '(recipe)'}: "
                + err["msg"].removeprefix("Value error, ")
                for err in e.errors()
            )
            raise LatentMergeError(f"{what} is not a valid Recipe: {problems}") from None
    raise LatentMergeError(
        f"{what} has type {type(recipe).__name__}; expected an lmn.Recipe or a mapping such as "
        "{'op': 'slerp', 'layers': {4: 0.5}}"
    )


def as_model_list(sources: Sources, what: str = "sources") -> list[Any]:
    """One model or a sequence of models as a non-empty list."""
    if isinstance(sources, (list, tuple)):
        models = list(sources)
    else:
        models = [sources]
    if not models:
        raise LatentMergeError(f"{what}=[] is empty; expected one source model or a list of them")
    for i, m in enumerate(models):
        hf_module(m)  # raises for a non-model
        if not hasattr(m, "trace"):
            raise LatentMergeError(
                f"{what}[{i}] has type {type(m).__name__}; expected an nnsight model from lmn.load / lmn.wrap"
            )
    return models


def model_device(model: Model) -> torch.device:
    return next(hf_module(model).parameters()).device


def hidden_states(model: Model, batch: Batch, indices: Sequence[int]) -> dict[int, Float[Tensor, "b p d"]]:
    """Residual stream at HF `hidden_states` indices (see the module docstring), in one traced forward.

    Index l < n_layers is read entering block l, index n_layers leaving the last block; the forward stops
    after the highest one. Returns clones on the model's device.
    """
    n = model_info(model).n_layers
    wanted = sorted(set(indices))
    for i in wanted:
        if not 0 <= i <= n:
            raise LatentMergeError(
                f"layer index {i} is out of range for {model_info(model).name} ({n} layers); "
                f"expected 0 <= index <= {n} (index {n} is the last block's output)"
            )
    blocks = get_layers(model)
    batch = batch.to(model_device(model))
    saved: dict[int, Tensor] = {}
    with (
        torch.no_grad(),
        model.trace(input_ids=batch.input_ids, attention_mask=batch.attention_mask) as tracer,
    ):
        for i in wanted:
            if i < n:
                saved[i] = blocks[i].input.clone().save()
            else:
                out = blocks[n - 1].output
                saved[i] = (out[0] if isinstance(out, tuple) else out).clone().save()
        tracer.stop()
    return saved


def _source_index(layer: int, site: str) -> int:
    """The `hidden_states` index a merge at (layer, site) reads from the source."""
    return layer if site == "pre" else layer + 1


def _merged_hidden_states(
    base: Model,
    batch: Batch,
    indices: Sequence[int],
    plan: Plan,
    source_states: list[dict[int, Tensor]],
    deltas: Deltas | None,
) -> dict[int, Float[Tensor, "b p d"]]:
    """The base's residual at `indices` with the recipe's `plan` applied (`merge.apply_plan`), in one
    traced forward."""
    n = model_info(base).n_layers
    blocks = get_layers(base)
    batch = batch.to(model_device(base))
    site, alphas = plan.site, plan.alphas
    wanted = set(indices)
    top = max(max(wanted), max(_source_index(layer, site) for layer in alphas))

    def sources_for(layer: int) -> list[Any]:
        if plan.op.static_source:
            return [deltas]
        return [s[_source_index(layer, site)] for s in source_states]

    saved: dict[int, Tensor] = {}
    with (
        torch.no_grad(),
        base.trace(input_ids=batch.input_ids, attention_mask=batch.attention_mask) as tracer,
    ):

        def merge(block_index: int) -> Any:
            return apply_plan(plan, block_index, sources_for(block_index), base)

        # in execution order: block i's input (merged at "pre"), then its output (merged at "post")
        for block_index in range(min(top + 1, n)):
            merged = block_index in alphas
            if merged and site == "pre":
                new = merge(block_index)
                if block_index in wanted:
                    saved[block_index] = new.clone().save()
            elif block_index in wanted:
                saved[block_index] = blocks[block_index].input.clone().save()
            if merged and site == "post":
                new = merge(block_index)
                if block_index == n - 1 and n in wanted:
                    saved[n] = new.clone().save()
            elif block_index == n - 1 and n in wanted:
                out = blocks[n - 1].output
                saved[n] = (out[0] if isinstance(out, tuple) else out).clone().save()
        if top < n:
            tracer.stop()
    return saved


def _row_mask(mask: Tensor, tokens: str, positions: Positions) -> Bool[Tensor, "b p"]:
    """Which tokens of a chunk become rows of the CKA/midness matrices."""
    if tokens == "real":
        return mask.bool()
    if tokens == "last":
        last = last_real_index(mask)
        return torch.arange(mask.shape[-1], device=mask.device)[None, :] == last[:, None]
    return position_mask(mask, positions, decoding=False)


def _resolve_layers(layers: int | Sequence[int] | str, n: int, first_affected: int) -> list[int]:
    if isinstance(layers, str):
        if layers == "all":
            return list(range(n + 1))
        if layers == "affected":
            return list(range(min(first_affected, n), n + 1))
        raise LatentMergeError(
            f"layers={layers!r}; expected 'all', 'affected' or a list of indices in [0, {n}]"
        )
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, Sequence) or not layers:
        raise LatentMergeError(
            f"layers={layers!r}; expected 'all', 'affected' or a non-empty list of indices in [0, {n}]"
        )
    for i, layer in enumerate(layers):
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= n:
            raise LatentMergeError(
                f"layers[{i}]={layer!r} is out of range; expected 0 <= layer <= {n} "
                f"(0..{n - 1}: residual entering block l; {n}: output of the last block)"
            )
    return sorted(set(layers))


def _layerwise_cka(x: Tensor, y: Tensor, debiased: bool) -> list[float]:
    """CKA per layer; NaN where it is undefined (e.g. every row identical, as for a shared last token)."""
    out = []
    for xl, yl in zip(x, y, strict=True):
        try:
            out.append(float(linear_cka(xl, yl, debiased=debiased)))
        except LatentMergeError:
            out.append(float("nan"))
    return out


# ---------------------------------------------------------------------------------------------- public


def representations(
    base: Model,
    sources: Sources,
    recipe: Recipe | Mapping[str, object],
    prompts: Prompts,
    layers: Sequence[int] | Literal["all", "affected"] = "all",
    weight_merged: Model | Mapping[str, Model] | None = None,
    *,
    tokens: Tokens = "merged",
    debiased: bool = False,
    batch_size: int = 8,
    padding_side: Literal["left", "right"] | None = None,
) -> pd.DataFrame:
    """Per-layer CKA and midness of latent-merged (and optionally weight-merged) states on `prompts`.

    Arguments:
        base: the base model (`lmn.load` / `lmn.wrap`).
        sources: the fine-tuned model, or a list (RegMean). The first source plays "FT" in the metrics.
        recipe: an `lmn.Recipe` (or its dict), applied (its `Plan`) in one forward over the prompts.
            Op `delta` uses the recipe's `deltas` file, or else `compute_deltas` on these prompts.
        prompts: strings, chats or ids, as for `lmn.capture`; every model sees the same token ids.
        layers: `"all"` (indices 0..n_layers, see the module docstring), `"affected"` (from the first
            layer the latent merge can change), or a list of indices.
        weight_merged: a weight-merged model, or a mapping `{label: model}` of several; each is reported
            as its own `merge` (label `"weight"` for a single model).
        tokens: which tokens become rows: `"merged"` (the positions the recipe mixes, e.g. each prompt's
            last token for positions "last"), `"real"` (every real token) or `"last"` (each prompt's last
            real token).
        debiased: use debiased CKA (needs at least 4 rows).

    Returns:
        A tidy DataFrame, one row per (merge, layer), with columns `merge` ("latent", "weight" or a label),
        `layer`, `site` (canonical name), `affected` (False where the merge cannot have changed the
        state), `n_tokens`, and the metrics of `METRICS`. CKA is NaN where it is undefined (all rows
        identical, e.g. the embedding of a shared last token). `summarize(df)` gives the paper's table.
    """
    recipe = as_recipe(recipe)
    srcs = as_model_list(sources)
    if tokens not in _TOKENS:
        raise LatentMergeError(f"tokens={tokens!r}; expected one of: {', '.join(_TOKENS)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise LatentMergeError(f"batch_size={batch_size!r}; expected an int >= 1")
    weights = _weight_models(base, srcs, weight_merged)
    n = model_info(base).n_layers
    plan = recipe_plan(recipe, n)
    first_affected = min(_source_index(layer, recipe.site) for layer in plan.alphas)
    indices = _resolve_layers(layers, n, first_affected)
    _check_depths(base, srcs, weights, plan, indices)
    batch = encode(getattr(base, "tokenizer", None), prompts, padding_side=padding_side)
    deltas: Deltas | None = None
    if plan.op.static_source:
        if recipe.deltas is not None:
            deltas = load_recipe_deltas(recipe, device=model_device(base))
        else:
            deltas = compute_deltas(
                base, srcs[0], batch.input_ids, list(plan.alphas), site=recipe.site, batch_size=batch_size
            )
    models = _Models(base, srcs, weights, plan, deltas)
    rows, n_rows = _collect_rows(models, batch, indices, tokens, batch_size)
    if n_rows < (4 if debiased else 2):
        raise LatentMergeError(
            f"tokens={tokens!r} selects {n_rows} token(s) over {batch.input_ids.shape[0]} prompt(s); "
            f"CKA needs at least {4 if debiased else 2}: give more prompts or use tokens='real'"
        )
    records = _records(rows, indices, n, first_affected, n_rows, debiased)
    df = pd.DataFrame.from_records(records)
    df.attrs["recipe"] = recipe.to_dict()
    df.attrs["first_affected"] = first_affected
    df.attrs["tokens"] = tokens
    return df


def _weight_models(
    base: Model, srcs: list[Model], weight_merged: Model | Mapping[str, Model] | None
) -> dict[str, Model]:
    """The weight-merged models by label, every model checked compatible with the base."""
    weights: dict[str, Model]
    if weight_merged is None:
        weights = {}
    elif isinstance(weight_merged, Mapping):
        weights = {str(k): v for k, v in weight_merged.items()}
        if "latent" in weights:
            raise LatentMergeError("weight_merged has a model labelled 'latent'; that label is reserved")
    else:
        weights = {"weight": weight_merged}
    for s in srcs:
        check_compatible(base, s)
    for wm in weights.values():
        hf_module(wm)
        check_compatible(base, wm)
    return weights


def _check_depths(
    base: Model, srcs: list[Any], weights: dict[str, Any], plan: Plan, indices: list[int]
) -> None:
    """Every model holds the layers the analysis reads from it."""
    n = model_info(base).n_layers
    merge_indices = sorted({_source_index(layer, plan.site) for layer in plan.alphas})
    for i, s in enumerate(srcs):
        need = max(indices) if i == 0 else max(merge_indices)
        if plan.op.static_source and i > 0:
            continue
        depth = model_info(s).n_layers
        if need > depth or (i == 0 and depth != n):
            raise LatentMergeError(
                f"sources[{i}] ({model_info(s).name}) has {depth} layers; the base has {n} and the analysis "
                f"needs index {need} of it; load sources in full (not up_to_layer) for representations"
            )
    for label, wm in weights.items():
        if model_info(wm).n_layers != n:
            raise LatentMergeError(
                f"weight_merged[{label!r}] has {model_info(wm).n_layers} layers; expected {n} like the base"
            )


@dataclasses.dataclass
class _Models:
    """What `representations` runs on each chunk: the base, its sources, the weight merges, the plan."""

    base: Model
    srcs: list[Any]
    weights: dict[str, Any]
    plan: Plan
    deltas: Deltas | None


def _collect_rows(
    models: _Models, batch: Batch, indices: list[int], tokens: str, batch_size: int
) -> tuple[dict[str, list[Tensor]], int]:
    """Per model (base, ft, latent, each weight merge), the selected tokens' states `[layers, rows, d]`
    chunk by chunk, and the number of rows."""
    plan, static = models.plan, models.plan.op.static_source
    merge_indices = sorted({_source_index(layer, plan.site) for layer in plan.alphas})
    rows: dict[str, list[Tensor]] = {"base": [], "ft": [], "latent": [], **{w: [] for w in models.weights}}
    n_rows = 0
    for start in range(0, batch.input_ids.shape[0], batch_size):
        chunk = Batch(
            batch.input_ids[start : start + batch_size], batch.attention_mask[start : start + batch_size]
        )
        select = _row_mask(chunk.attention_mask, tokens, plan.positions)
        if not bool(select.any()):
            continue
        n_rows += int(select.sum())
        hb = hidden_states(models.base, chunk, indices)
        src_states = []
        for i, s in enumerate(models.srcs):
            if static and i > 0:
                continue
            wanted = (set(indices) if i == 0 else set()) | (set() if static else set(merge_indices))
            src_states.append(hidden_states(s, chunk, sorted(wanted)))
        merged = _merged_hidden_states(
            models.base, chunk, indices, plan, [] if static else src_states, models.deltas
        )

        def gather(states: Mapping[int, Tensor], sel: Tensor = select) -> Tensor:
            # [layers, rows, d] on the CPU, in the order of `indices`
            return torch.stack([states[i][sel.to(states[i].device)].detach().cpu() for i in indices])

        rows["base"].append(gather(hb))
        rows["ft"].append(gather(src_states[0]))
        rows["latent"].append(gather(merged))
        for label, wm in models.weights.items():
            rows[label].append(gather(hidden_states(wm, chunk, indices)))
    return rows, n_rows


def _records(
    rows: dict[str, list[Tensor]],
    indices: list[int],
    n: int,
    first_affected: int,
    n_rows: int,
    debiased: bool,
) -> list[dict[str, Any]]:
    """One record per (merge, layer): CKA between each pair of base, FT and merged, and midness."""
    hb_all = torch.cat(rows.pop("base"), dim=1)
    hf_all = torch.cat(rows.pop("ft"), dim=1)
    cka_bf = _layerwise_cka(hb_all, hf_all, debiased)
    records = []
    for label, chunks in rows.items():
        hm_all = torch.cat(chunks, dim=1)
        cka_bm = _layerwise_cka(hb_all, hm_all, debiased)
        cka_fm = _layerwise_cka(hf_all, hm_all, debiased)
        mid = midness(hb_all, hf_all, hm_all)
        means = {
            name: getattr(mid, name).to(torch.float64).mean(dim=-1).tolist()
            for name in ("midpoint_cos", "arc_ratio", "arc_deviation")
        }
        for k, index in enumerate(indices):
            records.append(
                {
                    "merge": label,
                    "layer": index,
                    "site": site_name(index, "pre") if index < n else site_name(n - 1, "post"),
                    "affected": bool(index >= first_affected) if label == "latent" else True,
                    "n_tokens": n_rows,
                    "cka_base_ft": cka_bf[k],
                    "cka_base_merged": cka_bm[k],
                    "cka_ft_merged": cka_fm[k],
                    **{name: means[name][k] for name in means},
                }
            )
    return records


def summarize(df: pd.DataFrame, layers: Sequence[int] | None = None) -> pd.DataFrame:
    """The paper's table: mean of each metric per `merge`, over the layers the latent merge affects.

    Every merge is averaged over the *same* layers (by default the latent rows with `affected=True`), so
    a weight merge is not credited for layers where the latent merge is the base by construction.
    NaN values (undefined CKA) are skipped.
    """
    missing = {"merge", "layer", "affected", *METRICS} - set(df.columns)
    if missing:
        raise LatentMergeError(
            f"df lacks column(s) {sorted(missing)}; expected the table returned by lmn.representations"
        )
    if layers is None:
        latent = df[df["merge"] == "latent"]
        layers = sorted(latent.loc[latent["affected"], "layer"].unique()) if len(latent) else None
    sub = df if layers is None else df[df["layer"].isin(list(layers))]
    if sub.empty:
        raise LatentMergeError(f"layers={list(layers or [])} selects no rows of df")
    out = sub.groupby("merge", sort=False)[list(METRICS)].mean()
    out.insert(0, "n_layers", sub.groupby("merge", sort=False)["layer"].nunique())
    return out
