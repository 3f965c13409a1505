"""`NormProbe`: what a merge sees while it generates, measured through the public op registry.

While it records, the probe registers a twin of a recipe's op under the op's own name (`lmn.register_op`
with `overwrite=True`, same function, flags and params; the original is put back after) that records, at
each merged position, `|h_source| / |h_base|` and the weight the merge gives the source side, then
returns exactly what the op returns. So the generated tokens are those of the plain op, and the
measurement works with any engine that calls the registered op.

**Effective ensemble weight.** Merged at the last block's output (site `post`), the state goes straight
into the base's final RMSNorm and LM head, which are linear up to the norm's scale. A merge that returns
`c_b * u + c_s * v` (unit directions `u = h_b/|h_b|`, `v = h_s/|h_s|`, any positive scale) therefore gives
logits proportional to `c_b * logits(h_b) + c_s * logits(h_s)`: a per-token logit ensemble of the base and
of the source's state read through the base's head, with weight `w = c_s / (c_b + c_s)` on the source. For
lerp `c_b = (1-a)|h_b|`, `c_s = a|h_s|`; for slerp `c_b = sin((1-a)t)/sin(t)`, `c_s = sin(a t)/sin(t)`
(`t` the angle; the linear blend below 1e-3 rad); one-source RegMean is lerp at `a = beta`.

**Per-row passes.** Recording a list of per-row recipes (`lmn.generate(recipe=[...])`), each call of an
op is attributed by where it runs (its place in the forward's order of (site, layer) merges, from the
plan) and, per row, by the row's alpha there: measurements are kept per (op, site, layer, alpha), and a
recipe's summary gathers its own. So the rows' recipes must not share an (op, site, layer, alpha)
(`NormProbe.keys` tells which they use), whatever order the engine keeps its running rows in.
"""

import contextlib
import functools
import inspect
import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping

import torch
from jaxtyping import Float
from torch import Tensor

from latent_merge_nnsight.ops import SMALL_ANGLE, OpSpec, get_op, register_op
from latent_merge_nnsight.plan import Plan, recipe_plan, rows_plan
from latent_merge_nnsight.recipe import Recipe

__all__ = ["NormProbe"]

PROBED = ("lerp", "slerp", "regmean")
"""Ops whose source side is a live hidden state (delta's is a fixed vector: no norm ratio)."""

Key = tuple[str, str, int, float]
"""(op, site, layer, alpha rounded to 6 decimals): where and how strongly a merge mixed."""


def _source_weight(
    op: str, hb: Float[Tensor, "rows d"], hs: Float[Tensor, "rows d"], a: Float[Tensor, " rows"]
) -> Float[Tensor, " rows"]:
    """Per row: the source's share `c_s / (c_b + c_s)` of the merged direction (see the module docstring)."""
    nb, ns = hb.norm(dim=-1), hs.norm(dim=-1)
    if op == "slerp":
        cos = (hb * hs).sum(-1) / (nb * ns).clamp_min(1e-9)
        theta = torch.acos(cos.clamp(-1.0, 1.0))
        small = theta < SMALL_ANGLE
        sin = torch.sin(theta).clamp_min(1e-12)
        cb = torch.where(small, 1 - a, torch.sin((1 - a) * theta) / sin)
        cs = torch.where(small, a, torch.sin(a * theta) / sin)
    else:
        cb, cs = (1 - a) * nb, a * ns
    return cs / (cb + cs).clamp_min(1e-12)


def _probed(recipe: object) -> bool:
    return isinstance(recipe, Recipe) and recipe.op in PROBED and recipe.resolved_positions() == "last"


def _rounded(a: float) -> float:
    return round(float(a), 6)


