"""`merge_into`: mix a source's residual state into the traced model's residual stream.

Called inside `with base.trace(...)` (or a generation trace); the model is found from the active trace.
Everything is checked before the residual is read, so a bad call leaves the forward untouched.
"""

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor

from latent_merge_nnsight._nnsight import invoke_rows
from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.models import active_model, last_inputs, last_past_length, model_info
from latent_merge_nnsight.nouns import Model
from latent_merge_nnsight.ops import OpSpec, check_alpha, get_op
from latent_merge_nnsight.plan import Plan, merge_plan
from latent_merge_nnsight.positions import Positions, check_positions
from latent_merge_nnsight.residuals import Capture
from latent_merge_nnsight.sites import Site, check_layer, check_site, get_layers, read_resid, write_resid

__all__ = ["ResidSource", "apply_plan", "merge_into"]


@runtime_checkable
class ResidSource(Protocol):
    """Anything that can hand over a residual state for (layer, site): a `Capture`, `Deltas`, a live pair."""

    def resid(self, layer: int, site: Site) -> Tensor: ...


def _source_tensor(source: object, layer: int, site: Site, index: str) -> Tensor:
    if isinstance(source, Tensor):
        return source
    if isinstance(source, ResidSource):
        return source.resid(layer, site)
    raise LatentMergeError(
        f"source{index} has type {type(source).__name__}; expected a Capture, a tensor, Deltas, "
        "or a list of them for a multi-source op"
    )


def _current_mask(model: Model, hidden: Tensor, sources: list[Any]) -> tuple[Tensor, bool, Tensor | None]:
    """This forward's token mask `[batch, pos]`, whether it is a decode step, and its ids."""
    batch, pos = hidden.shape[:2]
    recorded = last_inputs(model)
    ids = mask = None
    if recorded is not None:
        ids, mask = recorded
        if ids is not None and ids.shape[0] != batch:  # inside one invoke of several: take its rows
            group = invoke_rows("merge_into")
            if group is not None:
                start, size = group
                ids = ids[start : start + size]
                mask = None if mask is None else mask[start : start + size]
    if mask is None:
        capture = next((s for s in sources if isinstance(s, Capture)), None)
        if capture is not None and capture.attention_mask.shape == (batch, pos):
            mask = capture.attention_mask
        else:
            mask = torch.ones(batch, pos, dtype=torch.long, device=hidden.device)
    # a decode step extends a KV cache; HF generate drops an all-ones mask, so ask the cache too
    decoding = mask.shape[-1] > pos or last_past_length(model) > 0
    return mask[:, -pos:].to(hidden.device), decoding, ids


def _check_capture_tokens(capture: Capture, ids: Tensor | None, decoding: bool, index: str) -> None:
    if decoding:
        raise LatentMergeError(
            f"source{index} is a Capture of a prompt, but this forward is a decoding step with a KV cache; "
            "use lmn.generate (or lmn.pair) for merges while generating"
        )
    if ids is None:
        return
    if tuple(ids.shape) != tuple(capture.input_ids.shape) or not torch.equal(
        ids.to(capture.input_ids.device), capture.input_ids
    ):
        raise LatentMergeError(
            f"source{index} was captured on different tokens than this forward: capture ids "
            f"{tuple(capture.input_ids.shape)}, base ids {tuple(ids.shape)}; capture and trace the same "
            "prompts with the same padding side"
        )


