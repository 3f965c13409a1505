"""`Plan`: a Recipe resolved once, and `Plan.apply`, the one call that mixes a residual.

`resolve_plan(base, sources, recipe)` turns the user's `(sources, recipe)` into a `Plan` and the list
of source models, checking everything that can be checked without running a model: the op and its
parameters, layers against the base and against each source (a source loaded `up_to_layer` has fewer
blocks), model compatibility, and the steering deltas. It is the only place a recipe's `deltas` file is
loaded (a relative path is read next to the YAML file the recipe came from).

Every executor then runs the same plan and mixes through `Plan.apply(layer, site, hb, hs, select)`:
`merge_into` (in a trace), the fast engine, the nnsight engine and `analysis/`. `Plan.next_logits` is the
logit ensemble's mix, used by the loop's choose-next step.

Per-row recipes (`recipe=[r0, r1, ...]`, one per prompt: `rows_plan`) resolve to one plan whose
`groups` are sub-plans, one per distinct (op, site, positions, params). A group's `alphas` map each of
its layers to a `[rows]` tensor: row r's alpha there, 0 for a row of another group or one that does not
merge at that layer (such rows keep the base residual bit for bit: the mix is masked by `alpha != 0`).
The rows are all live-source ops (sharing the source models) or all `delta` (sharing one set of steering
vectors, each group holding those of its layers).
`Plan.apply` mixes every row by its own recipe in one call per group (no loop over rows).
"""

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypeAlias

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from latent_merge_nnsight._nnsight import unwrap
from latent_merge_nnsight.deltas import Deltas
from latent_merge_nnsight.ensemble import Ensemble, mix_logits
from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.models import check_compatible, hf_module, model_info
from latent_merge_nnsight.nouns import Model
from latent_merge_nnsight.ops import OpSpec, get_op, regmean_beta, source_weights
from latent_merge_nnsight.positions import Positions, check_positions, position_mask
from latent_merge_nnsight.recipe import Recipe

__all__ = [
    "Plan",
    "RecipeLike",
    "Sources",
    "device_of",
    "load_recipe_deltas",
    "merge_plan",
    "recipe_deltas_path",
    "recipe_plan",
    "resolve_plan",
    "row_alphas",
    "rows_plan",
]

Mode = Literal["base", "merge", "ensemble"]

Sources: TypeAlias = Model | Sequence[Model] | Deltas | str | Path | None
"""What `lmn.generate` and `resolve_plan` take as sources: a model, models (RegMean), steering `Deltas`
(or a file of them), or None (the base alone)."""
RecipeLike: TypeAlias = Recipe | Ensemble | Sequence[Recipe | None] | None
"""What `lmn.generate` and `resolve_plan` take as a recipe: a latent merge or steering `Recipe`, a logit
`Ensemble`, one recipe (or None) per prompt (`rows_plan`), or None (the base alone)."""


