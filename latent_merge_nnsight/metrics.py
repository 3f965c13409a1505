"""Representation metrics: linear CKA between two sets of hidden states, and "midness" of a merged state.

Pure tensor code: imports nothing from the package except `errors`.

- `linear_cka(X, Y)` compares representations row by row (one row per token), as in Kornblith et al.
  2019; `debiased=True` swaps in the unbiased HSIC estimator of Song et al. 2012 (debiased CKA, as in
  Nguyen et al. 2021).
- `midness(hb, hf, hm)` asks, per token, where a merged state `hm` sits on the sphere relative to the
  base state `hb` and the fine-tuned state `hf`: is it at their spherical midpoint, and how far along
  the great-circle arc from `hb` to `hf` has it moved?
"""

import math
from dataclasses import dataclass

import torch
from einops import einsum
from jaxtyping import Bool, Float
from torch import Tensor

from latent_merge_nnsight.errors import LatentMergeError

__all__ = ["Midness", "linear_cka", "midness"]

# A vector whose norm is below this counts as the zero vector (the same eps the merge ops use).
_ZERO_NORM = 1e-9
# A centred representation whose energy is below (_FLAT_TOL * dtype eps)**2 of the raw energy is treated
# as constant: its CKA is 0/0 and every digit left would be rounding noise.
_FLAT_TOL = 32.0


