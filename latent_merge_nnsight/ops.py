"""Merge operators: pure functions that mix a base hidden vector with source hidden vectors.

Every op acts on the last axis (the hidden vector) and broadcasts over any leading axes, so the same
function serves one token, a batch of tokens, or a whole `[batch, pos, d_model]` block. Ops compute in
float32 (float64 stays float64) and return the dtype of `hb`.

The registry maps a name to an `OpSpec`; `@register_op` adds one, and every entry point of the package
(`merge_into`, `Recipe`, `generate`, the CLI) looks ops up here by name.
"""

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from latent_merge_nnsight.errors import LatentMergeError

__all__ = [
    "OpSpec",
    "check_alpha",
    "check_weight",
    "delta",
    "get_op",
    "lerp",
    "list_ops",
    "regmean",
    "regmean_beta",
    "source_weights",
    "register_op",
    "slerp",
]

EPS = 1e-9
"""Added to norms before dividing (the paper's epsilon)."""
SMALL_ANGLE = 1e-3
"""Below this angle (radians) slerp falls back to the linear blend of the unit directions."""

Alpha = float | Tensor


@dataclass(frozen=True)
class OpSpec:
    """A registered merge operator.

    Attributes:
        name: the name users pass as `op=`.
        fn: `fn(hb, hs, alpha, **params) -> merged`.
        multi_source: if True, `hs` is a stack `[n_sources, *batch, d]` (e.g. RegMean).
        default_positions: where the op applies when the caller does not say (`"last"` or `"all"`).
        static_source: if True, the source is a fixed vector (e.g. a steering delta), not a live state.
        params: names of the keyword parameters the op accepts beyond `(hb, hs, alpha)`.
    """

    name: str
    fn: Callable[..., Tensor]
    multi_source: bool = False
    default_positions: str = "last"
    static_source: bool = False
    params: tuple[str, ...] = ()

    def __call__(self, hb: Tensor, hs: Tensor, alpha: Alpha | None = None, **params) -> Tensor:
        return self.fn(hb, hs, alpha, **params)

    def __repr__(self) -> str:
        extra = f", params={list(self.params)}" if self.params else ""
        return f"OpSpec({self.name!r}, multi_source={self.multi_source}{extra})"


_REGISTRY: dict[str, OpSpec] = {}


