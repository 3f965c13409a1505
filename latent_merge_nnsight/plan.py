"""`Plan`: what one generation run does, resolved and checked before any forward.

`resolve_plan(base, sources, recipe)` turns the user's `(sources, recipe)` into a `Plan` and the list
of source models, checking everything that can be checked without running a model: the op and its
parameters, layers against the base and against each source (a source loaded `up_to_layer` has fewer
blocks), model compatibility, and the steering deltas. Both engines then run the same plan.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from latent_merge_nnsight.ensemble import Ensemble
from latent_merge_nnsight.deltas import Deltas
from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.models import check_compatible, hf_module, model_info
from latent_merge_nnsight.ops import OpSpec, get_op
from latent_merge_nnsight.positions import Positions, check_positions
from latent_merge_nnsight.recipe import Recipe

__all__ = ["Plan", "resolve_plan"]

Mode = Literal["base", "merge", "ensemble"]


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
        recipe: what the user passed, for the result's record.
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
    recipe: Any = None

    @property
    def merges(self) -> list[tuple[int, float | None]]:
        """(layer, alpha) in execution order, without the no-op alpha=0 layers."""
        return [(layer, a) for layer, a in sorted(self.alphas.items()) if a != 0]

    @property
    def live_sources(self) -> bool:
        """Whether source models run alongside the base."""
        return self.mode == "ensemble" or (
            self.mode == "merge" and self.op is not None and not self.op.static_source
        )

    def source_blocks(self, source_layers: int) -> int:
        """Blocks each source runs per step: up to the highest merged layer, or all for the ensemble."""
        if self.mode == "ensemble":
            return source_layers
        if not self.live_sources or not self.merges:
            return 0
        return max(layer for layer, _ in self.merges) + (1 if self.site == "post" else 0)


def _is_model(obj: Any) -> bool:
    return isinstance(getattr(obj, "_module", obj), nn.Module)


def _source_list(sources: Any) -> list[Any]:
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
    path = Path(recipe.deltas)
    if not path.exists():
        raise LatentMergeError(
            f"recipe.deltas={recipe.deltas!r} does not exist; expected a file written by Deltas.save"
        )
    return Deltas.load(path)


def resolve_plan(base: Any, sources: Any, recipe: Any) -> tuple[Plan, list[Any]]:
    """Check `(base, sources, recipe)` and return the plan and the source models to run with the base.

    `recipe=None`, or `sources=None` with a recipe that needs live sources, means the base alone.
    """
    if not _is_model(base):
        raise LatentMergeError(
            f"base has type {type(base).__name__}; expected a model from lmn.load or lmn.wrap"
        )
    given = _source_list(sources)
    if recipe is None:
        return Plan(mode="base", recipe=None), []
    if isinstance(recipe, Ensemble):
        models = [s for s in given if _is_model(s)]
        if len(given) != 1 or len(models) != 1:
            raise LatentMergeError(
                f"the logit ensemble needs exactly one source model, got {len(given)} sources"
            )
        src = models[0]
        check_compatible(base, src)
        info = model_info(src)
        if info.truncated:
            raise LatentMergeError(
                f"the logit ensemble needs the whole source model, but {info.name} was loaded with only "
                f"{info.n_layers} of {info.full_n_layers} layers; load it without up_to_layer"
            )
        return Plan(mode="ensemble", ensemble=recipe, recipe=recipe), [src]
    if not isinstance(recipe, Recipe):
        raise LatentMergeError(
            f"recipe has type {type(recipe).__name__}; expected an lmn.Recipe, an Ensemble, "
            "or None (base alone)"
        )

    spec = get_op(recipe.op)
    base_info = model_info(base)
    alphas = recipe.layer_alphas(base_info.n_layers)
    positions = check_positions(recipe.resolved_positions())
    params = recipe.op_params()
    plan = Plan(
        mode="merge",
        op=spec,
        alphas=alphas,
        site=recipe.site,
        positions=positions,
        params=params,
        allow_extrapolation=recipe.allow_extrapolation,
        recipe=recipe,
    )
    if spec.static_source:
        deltas = _load_deltas(recipe, given, spec)
        if deltas.site != recipe.site:
            raise LatentMergeError(
                f"the deltas were computed at site={deltas.site!r} but the recipe merges at "
                f"site={recipe.site!r}"
            )
        hidden = hf_module(base).config.hidden_size
        device = next(hf_module(base).parameters()).device
        vectors = {}
        for layer in alphas:
            v = deltas.resid(layer, recipe.site)
            if v.shape[-1] != hidden:
                raise LatentMergeError(
                    f"delta for layer {layer} has size {v.shape[-1]}; the base's hidden size is {hidden}"
                )
            vectors[layer] = v.to(device)
        plan.deltas = vectors
        return plan, []

    if not given:
        return Plan(mode="base", recipe=recipe), []
    bad = [type(s).__name__ for s in given if not _is_model(s)]
    if bad:
        raise LatentMergeError(f"sources must be models for op {spec.name!r}; got {bad}")
    if len(given) > 1 and not spec.multi_source:
        raise LatentMergeError(
            f"op {spec.name!r} takes one source, got {len(given)}; use a multi-source op such as 'regmean'"
        )
    weights = params.get("weights")
    if weights is not None and len(weights) != len(given):
        raise LatentMergeError(
            f"recipe weights has {len(weights)} entries for {len(given)} sources; expected {len(given)}"
        )
    for i, src in enumerate(given):
        check_compatible(base, src)
        info = model_info(src)
        for layer in alphas:
            if layer >= info.n_layers:
                loaded = (
                    f"loaded only up to layer {info.n_layers - 1}"
                    if info.truncated
                    else f"{info.n_layers} layers"
                )
                raise LatentMergeError(
                    f"recipe layer {layer} is past source[{i}] {info.name} ({loaded}); expected layers < "
                    f"{info.n_layers}, or load the source with up_to_layer >= {max(alphas)}"
                )
    return plan, given


def device_of(model: Any) -> torch.device:
    return next(hf_module(model).parameters()).device