# --------------------------------------------------------------------------------------------- helpers


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half and bfloat16 are upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_float_tensor(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise LatentMergeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise LatentMergeError(
            f"{name} must be a floating-point tensor; got dtype {x.dtype}. "
            f"Convert it first, e.g. {name}.float()"
        )
    return x


def _check_finite(name: str, x: Tensor, where: str) -> None:
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise LatentMergeError(
            f"{name} contains {bad} NaN/inf value(s) {where}; expected finite values "
            "(positions excluded by mask may hold anything)"
        )


def _check_bool_mask(mask: object) -> Tensor:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = f"dtype {mask.dtype}" if isinstance(mask, Tensor) else type(mask).__name__
        raise LatentMergeError(
            f"mask must be a bool tensor; got {got}. "
            "For a tokenizer attention mask pass attention_mask.bool()"
        )
    return mask


def _check_not_empty(mask: Tensor) -> None:
    if not bool(mask.any()):
        raise LatentMergeError(
            f"mask of shape {tuple(mask.shape)} selects no tokens (all False); "
            "expected at least one real token"
        )


# ------------------------------------------------------------------------------------------------- CKA


def _use_gram_form(n: int, d1: int, d2: int) -> bool:
    """True when the n x n Gram-matrix form costs fewer multiply-adds than the d x d feature form."""
    gram_cost = n * n * (d1 + d2)
    feature_cost = n * (d1 * d2 + d1 * d1 + d2 * d2)
    return gram_cost < feature_cost


def _frobenius_products(
    xc: Float[Tensor, "*layers n d1"], yc: Float[Tensor, "*layers n d2"], gram: bool
) -> tuple[Float[Tensor, "*layers"], Float[Tensor, "*layers"], Float[Tensor, "*layers"]]:
    """<K, L>, <K, K>, <L, L> for the linear Gram matrices K = xc xc^T and L = yc yc^T.

    Gram form: sum(K * L). Feature form: ||xc^T yc||_F^2, since <K, L> = tr(xc xc^T yc yc^T). Equal in exact
    arithmetic; the cheaper one for the shapes is used.
    """
    if gram:
        k = einsum(xc, xc, "... i d1, ... j d1 -> ... i j")
        lg = einsum(yc, yc, "... i d2, ... j d2 -> ... i j")
        return (k * lg).sum((-2, -1)), (k * k).sum((-2, -1)), (lg * lg).sum((-2, -1))
    xy = einsum(xc, yc, "... n d1, ... n d2 -> ... d1 d2")
    xx = einsum(xc, xc, "... n d1, ... n e1 -> ... d1 e1")
    yy = einsum(yc, yc, "... n d2, ... n e2 -> ... d2 e2")
    return xy.square().sum((-2, -1)), xx.square().sum((-2, -1)), yy.square().sum((-2, -1))


def _unbiased_hsic(
    fro: Float[Tensor, "*layers"], dk: Float[Tensor, "*layers n"], dl: Float[Tensor, "*layers n"], n: int
) -> Float[Tensor, "*layers"]:
    """Song et al. 2012 unbiased HSIC from the statistics of *column-centred* linear Gram matrices K, L.

    With K~, L~ the Gram matrices with zeroed diagonals,
    HSIC_1 = [tr(K~ L~) + (1'K~1)(1'L~1) / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3)).
    Centred features give K 1 = 0, so K~ 1 = -diag(K), which reduces every term to `fro` = <K, L>
    and the diagonals dk, dl. The estimator is invariant to the centring: the result is that of the raw K, L.
    """
    diag_dot = (dk * dl).sum(-1)
    trace_term = fro - diag_dot
    sums_term = dk.sum(-1) * dl.sum(-1) / ((n - 1) * (n - 2))
    cross_term = 2.0 / (n - 2) * diag_dot
    return (trace_term + sums_term - cross_term) / (n * (n - 3))


def _check_not_flat(name: str, raw: Tensor, centred: Tensor) -> None:
    """Raise if a layer's rows are (numerically) all the same point: CKA is then 0/0."""
    eps = torch.finfo(centred.dtype).eps
    spread = centred.square().sum((-2, -1))
    scale = raw.square().sum((-2, -1))
    flat = spread <= (_FLAT_TOL * eps) ** 2 * scale
    if bool(flat.any()):
        where = "" if flat.ndim == 0 else f" at layer index(es) {flat.nonzero().flatten().tolist()}"
        raise LatentMergeError(
            f"{name} has (numerically) zero variance across its rows{where}: every selected token has the "
            "same representation, so CKA is 0/0 and undefined; expected at least two distinct rows"
        )


def _check_cka_shapes(X: Tensor, Y: Tensor) -> int:
    """That X and Y are both `[n, d]` or both `[layers, n, d]`, with the same layers and rows; returns n."""
    for name, t in (("X", X), ("Y", Y)):
        if t.ndim not in (2, 3):
            raise LatentMergeError(
                f"{name} must have shape [n, d] or [layers, n, d] (rank 2 or 3); got shape {tuple(t.shape)} "
                f"(rank {t.ndim}). Flatten batch and position into n first, e.g. "
                "einops.rearrange(h, 'l b p d -> l (b p) d')"
            )
    if X.ndim != Y.ndim:
        raise LatentMergeError(
            f"X and Y must both be [n, d] or both be [layers, n, d]; got X shape {tuple(X.shape)} and "
            f"Y shape {tuple(Y.shape)}"
        )
    if X.ndim == 3 and X.shape[0] != Y.shape[0]:
        raise LatentMergeError(
            f"X and Y must have the same number of layers; got layers={X.shape[0]} for X and "
            f"layers={Y.shape[0]} for Y"
        )
    n = X.shape[-2]
    if Y.shape[-2] != n:
        raise LatentMergeError(
            f"X and Y must have the same number of rows n (one per token); got n={n} for X "
            f"(shape {tuple(X.shape)}) and n={Y.shape[-2]} for Y (shape {tuple(Y.shape)})"
        )
    return n


def linear_cka(
    X: Float[Tensor, "*layers n d1"],
    Y: Float[Tensor, "*layers n d2"],
    debiased: bool = False,
    mask: Bool[Tensor, " n"] | None = None,
) -> Float[Tensor, "*layers"]:
    """Linear CKA (Kornblith et al. 2019) between representations X and Y of the same n tokens.

    CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with linear Gram matrices K = X X^T, L = Y Y^T. It lies in
    [0, 1], is 1 for identical inputs, and is invariant to orthogonal maps, isotropic scaling and translation
    of either side, but not to general invertible linear maps.

    Arguments:
        X: `[n, d1]`, or `[layers, n, d1]` for one CKA per layer. One row per token; flatten batch and
            position first, e.g. `einops.rearrange(h, "l b p d -> l (b p) d")`.
        Y: `[n, d2]` or `[layers, n, d2]`, same rows (tokens) as X; d2 may differ from d1.
        debiased: use the unbiased HSIC estimator of Song et al. 2012 (debiased CKA, Nguyen et al. 2021),
            which removes the upward bias of CKA when n is small relative to d. Needs n >= 4; it can be
            slightly negative for unrelated representations.
        mask: `[n]` bool, True for the rows to use (e.g. the flattened attention mask). Rows outside the
            mask are ignored entirely and may hold anything, NaN included.

    Returns:
        A scalar tensor, or `[layers]`; float64 when either input is float64, else float32.

    Computed from the n x n Gram matrices or the d x d feature cross-products, whichever is cheaper.
    Raises LatentMergeError for mismatched shapes, non-finite values in used rows, an empty mask, too few
    rows (n < 2, or n < 4 when debiased) and constant representations (CKA is 0/0 there).
    """
    X = _check_float_tensor("X", X)
    Y = _check_float_tensor("Y", Y)
    n = _check_cka_shapes(X, Y)
    where = "in its rows"
    if mask is not None:
        mask = _check_bool_mask(mask)
        if tuple(mask.shape) != (n,):
            raise LatentMergeError(
                f"mask must have shape ({n},), one entry per row n of X and Y; got shape {tuple(mask.shape)}"
            )
        _check_not_empty(mask)
        X, Y = X[..., mask, :], Y[..., mask, :]
        n = X.shape[-2]
        where = "in the rows selected by mask"
    min_rows = 4 if debiased else 2
    if n < min_rows:
        which = "debiased CKA (the unbiased HSIC estimator divides by n-3)" if debiased else "CKA"
        raise LatentMergeError(
            f"{which} needs n >= {min_rows} rows (tokens); got n={n}"
            + (" after applying mask" if mask is not None else "")
        )
    _check_finite("X", X, where)
    _check_finite("Y", Y, where)

    dtype = _compute_dtype(X, Y)
    X, Y = X.to(dtype), Y.to(dtype)
    # Centre the columns: the linear-kernel HSIC only sees centred features, and centring first keeps the
    # Gram entries small (better conditioned) without changing either estimator.
    xc = X - X.mean(dim=-2, keepdim=True)
    yc = Y - Y.mean(dim=-2, keepdim=True)
    _check_not_flat("X", X, xc)
    _check_not_flat("Y", Y, yc)

    fro_xy, fro_xx, fro_yy = _frobenius_products(xc, yc, _use_gram_form(n, X.shape[-1], Y.shape[-1]))
    if not debiased:
        # The 1/(n-1)^2 normalisation of HSIC cancels in the ratio.
        return fro_xy / torch.sqrt(fro_xx * fro_yy)

    dk = xc.square().sum(-1)  # diag(K), the squared norms of the centred rows
    dl = yc.square().sum(-1)
    hsic_xy = _unbiased_hsic(fro_xy, dk, dl, n)
    hsic_xx = _unbiased_hsic(fro_xx, dk, dk, n)
    hsic_yy = _unbiased_hsic(fro_yy, dl, dl, n)
    denom = hsic_xx * hsic_yy
    if bool((denom <= 0).any()):
        raise LatentMergeError(
            f"debiased CKA is undefined here: the unbiased HSIC of X or Y with itself is not positive "
            f"(n={n} rows: too few, or nearly constant representations); use more tokens or debiased=False"
        )
    return hsic_xy / torch.sqrt(denom)


# --------------------------------------------------------------------------------------------- midness


@dataclass(frozen=True, eq=False)
class Midness:
    """Per-token position of a merged state relative to the base and fine-tuned states (see `midness`).

    Each field has the leading shape of the inputs (e.g. `[batch, pos]`). Padding positions hold NaN so
    that they cannot be averaged in by accident: use `mean()`, or index with `mask`.
    """

    midpoint_cos: Float[Tensor, "*batch"]
    """Cosine between hm and the spherical midpoint of hb and hf (1 = exactly at the midpoint direction)."""
    arc_ratio: Float[Tensor, "*batch"]
    """d(hb, hm) / d(hb, hf): 0 at the base, 0.5 halfway, 1 at the fine-tuned angle."""
    arc_deviation: Float[Tensor, "*batch"]
    """|d(hb, hm) - d(hb, hf) / 2| in radians: distance from the halfway angle."""
    mask: Bool[Tensor, "*batch"]
    """True at real tokens (all True when no mask was given)."""

    @property
    def n_tokens(self) -> int:
        """Number of real tokens the means run over."""
        return int(self.mask.sum())

    def mean(self) -> dict[str, float]:
        """Mean of each metric over real tokens (padding excluded), as Python floats."""
        return {
            name: float(getattr(self, name)[self.mask].to(torch.float64).mean())
            for name in ("midpoint_cos", "arc_ratio", "arc_deviation")
        }


def _unit(x: Float[Tensor, "*batch d"]) -> tuple[Float[Tensor, "*batch d"], Bool[Tensor, "*batch"]]:
    """x / |x|, and the zero vector (not NaN) where |x| < 1e-9."""
    norm = x.norm(dim=-1, keepdim=True)
    nonzero = norm > _ZERO_NORM
    return torch.where(nonzero, x / norm.clamp_min(_ZERO_NORM), torch.zeros_like(x)), nonzero.squeeze(-1)


def _arc(u: Float[Tensor, "*batch d"], v: Float[Tensor, "*batch d"]) -> Float[Tensor, "*batch"]:
    """Geodesic distance between unit vectors: acos(clamp(u.v, -1, 1)), computed as 2 atan2(|u-v|, |u+v|).

    The two agree exactly in real arithmetic; the atan2 form keeps full precision near 0 and pi, where acos
    loses half the digits. A zero vector sits at pi/2 from every unit vector (two zero vectors: 0).
    """
    return 2.0 * torch.atan2((u - v).norm(dim=-1), (u + v).norm(dim=-1))


def midness(
    hb: Float[Tensor, "*batch d"],
    hf: Float[Tensor, "*batch d"],
    hm: Float[Tensor, "*batch d"],
    mask: Bool[Tensor, "..."] | None = None,
) -> Midness:
    """Where the merged state hm sits relative to base hb and fine-tuned hf, per token.

    With u, v, w the unit vectors of hb, hf, hm and d(a, b) = acos(clamp(a.b, -1, 1)) the geodesic distance:
      - `midpoint_cos` = w . normalise(u + v), the cosine to the spherical midpoint. A slerp at alpha 0.5
        gives 1 (so does a lerp of equal-norm states); any other direction gives less.
      - `arc_ratio` = d(u, w) / d(u, v). A slerp at alpha a gives a.
      - `arc_deviation` = |d(u, w) - d(u, v) / 2| (radians).
    Only directions matter: all three ignore the norms of hb, hf and hm.

    Edge cases (finite by design, never NaN at real tokens):
      - hb and hf antiparallel (|u + v| < sqrt(eps)): every point of the great sphere orthogonal to u is a
        midpoint, so `midpoint_cos` is the cosine to the *nearest* one, |w - (w.u) u|.
      - hb and hf in the same direction (d(u, v) < sqrt(eps)): the arc has no length, so `arc_ratio` is
        defined as 0 (hm counted as at the base end); `arc_deviation` = d(u, w) still shows how far hm strays.
      - a zero vector (norm < 1e-9) has no direction: it is taken as the zero vector, at distance pi/2 from
        every direction.

    Arguments:
        hb, hf, hm: `[..., d]` of the same shape, e.g. `[batch, pos, d]` or `[layers, batch, pos, d]`.
        mask: bool, True at real tokens; its shape is the leading shape `[...]` or a suffix of it (a
            `[batch, pos]` attention mask works for `[layers, batch, pos, d]` inputs). Positions outside it
            may hold anything, NaN included, and come back as NaN.

    Returns:
        A `Midness` of per-token tensors (float64 if any input is float64, else float32) with a `.mean()`
        over real tokens.
    """
    hb = _check_float_tensor("hb", hb)
    hf = _check_float_tensor("hf", hf)
    hm = _check_float_tensor("hm", hm)
    if hb.ndim < 1 or hb.shape[-1] < 1:
        raise LatentMergeError(f"hb must have shape [..., d] with d >= 1; got shape {tuple(hb.shape)}")
    for name, t in (("hf", hf), ("hm", hm)):
        if t.shape != hb.shape:
            raise LatentMergeError(
                f"{name} must have the same shape as hb {tuple(hb.shape)}; got {name} shape {tuple(t.shape)}"
            )
    lead = tuple(hb.shape[:-1])
    if mask is None:
        real = torch.ones(lead, dtype=torch.bool, device=hb.device)
        if real.numel() == 0:
            raise LatentMergeError(f"hb has no tokens (shape {tuple(hb.shape)}); expected at least one token")
        where = "at its tokens"
    else:
        mask = _check_bool_mask(mask)
        if mask.ndim > len(lead) or tuple(mask.shape) != lead[len(lead) - mask.ndim :]:
            raise LatentMergeError(
                f"mask must have the leading shape of hb {lead} or a suffix of it (e.g. [batch, pos]); "
                f"got shape {tuple(mask.shape)}"
            )
        _check_not_empty(mask)
        real = mask.to(hb.device).expand(lead)
        where = "at real tokens (mask True)"
    for name, t in (("hb", hb), ("hf", hf), ("hm", hm)):
        _check_finite(name, t[real], where)

    dtype = _compute_dtype(hb, hf, hm)
    tol = math.sqrt(torch.finfo(dtype).eps)
    u, _ = _unit(hb.to(dtype))
    v, _ = _unit(hf.to(dtype))
    w, _ = _unit(hm.to(dtype))

    d_bf = _arc(u, v)
    d_bm = _arc(u, w)

    # Spherical midpoint of u and v; the nearest midpoint when they are antiparallel.
    s = u + v
    s_norm = s.norm(dim=-1, keepdim=True)
    cos_mid = (w * (s / s_norm.clamp_min(tol))).sum(-1)
    cos_nearest = (w - (w * u).sum(-1, keepdim=True) * u).norm(dim=-1)
    midpoint_cos = torch.where(s_norm.squeeze(-1) < tol, cos_nearest, cos_mid).clamp(-1.0, 1.0)

    arc_ratio = torch.where(d_bf < tol, torch.zeros_like(d_bf), d_bm / d_bf.clamp_min(tol))
    arc_deviation = (d_bm - d_bf / 2).abs()

    nan = torch.tensor(float("nan"), dtype=dtype, device=hb.device)
    return Midness(
        midpoint_cos=torch.where(real, midpoint_cos, nan),
        arc_ratio=torch.where(real, arc_ratio, nan),
        arc_deviation=torch.where(real, arc_deviation, nan),
        mask=real.clone(),
    )
