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
"""

import contextlib
import functools
import inspect
import math
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch

from latent_merge_nnsight.ops import SMALL_ANGLE, get_op, register_op
from latent_merge_nnsight.recipe import Recipe

__all__ = ["NormProbe"]

PROBED = ("lerp", "slerp", "regmean")
"""Ops whose source side is a live hidden state (delta's is a fixed vector: no norm ratio)."""


def _source_weight(op: str, hb: torch.Tensor, hs: torch.Tensor, a: float) -> torch.Tensor:
    """Per row: the source's share `c_s / (c_b + c_s)` of the merged direction (see the module docstring)."""
    nb, ns = hb.norm(dim=-1), hs.norm(dim=-1)
    if op == "slerp":
        cos = (hb * hs).sum(-1) / (nb * ns).clamp_min(1e-9)
        theta = torch.acos(cos.clamp(-1.0, 1.0))
        small = theta < SMALL_ANGLE
        sin = torch.sin(theta).clamp_min(1e-12)
        cb = torch.where(small, torch.full_like(theta, 1 - a), torch.sin((1 - a) * theta) / sin)
        cs = torch.where(small, torch.full_like(theta, a), torch.sin(a * theta) / sin)
    else:
        cb, cs = (1 - a) * nb, a * ns
    return cs / (cb + cs).clamp_min(1e-12)


class NormProbe:
    """Record norm ratios and effective source weights of the merges a recipe makes while generating.

    Usage:
        probe = NormProbe()
        with probe.recording(recipe, n_layers):
            out = lmn.generate(base, ft, prompts, recipe, ...)
        probe.summary()   # {"norm_ratio": mean over merged layers, "source_weight": {layer: mean}}
        probe.reset()

    Only positions `"last"` recipes are measured exactly: the probe reads the last column of each call,
    which is each row's merged token (the engines left-align prompts; a decode step has one column).
    """

    def __init__(self) -> None:
        self._layers: list[int] = []
        self._op = ""
        self._calls = 0
        self.reset()

    def reset(self) -> None:
        self._sums: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])  # ratio, weight, count
        self._calls = 0

    @contextlib.contextmanager
    def recording(self, recipe: Any, n_layers: int) -> Iterator[None]:
        """While the block runs, the recipe's op records what it mixes (unprobed ops and recipes pass
        through). The op is re-registered under its own name with a recording twin and put back after,
        so the registry holds no extra name and the recipe is unchanged."""
        if not isinstance(recipe, Recipe) or recipe.op not in PROBED or recipe.resolved_positions() != "last":
            self._layers = []
            yield
            return
        self._op = recipe.op
        self._layers = [layer for layer, a in sorted(recipe.layer_alphas(n_layers).items()) if a != 0]
        spec = get_op(recipe.op)

        @functools.wraps(spec.fn)
        def recording(hb, hs, alpha, **params):
            self._record(hb, hs, alpha, params)
            return spec.fn(hb, hs, alpha, **params)

        recording.__signature__ = inspect.signature(spec.fn)  # type: ignore[attr-defined]
        flags = dict(
            multi_source=spec.multi_source,
            default_positions=spec.default_positions,
            static_source=spec.static_source,
            overwrite=True,
        )
        register_op(spec.name, **flags)(recording)
        try:
            yield
        finally:
            register_op(spec.name, **flags)(spec.fn)
            self._layers = []

    def _record(self, hb: torch.Tensor, hs: torch.Tensor, alpha: Any, params: dict[str, Any]) -> None:
        if not self._layers:
            return
        layer = self._layers[self._calls % len(self._layers)]
        self._calls += 1
        b = hb[..., -1, :].detach().double().reshape(-1, hb.shape[-1])
        s = hs[0] if get_op(self._op).multi_source else hs
        s = s[..., -1, :].detach().double().reshape(-1, hb.shape[-1])
        a = 0.5 if alpha is None else float(alpha)  # the plan's alpha (RegMean's lambda resolved there)
        ratio = s.norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-12)
        weight = _source_weight(self._op, b, s, a)
        acc = self._sums[layer]
        acc[0] += float(ratio.sum())
        acc[1] += float(weight.sum())
        acc[2] += ratio.numel()

    def summary(self) -> dict[str, Any]:
        """Mean `|h_source|/|h_base|` over the merged layers' tokens (NaN when nothing was measured), and
        per layer the mean effective source weight."""
        counted = {layer: v for layer, v in self._sums.items() if v[2] > 0}
        if not counted:
            return {"norm_ratio": math.nan, "source_weight": {}}
        ratio = sum(v[0] for v in counted.values()) / sum(v[2] for v in counted.values())
        return {"norm_ratio": ratio, "source_weight": {k: v[1] / v[2] for k, v in counted.items()}}