def merge_into(
    layer: int,
    source: "ResidSource | Tensor | Sequence[ResidSource | Tensor]",
    op: "str | OpSpec" = "slerp",
    alpha: float | None = None,
    *,
    positions: Positions | None = None,
    site: Site = "pre",
    model: Model | None = None,
    allow_extrapolation: bool = False,
    **params: object,
) -> Float[Tensor, "batch pos d_model"] | None:
    """Merge `source` into the residual stream of the traced model at `layer`.

    Arguments:
        layer: decoder block L; the residual entering it (`site="pre"`, HF `hidden_states[L]`) or leaving
            it (`site="post"`). Must be in `[0, n_layers)`.
        source: a `Capture` (of the same prompts), a tensor `[batch, pos, d_model]` (or a vector `[d_model]`
            for steering ops), `Deltas`, or a list of these for a multi-source op (RegMean).
        op: a registered op name (`lerp`, `slerp`, `regmean`, `delta`, or one of yours).
        alpha: weight of the source side: 0 leaves the base bit-identical, 1 takes the source. Defaults to
            0.5 (1.0 for `delta`). Must lie in [0, 1] unless `allow_extrapolation=True`. A list gives one
            alpha per row of the batch (a per-row plan: each row mixed by its own, rows at 0 untouched).
        positions: "last" (default for most ops), "all" (default for `delta`), real-token indices, a slice,
            or a boolean mask; see `lmn.positions`. Pad positions are never mixed.
        model: the traced model; found from the active trace when omitted.
        params: op parameters (RegMean's `weights`, `lam`).

    Returns the merged residual (the base residual when nothing was mixed).
    """
    spec = get_op(op)
    check_site(site)
    if model is None:
        model = active_model()
    info = model_info(model)
    check_layer(layer, info.n_layers, model_name=info.name)
    per_row = isinstance(alpha, (list, tuple))
    for i, a in enumerate(alpha if per_row else [alpha]):
        check_alpha(
            a, spec, allow_extrapolation=allow_extrapolation, what=f"alpha[{i}]" if per_row else "alpha"
        )
    if per_row and (not alpha or spec.static_source or any(a is None for a in alpha)):
        raise LatentMergeError(
            f"alpha={alpha!r}: per-row alphas are numbers, one per row, for a live-source op "
            f"(op {spec.name!r})"
        )
    positions = check_positions(positions if positions is not None else spec.default_positions)
    unknown = sorted(set(params) - set(spec.params))
    if unknown:
        raise LatentMergeError(
            f"op {spec.name!r} takes no parameter(s) {unknown}; "
            f"its parameters are {list(spec.params) or 'none'}"
        )
    if spec.multi_source:
        sources = list(source) if isinstance(source, (list, tuple)) else [source]
        if not sources:
            raise LatentMergeError(f"source=[] is empty; op {spec.name!r} needs at least one source")
    else:
        if isinstance(source, (list, tuple)):
            raise LatentMergeError(
                f"op {spec.name!r} takes one source, got a list of {len(source)}; use a multi-source op "
                "such as 'regmean' to combine several"
            )
        sources = [source]
    plan = merge_plan(
        spec,
        {layer: torch.tensor(alpha, dtype=torch.float64) if per_row else alpha},
        site=site,
        positions=positions,
        params=params,
        allow_extrapolation=allow_extrapolation,
    )
    if per_row:
        plan = Plan(mode="merge", groups=[plan])
    return apply_plan(plan, layer, sources, model)


def apply_plan(
    plan: Plan, layer: int, sources: list[Any], model: Model, site: Site | None = None
) -> Float[Tensor, "batch pos d_model"]:
    """Mix `sources` into the traced `model` at (`layer`, `site`) as `plan` says (everything already
    checked); `site` defaults to the plan's (a per-row plan names it: `Plan.sites`).

    Reads the residual at the plan's site, finds this forward's real tokens, mixes with `Plan.apply`
    where the plan's positions select them, and writes the result back. `merge_into` (one call in a
    trace) and the nnsight engine (every merged layer of every step) both end here. `sources` are
    `ResidSource`s or tensors, one per source; none when the plan steers with its own deltas.
    """
    site = plan.site if site is None else site
    multi = any(p.op.multi_source for p in plan.groups or [plan])
    index = lambda i: f"[{i}]" if multi else ""  # noqa: E731
    tensors = [_source_tensor(s, layer, site, index(i)) for i, s in enumerate(sources)]
    block = get_layers(model)[layer]
    hidden = read_resid(block, site)
    mask, decoding, ids = _current_mask(model, hidden, sources)
    for i, s in enumerate(sources):
        if isinstance(s, Capture):
            _check_capture_tokens(s, ids, decoding, index(i))
    static = any(p.op.static_source for p in plan.groups or [plan])
    for i, t in enumerate(tensors):
        if not (t.shape == hidden.shape if not static else t.shape[-1] == hidden.shape[-1]):
            raise LatentMergeError(
                f"source{index(i)} has shape {tuple(t.shape)} at layer {layer}; expected "
                f"{tuple(hidden.shape)} like the base residual"
                + (" (or a [d_model] vector)" if static else "")
            )
    for group in plan.groups:
        rows = {len(a) for a in group.alphas.values()}
        if rows != {hidden.shape[0]}:
            raise LatentMergeError(
                f"alpha has {sorted(rows)} per-row values for a batch of {hidden.shape[0]} rows at layer "
                f"{layer}; expected one alpha per row"
            )
    select = plan.select(mask, decoding)
    if (not plan.groups and plan.alphas[layer] == 0) or not bool(select.any()):
        return hidden
    new = plan.apply(layer, site, hidden, tensors, select)
    write_resid(block, site, new)
    return new