class NormProbe:
    """Record norm ratios and effective source weights of the merges recipes make while generating.

    Usage:
        probe = NormProbe()
        with probe.recording(recipe, n_layers):          # or a list of per-row recipes
            out = lmn.generate(base, ft, prompts, recipe, ...)
        probe.summary(recipe)   # {"norm_ratio": mean over merged layers, "source_weight": {layer: mean}}
        probe.reset()

    Only positions `"last"` recipes are measured exactly: the probe reads the last column of each call,
    which is each row's merged token (the engines left-align prompts; a decode step has one column).
    A list with any other recipe (another op, other positions, None) records nothing.
    """

    def __init__(self) -> None:
        self._order: dict[str, list[tuple[str, int]]] = {}
        self._n_layers = 0
        self.reset()

    def reset(self) -> None:
        self._sums: dict[Key, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])  # ratio, weight, count
        self._calls: dict[str, int] = defaultdict(int)

    @staticmethod
    def keys(recipe: Recipe, n_layers: int) -> set[Key]:
        """The (op, site, layer, alpha) places a recipe merges at (empty for one the probe does not
        measure): recipes recorded in one pass must not share one."""
        if not _probed(recipe):
            return set()
        plan = recipe_plan(recipe, n_layers)
        return {(recipe.op, plan.site, layer, _rounded(0.5 if a is None else a)) for layer, a in plan.merges}

    @contextlib.contextmanager
    def recording(self, recipe: object, n_layers: int) -> Iterator[None]:
        """While the block runs, the recipes' ops record what they mix (a recipe or a list of per-row
        recipes; anything else passes through). Each op is re-registered under its own name with a
        recording twin and put back after, so the registry holds no extra name and the recipe is
        unchanged."""
        rows = list(recipe) if isinstance(recipe, (list, tuple)) else [recipe]
        if not rows or not all(_probed(r) for r in rows):
            yield
            return
        plan = recipe_plan(rows[0], n_layers) if len(rows) == 1 else rows_plan(rows, n_layers)
        self._order = _call_order(plan)
        self._n_layers = n_layers
        self._calls = defaultdict(int)
        specs = [get_op(op) for op in self._order]
        flags = [
            dict(
                multi_source=spec.multi_source,
                default_positions=spec.default_positions,
                static_source=spec.static_source,
                overwrite=True,
            )
            for spec in specs
        ]
        for spec, flag in zip(specs, flags, strict=True):
            register_op(spec.name, **flag)(self._twin(spec))
        try:
            yield
        finally:
            for spec, flag in zip(specs, flags, strict=True):
                register_op(spec.name, **flag)(spec.fn)
            self._order = {}

    def _twin(self, spec: OpSpec) -> Callable[..., Tensor]:
        @functools.wraps(spec.fn)
        def recording(hb: Tensor, hs: Tensor, alpha: float | Tensor | None, **params: object) -> Tensor:
            self._record(spec, hb, hs, alpha)
            return spec.fn(hb, hs, alpha, **params)

        recording.__signature__ = inspect.signature(spec.fn)  # type: ignore[attr-defined]
        return recording

    def _record(self, spec: OpSpec, hb: Tensor, hs: Tensor, alpha: float | Tensor | None) -> None:
        order = self._order.get(spec.name)
        if not order:
            return
        site, layer = order[self._calls[spec.name] % len(order)]
        self._calls[spec.name] += 1
        b = hb[..., -1, :].detach().double().reshape(-1, hb.shape[-1])
        s = hs[0] if spec.multi_source else hs
        s = s[..., -1, :].detach().double().reshape(-1, hb.shape[-1])
        if alpha is None:  # the live ops' own default (the plan's alpha: RegMean's lambda resolved there)
            alpha = 0.5
        a = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1).cpu()
        a = torch.round(a * 1e6) / 1e6  # per-row alphas arrive in the model's dtype
        a = a.expand(b.shape[0]) if a.numel() == 1 else a
        ratio = (s.norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-12)).cpu()
        weight = _source_weight(spec.name, b, s, a.to(b.device)).cpu()
        for value in a.unique().tolist():
            if value == 0:
                continue  # rows of another recipe: not merged here
            rows = a == value
            acc = self._sums[(spec.name, site, layer, _rounded(value))]
            acc[0] += float(ratio[rows].sum())
            acc[1] += float(weight[rows].sum())
            acc[2] += int(rows.sum())

    def summary(self, recipe: Recipe | None = None) -> dict[str, float | dict[int, float]]:
        """Mean `|h_source|/|h_base|` over the merged layers' tokens (NaN when nothing was measured), and
        per layer the mean effective source weight: of `recipe`'s merges, or of all recorded ones."""
        wanted = None if recipe is None else self.keys(recipe, self._n_layers)
        counted: Mapping[Key, list[float]] = {
            k: v for k, v in self._sums.items() if v[2] > 0 and (wanted is None or k in wanted)
        }
        if not counted:
            return {"norm_ratio": math.nan, "source_weight": {}}
        ratio = sum(v[0] for v in counted.values()) / sum(v[2] for v in counted.values())
        per_layer: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for (_, _, layer, _), v in counted.items():
            per_layer[layer][0] += v[1]
            per_layer[layer][1] += v[2]
        return {"norm_ratio": ratio, "source_weight": {k: w / n for k, (w, n) in sorted(per_layer.items())}}


def _call_order(plan: Plan) -> dict[str, list[tuple[str, int]]]:
    """Per op name, the (site, layer) of each of its calls in one forward, in the order the engines
    make them (`Plan.sites`, and a per-row plan's groups in turn at each)."""
    order: dict[str, list[tuple[str, int]]] = defaultdict(list)
    groups = plan.groups or [plan]
    for layer, site in plan.sites():
        for group in groups:
            merges = group.alphas if plan.groups else dict(group.merges)
            if group.site == site and layer in merges and group.op is not None:
                order[group.op.name].append((site, layer))
    return dict(order)
