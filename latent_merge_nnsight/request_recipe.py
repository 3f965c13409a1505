"""A request's own recipe: vLLM's per-request protocol (`latent_merge`), checked against what it varies.

    {"alpha": 0.3}                    one alpha at every layer the served recipe merges
    {"layers": {"20": 0.5}}           some of those layers (the others get alpha 0: the base there)
    {"alpha": 0.3, "op": "lerp"}      another op of the same kind (live-source ops; `delta` for steering)
    {"merge_from": 12}                an echoed prompt's merge starts at token 12 (prompt logprobs)

`check_request` checks what needs nothing served (keys, types, the op's name); `resolve_request` checks
a value against the served recipe (its layers, the alpha range of the op, the op's kind and the source
count) and gives a `RequestRecipe`. `vllm serve` checks against its export (`vllm_engine.requests`),
`lmn serve` against its system (`systems.loaded.LoadedSystem.request_recipe`, which turns it into the
system's `Recipe` with the request's op and alphas: `as_recipe`). No vLLM and no models here.
"""

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.ops import check_alpha, get_op
from latent_merge_nnsight.recipe import Recipe

__all__ = ["KEY", "RequestRecipe", "as_recipe", "check_request", "resolve_request"]

KEY = "latent_merge"
"""The request argument (and `SamplingParams.extra_args` key) of a per-request recipe."""


@dataclass(frozen=True)
class RequestRecipe:
    """A request's recipe resolved against the served recipe: the op and an alpha for every served layer."""

    op: str
    alphas: tuple[tuple[int, float], ...]  # empty: the served alphas (a request with merge_from alone)
    merge_from: int | None = None  # the first merged position (None: the served positions)
    allow_extrapolation: bool = False  # alphas outside [0, 1] were allowed (by the request or the recipe)

    def key(self) -> str:
        return json.dumps([self.op, list(self.alphas), self.merge_from])


def _raw(value: object) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise LatentMergeError(
                f"{KEY}: not valid JSON ({e.msg}); expected a mapping such as {{'alpha': 0.3}}"
            ) from None
    if not isinstance(value, Mapping):
        raise LatentMergeError(
            f"{KEY} has type {type(value).__name__}; expected a mapping such as {{'alpha': 0.3}}"
        )
    unknown = sorted(set(value) - {"alpha", "alphas", "layers", "op", "allow_extrapolation", "merge_from"})
    if unknown:
        raise LatentMergeError(
            f"{KEY}: unknown keys {unknown}; expected some of alpha, layers (or alphas), op, "
            "allow_extrapolation, merge_from"
        )
    return dict(value)


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LatentMergeError(f"{KEY}.{what}={value!r} must be a finite number")
    return float(value)


def check_request(value: object) -> dict[str, Any]:
    """The checks that need nothing served (`resolve_request` runs these first): keys, types, op name."""
    raw = _raw(value)
    if "alpha" in raw and ("layers" in raw or "alphas" in raw):
        raise LatentMergeError(f"{KEY}: give alpha (every merged layer) or layers, not both")
    if "layers" in raw and "alphas" in raw:
        raise LatentMergeError(f"{KEY}: give layers or alphas (the same thing), not both")
    mapping = raw.get("layers", raw.get("alphas"))
    if mapping is not None:
        if not isinstance(mapping, Mapping) or not mapping:
            raise LatentMergeError(f"{KEY}.layers={mapping!r}; expected a non-empty mapping layer -> alpha")
        out = {}
        for k, a in mapping.items():
            try:
                layer = int(k)
            except (TypeError, ValueError):
                raise LatentMergeError(f"{KEY}.layers has key {k!r}; expected layer numbers") from None
            out[layer] = _number(a, f"layers[{layer}]")
        raw["layers"] = out
        raw.pop("alphas", None)
    elif "alpha" in raw:
        raw["alpha"] = _number(raw["alpha"], "alpha")
    elif "merge_from" not in raw or "op" in raw:
        raise LatentMergeError(f"{KEY}: give alpha (every merged layer) or layers {{layer: alpha}}")
    start = raw.get("merge_from")
    if start is not None and (isinstance(start, bool) or not isinstance(start, int) or start < 0):
        raise LatentMergeError(f"{KEY}.merge_from={start!r}; expected a token index >= 0")
    if "op" in raw:
        get_op(raw["op"])  # unknown op: names the registered ones
    if not isinstance(raw.get("allow_extrapolation", False), bool):
        raise LatentMergeError(f"{KEY}.allow_extrapolation must be true or false")
    return raw


_WORDS = {
    "export": ("export", "exported", "this export merges"),
    "system": ("system", "merged by this system", "this system merges"),
}


def resolve_request(
    value: object,
    recipe: Mapping[str, Any] | None,
    layers: Sequence[int],
    n_sources: int,
    *,
    holder: str = "export",
) -> RequestRecipe:
    """A request's `latent_merge` value checked against the served ``recipe`` (its `Recipe.to_dict`, None
    for the base alone), the ``layers`` it merges and its ``n_sources``; errors call the server's
    recipe an ``holder`` ("export" for vLLM, "system" for `lmn serve`)."""
    noun, not_served, serves = _WORDS[holder]
    raw = check_request(value)
    if recipe is None:
        raise LatentMergeError(f"{KEY}: this {noun} runs the base alone; it has no merge to set alphas for")
    served = get_op(recipe["op"])
    spec = get_op(raw.get("op", served.name))
    if spec.static_source != served.static_source:
        kind = f"steering (delta) {noun}" if served.static_source else f"live-source {noun}"
        raise LatentMergeError(
            f"{KEY}.op={spec.name!r} cannot run on this {kind} (its op is {served.name!r})"
        )
    if n_sources > 1 and not spec.multi_source:
        raise LatentMergeError(
            f"{KEY}.op={spec.name!r} takes one source; this {noun} has {n_sources} (use regmean)"
        )
    extrapolate = raw.get("allow_extrapolation", False) or bool(recipe.get("allow_extrapolation"))
    if "layers" not in raw and "alpha" not in raw:  # merge_from alone: the served alphas and op
        return RequestRecipe(served.name, (), raw.get("merge_from"), extrapolate)
    if "layers" in raw:
        bad = sorted(set(raw["layers"]) - set(layers))
        if bad:
            raise LatentMergeError(f"{KEY}.layers {bad} are not {not_served}; {serves} layers {list(layers)}")
        alphas = {layer: raw["layers"].get(layer, 0.0) for layer in layers}
    else:
        alphas = dict.fromkeys(layers, raw["alpha"])
    hint = f'add "allow_extrapolation": true to the request\'s {KEY} value'  # what a request can carry
    for layer, a in alphas.items():
        check_alpha(
            a, spec, allow_extrapolation=extrapolate, what=f"{KEY}.layers[{layer}]", extrapolate_hint=hint
        )
    return RequestRecipe(spec.name, tuple(sorted(alphas.items())), raw.get("merge_from"), extrapolate)


def as_recipe(request: RequestRecipe, recipe: Recipe) -> Recipe | None:
    """The served ``recipe`` with the request's op and alphas (its site, positions and op parameters
    kept; RegMean's lambda gives way to the request's alphas), or None when the request sets neither
    (``merge_from`` alone)."""
    if not request.alphas:
        return None
    fields = recipe.to_dict()
    for name in ("alpha", "lambda", "name"):
        fields.pop(name, None)
    if "weights" not in get_op(request.op).params:
        fields.pop("weights", None)
    fields.update(op=request.op, layers=dict(request.alphas), allow_extrapolation=request.allow_extrapolation)
    return Recipe.model_validate(fields)