def register_op(
    name: str | None = None,
    *,
    multi_source: bool = False,
    default_positions: str = "last",
    static_source: bool = False,
    overwrite: bool = False,
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register a merge operator under `name` (default: the function's name).

    The function must take `(hb, hs, alpha)` as its first three parameters; any further parameters
    must be keyword parameters with defaults (they become op params, e.g. RegMean's `weights`).

    Example:
        >>> @register_op("mean_norm")
        ... def mean_norm(hb, hs, alpha):
        ...     return hb / hb.norm(dim=-1, keepdim=True) * hs.norm(dim=-1, keepdim=True)
    """
    if default_positions not in ("last", "all"):
        raise LatentMergeError(f"default_positions={default_positions!r}; expected 'last' or 'all'")

    def decorate(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        op_name = name or fn.__name__
        params = list(inspect.signature(fn).parameters.values())
        head = [p.name for p in params[:3]]
        if head != ["hb", "hs", "alpha"]:
            raise LatentMergeError(
                f"op {op_name!r}: the first three parameters must be (hb, hs, alpha), got ({', '.join(head)})"
            )
        extra = params[3:]
        for p in extra:
            if p.default is inspect.Parameter.empty or p.kind is inspect.Parameter.VAR_POSITIONAL:
                raise LatentMergeError(
                    f"op {op_name!r}: parameter {p.name!r} must be a keyword parameter with a default"
                )
        if op_name in _REGISTRY and not overwrite:
            raise LatentMergeError(f"op {op_name!r} is already registered; pass overwrite=True to replace it")
        _REGISTRY[op_name] = OpSpec(
            name=op_name,
            fn=fn,
            multi_source=multi_source,
            default_positions=default_positions,
            static_source=static_source,
            params=tuple(p.name for p in extra if p.kind is not inspect.Parameter.VAR_KEYWORD),
        )
        return fn

    return decorate


def list_ops() -> list[str]:
    """Names of all registered ops, sorted."""
    return sorted(_REGISTRY)


def get_op(name: "str | OpSpec") -> OpSpec:
    """Look an op up by name; an unknown name lists the valid ones."""
    if isinstance(name, OpSpec):
        return name
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise LatentMergeError(f"unknown op {name!r}; expected one of: {', '.join(list_ops())}") from None


# ----------------------------------------------------------------------------------------------------
# helpers


def _work_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64; everything else computes in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _as_alpha(alpha: Alpha | None, like: Tensor, default: float = 0.5) -> Tensor:
    """Alpha as a tensor broadcastable against `[*batch, 1]` in the working dtype."""
    if alpha is None:
        alpha = default
    if isinstance(alpha, (int, float)):  # a fill, not a host-to-device copy: capturable in a CUDA graph
        return torch.full((), float(alpha), dtype=like.dtype, device=like.device)
    a = torch.as_tensor(alpha, dtype=like.dtype, device=like.device)
    if a.ndim > 0:
        a = a.unsqueeze(-1)  # one alpha per token: [*batch] -> [*batch, 1]
    return a


def _exact_ends(result: Tensor, hb: Tensor, hs: Tensor, a: Tensor) -> Tensor:
    """Make alpha=0 return hb and alpha=1 return hs bit for bit (the float formula can be off by an ulp)."""
    result = torch.where(a == 0, hb.to(result.dtype), result)
    return torch.where(a == 1, hs.to(result.dtype), result)


# ----------------------------------------------------------------------------------------------------
# the built-in ops


@register_op("lerp")
def lerp(
    hb: Float[Tensor, "*batch d"], hs: Float[Tensor, "*batch d"], alpha: Alpha
) -> Float[Tensor, "*batch d"]:
    """Linear interpolation `(1-alpha)*hb + alpha*hs`; alpha=0 gives hb, alpha=1 gives hs."""
    wd = _work_dtype(hb)
    b, s = hb.to(wd), hs.to(wd)
    a = _as_alpha(alpha, b)
    return _exact_ends((1 - a) * b + a * s, hb, hs, a).to(hb.dtype)


@register_op("slerp")
def slerp(
    hb: Float[Tensor, "*batch d"], hs: Float[Tensor, "*batch d"], alpha: Alpha
) -> Float[Tensor, "*batch d"]:
    """The paper's norm-restoring spherical interpolation.

    With `u = hb/|hb|`, `v = hs/|hs|` and `theta = acos(u.v)`, the direction is
    `sin((1-a)theta)/sin(theta) u + sin(a theta)/sin(theta) v`, renormalised, and the result has norm
    `(1-a)|hb| + a|hs|`, so its angle to hb is `a*theta`.

    Edge cases (all finite, never NaN):
    - `theta < 1e-3` (parallel) or `pi - theta < 1e-3` (antiparallel): the direction is the linear blend
      `(1-a)u + a v`, renormalised. For exactly antiparallel inputs at `a = 0.5` that blend is zero, and
      so is the result.
    - a zero vector has direction 0 (its norm plus eps 1e-9 is divided), so `slerp(0, hs, a) = a*hs`
      and `slerp(hb, 0, a) = (1-a)*hb`.
    """
    wd = _work_dtype(hb)
    b, s = hb.to(wd), hs.to(wd)
    a = _as_alpha(alpha, b)
    nb = b.norm(dim=-1, keepdim=True)
    ns = s.norm(dim=-1, keepdim=True)
    u = b / (nb + EPS)
    v = s / (ns + EPS)
    cos = (u * v).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0)
    theta = torch.acos(cos)
    sin = torch.sin(theta)
    linear = (theta < SMALL_ANGLE) | (torch.pi - theta < SMALL_ANGLE)
    safe_sin = torch.where(linear, torch.ones_like(sin), sin)
    spherical = (torch.sin((1 - a) * theta) / safe_sin) * u + (torch.sin(a * theta) / safe_sin) * v
    direction = torch.where(linear, (1 - a) * u + a * v, spherical)
    direction = direction / (direction.norm(dim=-1, keepdim=True) + EPS)
    merged = direction * ((1 - a) * nb + a * ns)
    return _exact_ends(merged, hb, hs, a).to(hb.dtype)


@register_op("regmean", multi_source=True)
def regmean(
    hb: Float[Tensor, "*batch d"],
    hs: Float[Tensor, "m *batch d"],
    alpha: Alpha | None,
    weights: "Tensor | list[float] | None" = None,
    lam: float | None = None,
) -> Float[Tensor, "*batch d"]:
    """The paper's latent RegMean: `(1-beta)*hb + beta * sum_i w_i s_i` over m sources.

    `beta` is `alpha`, or `1/(1+lam)` in the paper's lambda parametrisation (give one, not both; with
    neither, beta is 0.5). `weights` are normalised to sum to 1 (uniform when not given).
    """
    if alpha is not None and lam is not None:
        raise LatentMergeError(
            f"regmean: give either alpha (beta directly) or lam (beta = 1/(1+lam)), not both "
            f"(got alpha={alpha!r}, lam={lam!r})"
        )
    if lam is not None:
        alpha = regmean_beta(lam)
    wd = _work_dtype(hb)
    b, s = hb.to(wd), hs.to(wd)
    m = s.shape[0]
    if weights is None:
        w = torch.full((m,), 1.0 / m, dtype=wd, device=b.device)
    elif isinstance(weights, Tensor) and weights.device == b.device and weights.device.type != "cpu":
        # already on the accelerator: checking its values would synchronise (and break a CUDA graph);
        # the engines check the weights on the host before moving them
        w = _check_count(weights.to(wd).flatten(), m)
        w = w / w.sum()
    else:
        w = source_weights(weights, m).to(device=b.device, dtype=wd)
    mixed = einops.einsum(w, s, "m, m ... d -> ... d")
    a = _as_alpha(alpha, b)
    result = (1 - a) * b + a * mixed
    result = torch.where(a == 0, b, result)
    return result.to(hb.dtype)


def _check_count(w: Float[Tensor, " n"], m: int) -> Float[Tensor, " m"]:
    """`w` itself, once it has one entry per source (a shape check: it needs no device sync)."""
    if w.shape[0] != m:
        raise LatentMergeError(f"regmean: weights has {w.shape[0]} entries for {m} sources; expected {m}")
    return w


def regmean_beta(lam: float) -> float:
    """RegMean's beta for the paper's lambda: `1/(1+lam)` (the one place lambda becomes an alpha)."""
    if not (float(lam) >= 0 and math.isfinite(float(lam))):
        raise LatentMergeError(f"regmean: lam={lam!r} must be a finite number >= 0")
    return 1.0 / (1.0 + float(lam))


def source_weights(weights: "Tensor | Sequence[float]", m: int) -> Float[Tensor, " m"]:
    """RegMean source weights checked (m finite, non-negative, not all zero) and normalised to sum to 1,
    as a float64 CPU tensor."""
    w = _check_count(torch.as_tensor(weights, dtype=torch.float64, device="cpu").flatten(), m)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise LatentMergeError(f"regmean: weights={w.tolist()} must be finite, non-negative and not all zero")
    return w / w.sum()


@register_op("delta", default_positions="all", static_source=True)
def delta(
    hb: Float[Tensor, "*batch d"], hs: Float[Tensor, "*#batch d"], alpha: Alpha
) -> Float[Tensor, "*batch d"]:
    """Activation steering / task vector: `hb + alpha*hs`, where `hs` is a static delta (e.g. from
    `compute_deltas`) broadcast over tokens."""
    wd = _work_dtype(hb)
    a = _as_alpha(alpha, hb.to(wd), default=1.0)
    result = hb.to(wd) + a * hs.to(wd)
    return torch.where(a == 0, hb.to(wd), result).to(hb.dtype)


def check_weight(
    value: object,
    *,
    allow_extrapolation: bool = False,
    what: str = "alpha",
    op: str | None = None,
    extrapolate_hint: str = "pass allow_extrapolation=True",
) -> float:
    """A mixing weight (an op's alpha, a weight merge's, a logit ensemble's): finite, and in [0, 1] unless
    extrapolating. `op` names the op in the message; `extrapolate_hint` says how the caller's user allows
    extrapolation (a request names its own key). Returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LatentMergeError(f"{what}={value!r} must be a finite number")
    if not allow_extrapolation and not 0.0 <= value <= 1.0:
        for_op = "" if op is None else f" for op {op!r}"
        raise LatentMergeError(
            f"{what}={value} is outside [0, 1]{for_op} (0 keeps the base, 1 takes the source); "
            f"{extrapolate_hint} to extrapolate"
        )
    return float(value)


def check_alpha(
    alpha: object,
    op: "str | OpSpec",
    *,
    allow_extrapolation: bool = False,
    what: str = "alpha",
    extrapolate_hint: str = "pass allow_extrapolation=True",
) -> None:
    """Validate an alpha for `op` (None passes): `check_weight`, except that steering ops
    (`static_source`, e.g. delta) take any finite strength."""
    spec = get_op(op)
    if alpha is not None:
        check_weight(
            alpha,
            allow_extrapolation=allow_extrapolation or spec.static_source,
            what=what,
            op=spec.name,
            extrapolate_hint=extrapolate_hint,
        )