@dataclass
class Plan:
    """A resolved run.

    Attributes:
        mode: "base" (base alone), "merge" (latent merge) or "ensemble" (logit ensemble).
        op: the merge operator (mode "merge").
        alphas: layer -> alpha, sorted by layer (None: the op's own default, e.g. RegMean's lambda).
        site: "pre" or "post".
        positions: where the merge applies (see `lmn.positions`).
        params: op keyword parameters (RegMean's `lam`, `weights`).
        deltas: steering vectors per layer for a static-source op (delta).
        ensemble: the logit-ensemble spec (mode "ensemble").
        allow_extrapolation: alphas outside [0, 1] were allowed by the recipe.
        recipe: what the user passed, for the result's record (a list for per-row recipes).
        groups: per-row recipes (`rows_plan`): one merge sub-plan per distinct (op, site, positions,
            params), whose `alphas` are `[rows]` tensors (0 where a row does not merge) and, for `delta`
            rows, whose `deltas` are the vectors of its layers. Empty for a plan of one recipe, whose
            fields above say it all.
    """

    mode: Mode
    op: OpSpec | None = None
    alphas: dict[int, float | None] = field(default_factory=dict)
    site: Literal["pre", "post"] = "pre"
    positions: Positions = "last"
    params: dict[str, Any] = field(default_factory=dict)
    deltas: dict[int, Tensor] | None = None
    ensemble: Ensemble | None = None
    allow_extrapolation: bool = False
    recipe: RecipeLike = None
    groups: list["Plan"] = field(default_factory=list)

    @property
    def merges(self) -> list[tuple[int, float | None]]:
        """(layer, alpha) in execution order, without alpha=0 layers (a per-row group keeps all)."""
        return [(layer, a) for layer, a in sorted(self.alphas.items()) if isinstance(a, Tensor) or a != 0]

    def sites(self) -> list[tuple[int, str]]:
        """(layer, site) pairs this plan merges at, in forward order (a layer's "pre" before its "post").
        A per-row plan lists every layer one of its rows names (rows not merging there have alpha 0)."""
        if self.mode != "merge":
            return []
        if self.groups:
            found = {(layer, g.site) for g in self.groups for layer in g.alphas}
        else:
            found = {(layer, self.site) for layer, _ in self.merges}
        return sorted(found, key=lambda ls: (ls[0], ls[1] == "post"))

    @property
    def live_sources(self) -> bool:
        """Whether source models run alongside the base."""
        if self.groups:  # all live-source ops or all `delta` (`rows_plan`)
            return any(g.live_sources for g in self.groups)
        return self.mode == "ensemble" or (
            self.mode == "merge" and self.op is not None and not self.op.static_source
        )

    @property
    def merges_while_decoding(self) -> bool:
        """Whether decode steps merge too: "last" and "all" select every new token; explicit prompt
        positions select none (those merges happen at the prompt step only)."""
        if self.groups:
            return any(g.merges_while_decoding for g in self.groups)
        probe = position_mask(torch.ones(1, 1, dtype=torch.long), self.positions, decoding=True)
        return bool(probe.all())

    def select(self, mask: Int[Tensor, "batch pos"], decoding: bool) -> Bool[Tensor, "*groups batch pos"]:
        """The positions of a forward (its token `mask`) this plan merges at: `[batch, pos]`, or for a
        per-row plan one such mask per group, stacked `[groups, batch, pos]`."""
        if self.groups:
            return torch.stack([position_mask(mask, g.positions, decoding=decoding) for g in self.groups])
        return position_mask(mask, self.positions, decoding=decoding)

    def source_blocks(self, source_layers: int, *, listed: bool = False) -> int:
        """Blocks each source runs per step: up to the highest merged layer, or all for the ensemble.
        `listed=True` counts every listed layer, alpha 0 included (a vLLM export's depth)."""
        if self.mode == "ensemble":
            return source_layers
        if self.groups:
            deepest = [g.source_blocks(source_layers, listed=True) for g in self.groups]
            return max(deepest, default=0)
        layers = list(self.alphas) if listed else [layer for layer, _ in self.merges]
        if not self.live_sources or not layers:
            return 0
        return max(layers) + (1 if self.site == "post" else 0)

    def load_up_to(self, source_layers: int) -> int | None:
        """The `up_to_layer` a live source is loaded with (None: the whole model): the deepest layer the
        plan lists, alpha 0 included, which `resolve_plan` checks every source holds."""
        listed = [layer for g in self.groups or [self] for layer in g.alphas]
        if self.mode == "ensemble" or not self.live_sources or not listed:
            return None
        return max(listed) if max(listed) < source_layers - 1 else None

    def apply(
        self,
        layer: int,
        site: str,
        hb: Float[Tensor, "batch pos d_model"],
        hs: Sequence[Float[Tensor, "batch pos d_model"]],
        select: Bool[Tensor, "batch pos"] | None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """The base residual `hb` at (layer, site) mixed with the sources' `hs` where `select` is True.

        `hs` holds one residual per source (any device; ignored when the plan steers with `deltas`);
        `select=None` mixes every position. A site or layer the plan does not merge returns `hb` itself.
        A per-row plan takes `select` from `Plan.select` (one mask per group), or None on a decode step
        (every new token of the groups that merge while decoding); each row mixes by its own alpha.
        """
        if self.groups:
            for g, group in enumerate(self.groups):
                if site != group.site or layer not in group.alphas:
                    continue
                if select is None and not group.merges_while_decoding:
                    continue
                hb = group._mix_rows(layer, hb, hs, None if select is None else select[g])
            return hb
        if self.mode != "merge" or site != self.site or layer not in self.alphas:
            return hb
        merged = self.op(hb, self._source(layer, hb, hs), self.alphas[layer], **self.params)
        return merged if select is None else torch.where(select[..., None], merged, hb)

    def _source(
        self, layer: int, hb: Tensor, hs: Sequence[Float[Tensor, "batch pos d_model"]]
    ) -> Float[Tensor, "*sources batch pos d_model"] | Float[Tensor, " d_model"]:
        """What the op mixes `hb` with at `layer`: the plan's steering vector, the sources' residuals
        stacked (a multi-source op), or the one source's, on `hb`'s device."""
        if self.deltas is not None:
            return self.deltas[layer]
        if self.op.multi_source:
            return torch.stack([h.to(hb.device) for h in hs])
        return hs[0].to(hb.device)

    def _mix_rows(
        self,
        layer: int,
        hb: Float[Tensor, "batch pos d_model"],
        hs: Sequence[Float[Tensor, "batch pos d_model"]],
        select: Bool[Tensor, "batch pos"] | None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """One group of a per-row plan at `layer`: each row mixed by its own alpha (`[rows]`, the first
        `batch` entries: a fast engine moves the rows still running to the front), rows at alpha 0 and
        unselected positions left as `hb` bit for bit (whatever the op returns at alpha 0)."""
        alpha = self.alphas[layer][: hb.shape[0]]
        merged = self.op(hb, self._source(layer, hb, hs), alpha[:, None], **self.params)
        keep = (alpha != 0)[:, None]
        keep = keep if select is None else keep & select
        return torch.where(keep[..., None], merged, hb)

    def keep_rows(self, index: Int[Tensor, " keep"]) -> None:
        """Keep the per-row tensors of rows `index` only, moved to the front in place (the fast engine
        drops finished rows; a captured step keeps reading the same buffers)."""
        for group in self.groups:
            for alpha in group.alphas.values():
                alpha[: len(index)] = alpha.index_select(0, index.to(alpha.device))

    def next_logits(
        self,
        logits: Float[Tensor, "batch vocab"],
        source_logits: Float[Tensor, "batch vocab"] | None,
        step: int,
    ) -> Float[Tensor, "batch vocab"]:
        """The logits the next token is chosen from: the logit ensemble's mix at generation `step`, or the
        base's own logits for every other mode."""
        if self.mode != "ensemble":
            return logits
        return mix_logits(logits, source_logits, self.ensemble.weight(step))

    def on_device(self, device: torch.device, dtype: torch.dtype, n_sources: int) -> "Plan":
        """A copy for a fixed-shape (CUDA graph) step: alphas as device scalars of the compute dtype,
        the deltas copied, RegMean weights normalised once on the host. A kept engine writes the next
        run's alphas and deltas into these tensors (`refill`) without a new capture."""
        if self.groups:  # per-row alphas: copies on the device, refilled in place by a kept engine
            return replace(self, groups=[g._rows_on_device(device, dtype, n_sources) for g in self.groups])
        scalar = lambda a: None if a is None else torch.tensor(a, dtype=dtype, device=device)  # noqa: E731
        params = dict(self.params)
        if params.get("weights") is not None:  # checked on the host, once: no sync in the step
            params["weights"] = source_weights(params["weights"], n_sources).to(device)
        return replace(
            self,
            alphas={layer: scalar(a) for layer, a in self.merges},
            deltas=None if self.deltas is None else {k: v.clone() for k, v in self.deltas.items()},
            params=params,
        )

    def _rows_on_device(self, device: torch.device, dtype: torch.dtype, n_sources: int) -> "Plan":
        params = dict(self.params)
        if params.get("weights") is not None:
            params["weights"] = source_weights(params["weights"], n_sources).to(device)
        alphas = {layer: a.to(device=device, dtype=dtype, copy=True) for layer, a in self.alphas.items()}
        deltas = None if self.deltas is None else {k: v.clone() for k, v in self.deltas.items()}
        return replace(self, alphas=alphas, params=params, deltas=deltas)

    def layout(self) -> tuple:
        """What a fixed-shape step of this plan depends on besides its alpha and delta values (which
        `refill` swaps): the mode, op, site, positions, which layers merge, the params."""
        if self.groups:
            return ("rows", *(g.layout() for g in self.groups))
        alphas = tuple((layer, a is None) for layer, a in self.merges) if self.mode == "merge" else ()
        deltas = None if self.deltas is None else tuple((k, tuple(v.shape)) for k, v in self.deltas.items())
        params = tuple(sorted((k, repr(v)) for k, v in self.params.items()))
        op = None if self.op is None else self.op.name
        return (self.mode, op, self.site, repr(self.positions), alphas, deltas, params)

    def refill(self, other: "Plan") -> None:
        """Write `other`'s alphas and deltas (a plan of the same layout) into this `on_device` copy."""
        if self.groups:  # per-row: the new rows' alphas first, zero for rows this run does not have
            for mine, theirs in zip(self.groups, other.groups, strict=True):
                for layer, alpha in mine.alphas.items():
                    new = theirs.alphas[layer]
                    alpha[: len(new)].copy_(new)
                    alpha[len(new) :].zero_()
                mine._refill_deltas(theirs)
            return
        new = dict(other.merges)
        for layer, value in self.alphas.items():
            if value is not None:
                value.fill_(new[layer])
        self._refill_deltas(other)

    def _refill_deltas(self, other: "Plan") -> None:
        if other.deltas is not None:
            for layer, vector in other.deltas.items():
                self.deltas[layer].copy_(vector)


def _is_model(obj: object) -> bool:
    return isinstance(unwrap(obj), nn.Module)


def _source_list(sources: Sources) -> list[Any]:
    if sources is None:
        return []
    if isinstance(sources, (Deltas, str, Path)) or _is_model(sources):
        return [sources]
    if isinstance(sources, Sequence):
        return list(sources)
    raise LatentMergeError(
        f"sources has type {type(sources).__name__}; expected a model, a list of models (RegMean), "
        "Deltas, or None"
    )


def _load_deltas(recipe: Recipe, given: list[Any], spec: OpSpec) -> Deltas:
    if len(given) > 1:
        raise LatentMergeError(f"op {spec.name!r} takes one set of steering deltas, got {len(given)} sources")
    if given:
        d = given[0]
        if isinstance(d, (str, Path)):
            return Deltas.load(d)
        if isinstance(d, Deltas):
            return d
        raise LatentMergeError(
            f"op {spec.name!r} steers with static vectors, but sources is a {type(d).__name__}; pass "
            "lmn.compute_deltas(base, ft, prompts, layers) (a Deltas) or set the recipe's `deltas` file"
        )
    if recipe.deltas is None:
        raise LatentMergeError(
            f"op {spec.name!r} needs steering vectors: pass a Deltas as sources (lmn.compute_deltas(...)) "
            "or set "
            "recipe.deltas to a safetensors file written by Deltas.save"
        )
    return load_recipe_deltas(recipe)


def load_recipe_deltas(recipe: Recipe, device: str | torch.device = "cpu") -> Deltas:
    """The steering vectors of the recipe's `deltas` file (the one place such a file is read)."""
    path = recipe_deltas_path(recipe)
    if not path.exists():
        raise LatentMergeError(
            f"recipe.deltas={recipe.deltas!r} does not exist; expected a file written by Deltas.save"
        )
    return Deltas.load(path, device=device)


def recipe_deltas_path(recipe: Recipe) -> Path:
    """Where a recipe's `deltas` file is. A recipe read from a file (`Recipe.from_file`, a system YAML)
    already names a relative file by its place next to that file (`Recipe.located`)."""
    return Path(recipe.deltas)


def recipe_plan(recipe: Recipe, n_layers: int, *, positions: Positions | None = None) -> Plan:
    """A recipe's merge resolved for a model of `n_layers` blocks: op, alphas per layer, site, positions
    (the recipe's, or `positions` when it gives none: the analysis evaluators mix every token), params.
    No sources are checked and no deltas loaded (`resolve_plan` does both for generation).

    RegMean's lambda is resolved here, once: its layers get the alpha `beta = 1/(1+lambda)`
    (`ops.regmean_beta`) and `lam` leaves the params, so every executor reads the plan's alphas."""
    chosen = recipe.positions if recipe.positions is not None else positions
    op, alphas, params = get_op(recipe.op), recipe.layer_alphas(n_layers), recipe.op_params()
    if op.name == "regmean" and "lam" in params:
        beta = regmean_beta(params.pop("lam"))
        alphas = {layer: beta if a is None else a for layer, a in alphas.items()}
    return Plan(
        mode="merge",
        op=op,
        alphas=alphas,
        site=recipe.site,
        positions=check_positions(chosen if chosen is not None else recipe.resolved_positions()),
        params=params,
        allow_extrapolation=recipe.allow_extrapolation,
        recipe=recipe,
    )


def rows_plan(recipes: Sequence[Recipe | None], n_layers: int, *, positions: Positions | None = None) -> Plan:
    """Per-row recipes (one per prompt; None: that row is the base alone) as one plan for a model of
    `n_layers` blocks (`positions`: for rows whose recipe gives none, as in `recipe_plan`).

    One group per distinct (op, site, positions, params), its alphas `[rows]` float64 tensors (0 where
    a row does not merge). Rows may differ in op, layers, alphas, site and positions; they share the
    sources, so the rows take live sources alike (naming the same `sources`) or all steer with `delta`
    (naming the same `deltas` file; `resolve_plan` fills each group's vectors); no Ensemble. The plan's
    mode is "base" when no row merges. Executors: `Plan.sites` (where to mix, in forward order),
    `Plan.select` (per-group position masks), `Plan.apply`, `merge.apply_plan`."""
    rows = len(recipes)
    if rows == 0:
        raise LatentMergeError("recipe=[] is empty; expected one recipe (or None) per prompt")
    plans: list[Plan | None] = []
    for i, recipe in enumerate(recipes):
        if recipe is None:
            plans.append(None)
            continue
        if not isinstance(recipe, Recipe):
            raise LatentMergeError(
                f"recipe[{i}] has type {type(recipe).__name__}; per-row recipes are lmn.Recipe objects "
                "(or None for the base alone); a logit ensemble runs one recipe per call"
            )
        plans.append(recipe_plan(recipe, n_layers, positions=positions))
    _check_rows_share_sources(recipes, plans)
    groups: dict[tuple, list[tuple[int, Plan]]] = {}
    for i, plan in enumerate(plans):
        if plan is not None:
            key = (plan.op.name, plan.site, repr(plan.positions), repr(sorted(plan.params.items())))
            groups.setdefault(key, []).append((i, plan))
    if not groups:
        return Plan(mode="base", recipe=list(recipes))
    out = []
    for members in groups.values():
        first = members[0][1]
        layers = sorted({layer for _, plan in members for layer in plan.alphas})
        alphas = {layer: torch.zeros(rows, dtype=torch.float64) for layer in layers}
        for i, plan in members:
            for layer, a in row_alphas(plan).items():
                alphas[layer][i] = a
        out.append(replace(first, alphas=alphas, recipe=None))
    return Plan(mode="merge", recipe=list(recipes), groups=out)


def _check_rows_share_sources(recipes: Sequence[Recipe | None], plans: Sequence[Plan | None]) -> None:
    """Per-row recipes run on one call's sources: all live-source ops naming the same `sources`, or all
    `delta` naming the same `deltas` file."""
    rows = [(i, r, p) for i, (r, p) in enumerate(zip(recipes, plans, strict=True)) if p is not None]
    live = [(i, r) for i, r, p in rows if p.live_sources]
    static = [(i, r) for i, r, p in rows if not p.live_sources]
    if live and static:
        (i, steer), (j, mix) = static[0], live[0]
        raise LatentMergeError(
            f"recipe[{i}] has op {steer.op!r}, which steers with static vectors, and recipe[{j}] has op "
            f"{mix.op!r}, which mixes live source models; per-row recipes share the call's sources, so "
            f"the rows are all live-source ops (lerp, slerp, regmean, ...) or all {steer.op!r}: run the "
            f"{steer.op!r} rows in a call of their own"
        )
    named = {tuple(r.sources) for _, r in live if r.sources is not None}
    if len(named) > 1:
        raise LatentMergeError(
            f"recipe rows name different sources {sorted(named)}; per-row recipes share the sources of "
            "one call: run rows with other sources in a call of their own"
        )
    files = {str(r.deltas) for _, r in static if r.deltas is not None}
    if len(files) > 1:
        raise LatentMergeError(
            f"recipe rows name different deltas files {sorted(files)}; per-row 'delta' recipes share one "
            "set of steering vectors: run rows with other deltas in a call of their own"
        )


def row_alphas(plan: Plan) -> dict[int, float]:
    """A one-recipe plan's alphas with the op's own default for None (1 for a steering `delta`, 0.5 for
    the live ops), as a per-row plan or a vLLM request carries them."""
    default = 1.0 if plan.op.static_source else 0.5
    return {layer: default if a is None else a for layer, a in plan.alphas.items()}


def merge_plan(
    op: OpSpec,
    alphas: dict[int, float | None],
    *,
    site: str = "pre",
    positions: Positions = "last",
    params: dict[str, Any] | None = None,
    allow_extrapolation: bool = False,
) -> Plan:
    """A merge `Plan` from parts already checked (how `merge_into` mixes one layer in a trace)."""
    return Plan(
        mode="merge",
        op=op,
        alphas=dict(alphas),
        site=site,  # type: ignore[arg-type]
        positions=positions,
        params=dict(params or {}),
        allow_extrapolation=allow_extrapolation,
    )


def resolve_plan(
    base: Model, sources: Sources, recipe: RecipeLike, *, weights_on_disk: bool = False
) -> tuple[Plan, list[Any]]:
    """Check `(base, sources, recipe)` and return the plan and the source models to run with the base.

    `recipe=None`, or `sources=None` with a recipe that needs live sources, means the base alone.
    `weights_on_disk=True`: the engine reads each model whole from where it was loaded (vLLM), so layers
    are checked against each model's full depth, not the blocks held here (a CPU shell holds one).
    """
    if not _is_model(base):
        raise LatentMergeError(
            f"base has type {type(base).__name__}; expected a model from lmn.load or lmn.wrap"
        )
    given = _source_list(sources)
    if recipe is None:
        return Plan(mode="base", recipe=None), []
    if isinstance(recipe, Ensemble):
        return _ensemble_plan(base, given, recipe, weights_on_disk)
    if isinstance(recipe, (list, tuple)):
        plan = rows_plan(recipe, _depth(base, weights_on_disk))
        if plan.mode != "base" and not plan.live_sources:  # `delta` rows: each group's vectors
            steer = next(r for r in recipe if r is not None)
            deltas = _load_deltas(steer, given, plan.groups[0].op)
            for group in plan.groups:
                group.deltas = _delta_vectors(base, deltas, group.site, list(group.alphas))
            return plan, []
        if plan.mode == "base" or not given:
            return Plan(mode="base", recipe=list(recipe)), []
        for group in plan.groups:
            _check_sources(base, given, group.op, group, weights_on_disk)
        return plan, given
    if not isinstance(recipe, Recipe):
        raise LatentMergeError(
            f"recipe has type {type(recipe).__name__}; expected an lmn.Recipe, an Ensemble, a list of "
            "recipes (one per prompt), or None (base alone)"
        )
    plan = recipe_plan(recipe, _depth(base, weights_on_disk))
    spec, alphas = plan.op, plan.alphas
    if spec.static_source:
        plan.deltas = _delta_vectors(base, _load_deltas(recipe, given, spec), recipe.site, list(alphas))
        return plan, []
    if not given:
        return Plan(mode="base", recipe=recipe), []
    _check_sources(base, given, spec, plan, weights_on_disk)
    return plan, given


def _depth(model: Model, weights_on_disk: bool) -> int:
    info = model_info(model)
    return info.full_n_layers if weights_on_disk else info.n_layers


def _ensemble_plan(
    base: Model, given: list[Any], ensemble: Ensemble, weights_on_disk: bool
) -> tuple[Plan, list[Any]]:
    models = [s for s in given if _is_model(s)]
    if len(given) != 1 or len(models) != 1:
        raise LatentMergeError(f"the logit ensemble needs exactly one source model, got {len(given)} sources")
    src = models[0]
    check_compatible(base, src)
    info = model_info(src)
    if info.truncated and not weights_on_disk:
        raise LatentMergeError(
            f"the logit ensemble needs the whole source model, but {info.name} was loaded with only "
            f"{info.n_layers} of {info.full_n_layers} layers; load it without up_to_layer"
        )
    return Plan(mode="ensemble", ensemble=ensemble, recipe=ensemble), [src]


def _delta_vectors(base: Model, deltas: Deltas, site: str, layers: list[int]) -> dict[int, Tensor]:
    """The steering vector of each recipe layer, checked and on the base's device."""
    if deltas.site != site:
        raise LatentMergeError(
            f"the deltas were computed at site={deltas.site!r} but the recipe merges at site={site!r}"
        )
    hidden = hf_module(base).config.hidden_size
    device = device_of(base)
    vectors = {}
    for layer in layers:
        v = deltas.resid(layer, site)
        if v.shape[-1] != hidden:
            raise LatentMergeError(
                f"delta for layer {layer} has size {v.shape[-1]}; the base's hidden size is {hidden}"
            )
        vectors[layer] = v.to(device)
    return vectors


def check_source_count(spec: OpSpec, plan: Plan, n: int, got: str) -> None:
    """As many sources as the op takes, and one recipe weight per source (`got` shows the user's sources)."""
    if n > 1 and not spec.multi_source:
        raise LatentMergeError(
            f"op {spec.name!r} takes one source, got {got}; use a multi-source op such as 'regmean'"
        )
    weights = plan.params.get("weights")
    if weights is not None and len(weights) != n:
        raise LatentMergeError(f"recipe weights has {len(weights)} entries for {n} sources; expected {n}")


def _check_sources(base: Model, given: list[Any], spec: OpSpec, plan: Plan, weights_on_disk: bool) -> None:
    """Live sources: models, as many as the op takes, compatible, and deep enough for every layer."""
    bad = [type(s).__name__ for s in given if not _is_model(s)]
    if bad:
        raise LatentMergeError(f"sources must be models for op {spec.name!r}; got {bad}")
    check_source_count(spec, plan, len(given), str(len(given)))
    alphas = plan.alphas
    for i, src in enumerate(given):
        check_compatible(base, src)
        info = model_info(src)
        if weights_on_disk:
            continue  # the engine checks the whole model's depth on disk (vllm_engine.export)
        for layer in alphas:
            if layer >= info.n_layers:
                loaded = (
                    f"loaded only up to layer {info.n_layers - 1}"
                    if info.truncated
                    else f"{info.n_layers} layers"
                )
                raise LatentMergeError(
                    f"recipe layer {layer} is past source[{i}] {info.name} ({loaded}); expected layers < "
                    f"{info.n_layers}, or load the source with up_to_layer >= {max(alphas)}",
                    param="layers",
                    value=layer,
                    expected=f"layers < {info.n_layers}",
                )


def device_of(model: Model) -> torch.device:
    """The device of the model's first parameter."""
    return next(hf_module(model).parameters()).device
