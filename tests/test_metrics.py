"""Tests for latent_merge_nnsight.metrics: linear CKA and midness.

Behaviour tests call the public functions through jaxtyping + beartype runtime checking (`cka`, `mid`), so
the shape annotations are exercised too. Bad-input tests call the functions as users do (no runtime type
checker), because the LatentMergeError message is what users see; one test shows the checked wrapper also
rejects mismatched shapes.
"""

import math

import pytest
import torch
from beartype import beartype
from jaxtyping import TypeCheckError, jaxtyped

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.metrics import Midness, _use_gram_form, linear_cka, midness

cka = jaxtyped(typechecker=beartype)(linear_cka)
mid = jaxtyped(typechecker=beartype)(midness)

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=dtype)


def random_orthogonal(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(randn(d, d, seed=seed, dtype=F64))
    return q


# ------------------------------------------------------------------------------ independent references


def reference_cka(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Kornblith et al. 2019, straight from the HSIC definition, in float64."""
    X, Y = X.to(F64), Y.to(F64)
    n = X.shape[0]
    H = torch.eye(n, dtype=F64) - torch.ones(n, n, dtype=F64) / n  # centering matrix
    K, L = X @ X.T, Y @ Y.T

    def hsic(A: torch.Tensor, B: torch.Tensor) -> float:
        return float(torch.trace(A @ H @ B @ H)) / (n - 1) ** 2

    return hsic(K, L) / math.sqrt(hsic(K, K) * hsic(L, L))


def reference_unbiased_hsic(K: torch.Tensor, L: torch.Tensor) -> float:
    """Song et al. 2012 unbiased HSIC on raw (uncentred) Gram matrices with zeroed diagonals."""
    n = K.shape[0]
    Kt = K - torch.diag(torch.diag(K))
    Lt = L - torch.diag(torch.diag(L))
    one = torch.ones(n, dtype=K.dtype)
    value = (
        torch.trace(Kt @ Lt)
        + (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * (one @ Kt @ Lt @ one)
    ) / (n * (n - 3))
    return float(value)


def reference_debiased_cka(X: torch.Tensor, Y: torch.Tensor) -> float:
    X, Y = X.to(F64), Y.to(F64)
    K, L = X @ X.T, Y @ Y.T
    return reference_unbiased_hsic(K, L) / math.sqrt(
        reference_unbiased_hsic(K, K) * reference_unbiased_hsic(L, L)
    )


def reference_midness(hb: torch.Tensor, hf: torch.Tensor, hm: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token metrics with acos geodesics in float64 (generic vectors: no edge cases)."""
    u, v, w = (t.to(F64) / t.to(F64).norm(dim=-1, keepdim=True) for t in (hb, hf, hm))

    def dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.acos(torch.clamp((a * b).sum(-1), -1.0, 1.0))

    midpoint = (u + v) / (u + v).norm(dim=-1, keepdim=True)
    d_bf, d_bm = dist(u, v), dist(u, w)
    return {
        "midpoint_cos": (w * midpoint).sum(-1),
        "arc_ratio": d_bm / d_bf,
        "arc_deviation": (d_bm - d_bf / 2).abs(),
    }


def slerp(hb: torch.Tensor, hf: torch.Tensor, alpha: float) -> torch.Tensor:
    """The paper's slerp (generic, non-parallel vectors): sin-weighted direction, lerped norm."""
    nb, nf = hb.norm(dim=-1, keepdim=True), hf.norm(dim=-1, keepdim=True)
    u, v = hb / nb, hf / nf
    theta = torch.acos(torch.clamp((u * v).sum(-1, keepdim=True), -1.0, 1.0))
    direction = (torch.sin((1 - alpha) * theta) * u + torch.sin(alpha * theta) * v) / torch.sin(theta)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    return direction * ((1 - alpha) * nb + alpha * nf)


# ----------------------------------------------------------------------------------------------- CKA


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("n,d", [(40, 6), (8, 30)])
def test_cka_of_identical_inputs_is_one(debiased: bool, n: int, d: int) -> None:
    X = randn(n, d, seed=1)
    assert float(cka(X, X, debiased=debiased)) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_is_invariant_to_orthogonal_maps_isotropic_scaling_and_translation(debiased: bool) -> None:
    X = randn(50, 8, seed=2, dtype=F64)
    Y = X @ randn(8, 12, seed=3, dtype=F64) + 0.5 * randn(50, 12, seed=4, dtype=F64)
    base = float(cka(X, Y, debiased=debiased))
    assert 0.2 < base < 0.99  # a non-trivial value, so invariance is not 1 == 1
    Q = random_orthogonal(12, seed=5)
    shift = 10.0 * randn(12, seed=6, dtype=F64)
    transformed = 7.5 * (Y @ Q) + shift
    assert float(cka(X, transformed, debiased=debiased)) == pytest.approx(base, abs=1e-10)
    assert float(cka(-0.01 * X + 3.0, Y, debiased=debiased)) == pytest.approx(base, abs=1e-10)


def test_cka_is_not_invariant_to_an_ill_conditioned_invertible_map() -> None:
    X = randn(200, 10, seed=7, dtype=F64)
    scales = torch.logspace(-2, 2, 10, dtype=F64)
    A = random_orthogonal(10, seed=8) @ torch.diag(scales) @ random_orthogonal(10, seed=9)
    assert torch.linalg.cond(A) == pytest.approx(1e4, rel=1e-6)  # invertible, far from orthogonal
    value = float(cka(X, X @ A))
    assert value == pytest.approx(reference_cka(X, X @ A), abs=1e-10)
    assert value < 0.9
    assert float(cka(X, X @ random_orthogonal(10, seed=10))) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(
    "n,d1,d2",
    [(60, 5, 5), (60, 4, 11), (7, 30, 20), (12, 12, 3)],
    ids=["square-equal-d", "d1-ne-d2", "n-lt-d", "n-eq-d1"],
)
def test_cka_matches_hsic_formula_reference(n: int, d1: int, d2: int) -> None:
    X = randn(n, d1, seed=11)
    Y = 0.3 * X.sum(-1, keepdim=True) + randn(n, d2, seed=12)
    assert float(cka(X, Y)) == pytest.approx(reference_cka(X, Y), abs=1e-5)


@pytest.mark.parametrize("n,d1,d2", [(60, 4, 11), (7, 30, 20), (5, 3, 2)], ids=["n-gt-d", "n-lt-d", "n-5"])
def test_debiased_cka_matches_unbiased_hsic_reference(n: int, d1: int, d2: int) -> None:
    X = randn(n, d1, seed=13, dtype=F64)
    Y = 0.5 * X[:, :1] + randn(n, d2, seed=14, dtype=F64)
    assert float(cka(X, Y, debiased=True)) == pytest.approx(reference_debiased_cka(X, Y), abs=1e-10)


def test_debiased_cka_is_lower_than_biased_for_unrelated_inputs_with_n_below_d() -> None:
    # Biased CKA of independent noise is inflated when n << d; the unbiased estimator sits near 0.
    X, Y = randn(10, 200, seed=15, dtype=F64), randn(10, 200, seed=16, dtype=F64)
    biased, debiased = float(cka(X, Y)), float(cka(X, Y, debiased=True))
    assert biased > 0.5
    assert abs(debiased) < 0.2


@pytest.mark.parametrize("debiased", [False, True])
def test_gram_and_feature_forms_agree(debiased: bool) -> None:
    # Zero feature columns leave X X^T unchanged, so CKA must not move, but they flip the cheaper form.
    X = randn(40, 5, seed=17, dtype=F64)
    Y = X @ randn(5, 7, seed=18, dtype=F64) + randn(40, 7, seed=19, dtype=F64)
    X_wide = torch.cat([X, torch.zeros(40, 300, dtype=F64)], dim=-1)
    assert not _use_gram_form(40, 5, 7)
    assert _use_gram_form(40, 305, 7)
    assert float(cka(X_wide, Y, debiased=debiased)) == pytest.approx(
        float(cka(X, Y, debiased=debiased)), abs=1e-12
    )


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_batched_over_layers_equals_per_layer_calls(debiased: bool) -> None:
    X = randn(3, 20, 6, seed=20)
    Y = X[..., :4].repeat(1, 1, 2) + randn(3, 20, 8, seed=21)
    batched = cka(X, Y, debiased=debiased)
    assert batched.shape == (3,)
    per_layer = torch.stack([cka(X[i], Y[i], debiased=debiased) for i in range(3)])
    torch.testing.assert_close(batched, per_layer, atol=1e-6, rtol=0)


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_mask_equals_slicing_and_ignores_garbage_rows(debiased: bool) -> None:
    X, Y = randn(2, 30, 6, seed=22), randn(2, 30, 9, seed=23)
    mask = randn(30, seed=24) > -0.3
    X[:, ~mask] = float("nan")
    Y[:, ~mask] = 1e30
    masked = cka(X, Y, debiased=debiased, mask=mask)
    sliced = cka(X[:, mask], Y[:, mask], debiased=debiased)
    torch.testing.assert_close(masked, sliced, atol=0, rtol=0)
    reference = reference_debiased_cka if debiased else reference_cka
    assert float(masked[0]) == pytest.approx(reference(X[0, mask], Y[0, mask]), abs=1e-5)


def test_cka_float64_inputs_keep_float64_precision() -> None:
    X = randn(25, 9, seed=25, dtype=F64)
    Y = torch.tanh(X @ randn(9, 13, seed=26, dtype=F64))
    out = cka(X, Y)
    assert out.dtype == F64
    assert float(out) == pytest.approx(reference_cka(X, Y), abs=1e-12)
    out_debiased = cka(X, Y, debiased=True)
    assert out_debiased.dtype == F64
    assert float(out_debiased) == pytest.approx(reference_debiased_cka(X, Y), abs=1e-12)


def test_cka_low_precision_inputs_are_computed_in_float32() -> None:
    X = randn(30, 8, seed=27).to(torch.bfloat16)
    Y = randn(30, 5, seed=28).to(torch.float16)
    out = cka(X, Y)
    assert out.dtype == torch.float32
    assert float(out) == pytest.approx(reference_cka(X.float(), Y.float()), abs=1e-5)


# ------------------------------------------------------------------------------------------- midness

HB = torch.tensor([3.0, 0.0, 0.0, 0.0])
HF = torch.tensor([0.0, 4.0, 0.0, 0.0])


def test_paper_slerp_at_half_is_the_exact_midpoint() -> None:
    # theta = 90 degrees, so the sin weights are equal: direction (u+v)/|u+v|, norm 0.5*3 + 0.5*4 = 3.5.
    u, v = HB / 3.0, HF / 4.0
    hm = 3.5 * (u + v) / (u + v).norm()
    result = mid(HB, HF, hm)
    assert isinstance(result, Midness)
    assert float(result.midpoint_cos) == pytest.approx(1.0, abs=1e-6)
    assert float(result.arc_ratio) == pytest.approx(0.5, abs=1e-6)
    assert float(result.arc_deviation) == pytest.approx(0.0, abs=1e-6)


def test_lerp_at_half_matches_hand_computed_values() -> None:
    hm = 0.5 * HB + 0.5 * HF  # [1.5, 2, 0, 0], unit vector [0.6, 0.8, 0, 0]
    result = mid(HB, HF, hm)
    angle = math.atan2(2.0, 1.5)  # d(b, m) = 0.9273 rad = 53.13 deg from the x-axis (the base)
    # Midpoint of x and y axes is [1, 1]/sqrt(2): cos = (0.6 + 0.8)/sqrt(2) = cos(angle - 45 deg) = 0.98995.
    assert float(result.midpoint_cos) == pytest.approx(1.4 / math.sqrt(2), abs=1e-6)
    assert float(result.midpoint_cos) == pytest.approx(math.cos(angle - math.pi / 4), abs=1e-6)
    # d(b, f) = 90 deg: arc_ratio = 0.9273 / 1.5708 = 0.5903, arc_deviation = 0.9273 - 0.7854 = 0.1419.
    assert float(result.arc_ratio) == pytest.approx(angle / (math.pi / 2), abs=1e-6)
    assert float(result.arc_deviation) == pytest.approx(angle - math.pi / 4, abs=1e-6)
    assert float(result.arc_ratio) == pytest.approx(0.5903345, abs=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.37, 0.5, 0.8, 1.0])
def test_slerp_at_alpha_gives_arc_ratio_alpha(alpha: float) -> None:
    hb, hf = randn(6, 16, seed=30, dtype=F64), 3.0 * randn(6, 16, seed=31, dtype=F64)
    result = mid(hb, hf, slerp(hb, hf, alpha))
    ref = reference_midness(hb, hf, hf)  # arc_deviation at hm = hf is d(b, f) / 2
    torch.testing.assert_close(result.arc_ratio, torch.full((6,), alpha, dtype=F64), atol=1e-10, rtol=0)
    torch.testing.assert_close(result.arc_deviation, abs(alpha - 0.5) / 0.5 * ref["arc_deviation"])
    if alpha == 0.5:
        torch.testing.assert_close(result.midpoint_cos, torch.ones(6, dtype=F64), atol=1e-12, rtol=0)


def test_midness_matches_reference_per_token() -> None:
    hb, hf, hm = (randn(2, 5, 12, seed=s) for s in (32, 33, 34))
    result = mid(hb, hf, hm)
    for name, expected in reference_midness(hb, hf, hm).items():
        torch.testing.assert_close(getattr(result, name).double(), expected, atol=1e-5, rtol=0)
    assert result.midpoint_cos.shape == (2, 5)


def test_midness_mean_excludes_padding_positions() -> None:
    hb, hf, hm = (randn(2, 5, 8, seed=s) for s in (35, 36, 37))
    mask = torch.tensor([[True, True, True, False, False], [False, True, True, True, True]])  # right/left pad
    clean = mid(hb, hf, hm, mask)
    expected = {name: float(values[mask].mean()) for name, values in reference_midness(hb, hf, hm).items()}
    for name, value in clean.mean().items():
        assert value == pytest.approx(expected[name], abs=1e-6)
    assert clean.n_tokens == 7

    garbage = [t.clone() for t in (hb, hf, hm)]
    garbage[0][~mask] = float("nan")
    garbage[1][~mask] = 1e30
    garbage[2][~mask] = -hb[~mask]
    dirty = mid(*garbage, mask)
    assert dirty.mean() == pytest.approx(clean.mean(), abs=1e-7)
    for name in ("midpoint_cos", "arc_ratio", "arc_deviation"):
        assert torch.isnan(getattr(dirty, name)[~mask]).all()  # padding cannot be averaged in by accident
        torch.testing.assert_close(getattr(dirty, name)[mask], getattr(clean, name)[mask])


def test_midness_batch_mask_broadcasts_over_leading_layers() -> None:
    hb, hf, hm = (randn(3, 2, 4, 6, seed=s) for s in (38, 39, 40))
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    broadcast = mid(hb, hf, hm, mask)
    full = mid(hb, hf, hm, mask.expand(3, 2, 4))
    assert broadcast.mean() == full.mean()
    assert broadcast.n_tokens == 3 * 6


def test_antiparallel_base_and_ft_use_the_nearest_midpoint() -> None:
    hb, hf = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([-2.0, 0.0, 0.0])
    # Every unit vector orthogonal to x is a midpoint: [1, 1, 0] is 45 deg from the nearest one, [0, 1, 0].
    result = mid(hb, hf, torch.tensor([1.0, 1.0, 0.0]))
    assert float(result.midpoint_cos) == pytest.approx(1 / math.sqrt(2), abs=1e-6)
    assert float(result.arc_ratio) == pytest.approx((math.pi / 4) / math.pi, abs=1e-6)
    assert float(result.arc_deviation) == pytest.approx(math.pi / 4, abs=1e-6)
    assert float(mid(hb, hf, torch.tensor([0.0, 0.0, 5.0])).midpoint_cos) == pytest.approx(1.0, abs=1e-6)
    assert float(mid(hb, hf, hb).midpoint_cos) == pytest.approx(0.0, abs=1e-6)


def test_coinciding_base_and_ft_give_arc_ratio_zero() -> None:
    hb = torch.tensor([1.0, 2.0, 3.0, 0.0])
    hm = torch.tensor([1.0, 0.0, 0.0, 1.0])
    result = mid(hb, 2.0 * hb, hm)  # same direction, different norm: the arc has no length
    u, w = hb / hb.norm(), hm / hm.norm()
    angle = math.acos(float(u @ w))
    assert float(result.arc_ratio) == 0.0
    assert float(result.arc_deviation) == pytest.approx(angle, abs=1e-6)
    assert float(result.midpoint_cos) == pytest.approx(float(u @ w), abs=1e-6)
    assert float(mid(hb, hb, hb).arc_ratio) == 0.0


def test_zero_vectors_give_finite_values() -> None:
    zero, x, y = torch.zeros(2), torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # A zero vector is pi/2 from every direction: d(b, f) = d(b, m) = pi/2.
    result = mid(zero, x, y)
    assert float(result.arc_ratio) == pytest.approx(1.0, abs=1e-6)
    for hb, hf, hm in [(zero, zero, zero), (x, zero, y), (x, y, zero), (zero, zero, x)]:
        r = mid(hb, hf, hm)
        values = torch.stack([r.midpoint_cos, r.arc_ratio, r.arc_deviation])
        assert torch.isfinite(values).all()


def test_midness_float64_inputs_keep_float64_precision() -> None:
    hb, hf, hm = (randn(4, 7, 10, seed=s, dtype=F64) for s in (41, 42, 43))
    result = mid(hb, hf, hm)
    for name, expected in reference_midness(hb, hf, hm).items():
        values = getattr(result, name)
        assert values.dtype == F64
        torch.testing.assert_close(values, expected, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------------------- bad input


def test_cka_rejects_mismatched_rows_naming_n() -> None:
    with pytest.raises(LatentMergeError, match=r"n=5 for X .* n=6 for Y"):
        linear_cka(randn(5, 3, seed=0), randn(6, 3, seed=0))


def test_runtime_type_checking_also_rejects_mismatched_rows() -> None:
    with pytest.raises(TypeCheckError):
        cka(randn(5, 3, seed=0), randn(6, 3, seed=0))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("which", ["X", "Y"])
def test_cka_rejects_non_finite_values_naming_the_parameter(bad: float, which: str) -> None:
    X, Y = randn(6, 3, seed=1), randn(6, 4, seed=2)
    (X if which == "X" else Y)[2, 1] = bad
    with pytest.raises(LatentMergeError, match=rf"^{which} contains 1 NaN/inf"):
        linear_cka(X, Y)


def test_cka_rejects_an_empty_mask() -> None:
    with pytest.raises(LatentMergeError, match=r"mask .* selects no tokens"):
        linear_cka(randn(6, 3, seed=1), randn(6, 4, seed=2), mask=torch.zeros(6, dtype=torch.bool))


@pytest.mark.parametrize(
    "mask,pattern",
    [
        (torch.ones(6, dtype=torch.long), r"mask must be a bool tensor; got dtype torch.int64"),
        (torch.ones(5, dtype=torch.bool), r"mask must have shape \(6,\).*got shape \(5,\)"),
    ],
)
def test_cka_rejects_a_malformed_mask(mask: torch.Tensor, pattern: str) -> None:
    with pytest.raises(LatentMergeError, match=pattern):
        linear_cka(randn(6, 3, seed=1), randn(6, 4, seed=2), mask=mask)


@pytest.mark.parametrize(
    "x_shape,y_shape,pattern",
    [
        ((6,), (6, 2), r"^X must have shape \[n, d\] or \[layers, n, d\].*rank 1"),
        ((2, 3, 6, 4), (2, 3, 6, 4), r"^X must have shape .*rank 4.*rearrange"),
        ((6, 4), (2, 6, 4), r"X and Y must both be"),
        ((2, 6, 4), (3, 6, 4), r"layers=2 for X and layers=3 for Y"),
    ],
)
def test_cka_rejects_wrong_ranks(x_shape: tuple, y_shape: tuple, pattern: str) -> None:
    with pytest.raises(LatentMergeError, match=pattern):
        linear_cka(randn(*x_shape, seed=1), randn(*y_shape, seed=2))


@pytest.mark.parametrize("debiased,n,minimum", [(False, 1, 2), (True, 3, 4)])
def test_cka_rejects_too_few_rows(debiased: bool, n: int, minimum: int) -> None:
    with pytest.raises(LatentMergeError, match=rf"needs n >= {minimum} rows .*got n={n}"):
        linear_cka(randn(n, 3, seed=1), randn(n, 4, seed=2), debiased=debiased)


def test_cka_rejects_too_few_rows_after_mask() -> None:
    mask = torch.tensor([True, False, False, False, False, False])
    with pytest.raises(LatentMergeError, match=r"got n=1 after applying mask"):
        linear_cka(randn(6, 3, seed=1), randn(6, 4, seed=2), mask=mask)


def test_cka_rejects_a_constant_representation_naming_the_layer() -> None:
    X = randn(2, 6, 3, seed=1)
    X[1] = torch.tensor([0.1, 0.2, 0.3])  # every token identical in layer 1
    with pytest.raises(
        LatentMergeError, match=r"^X has \(numerically\) zero variance.*layer index\(es\) \[1\]"
    ):
        linear_cka(X, randn(2, 6, 4, seed=2))


def test_debiased_cka_rejects_a_non_positive_self_hsic() -> None:
    # n=4, d=1, three equal tokens: the unbiased HSIC of X with itself is exactly 0 (checked here by hand).
    X = torch.tensor([[3.0], [-1.0], [-1.0], [-1.0]], dtype=F64)
    assert reference_unbiased_hsic(X @ X.T, X @ X.T) == pytest.approx(0.0, abs=1e-12)
    Y = randn(4, 2, seed=3, dtype=F64)
    with pytest.raises(LatentMergeError, match=r"debiased CKA is undefined.*n=4 rows.*debiased=False"):
        linear_cka(X, Y, debiased=True)
    assert 0.0 <= float(linear_cka(X, Y)) <= 1.0  # the biased estimator is still defined


def test_cka_rejects_integer_inputs() -> None:
    with pytest.raises(LatentMergeError, match=r"^Y must be a floating-point tensor; got dtype torch.int64"):
        linear_cka(randn(6, 3, seed=1), torch.ones(6, 3, dtype=torch.long))


@pytest.mark.parametrize("which", ["hf", "hm"])
def test_midness_rejects_mismatched_shapes_naming_the_parameter(which: str) -> None:
    args = {"hb": randn(2, 4, 8, seed=1), "hf": randn(2, 4, 8, seed=2), "hm": randn(2, 4, 8, seed=3)}
    args[which] = randn(2, 5, 8, seed=4)
    with pytest.raises(LatentMergeError, match=rf"^{which} must have the same shape as hb \(2, 4, 8\)"):
        midness(**args)


@pytest.mark.parametrize("which", ["hb", "hf", "hm"])
def test_midness_rejects_nan_at_real_tokens_naming_the_parameter(which: str) -> None:
    args = {"hb": randn(2, 4, 8, seed=1), "hf": randn(2, 4, 8, seed=2), "hm": randn(2, 4, 8, seed=3)}
    args[which][1, 2, 0] = float("nan")
    with pytest.raises(LatentMergeError, match=rf"^{which} contains 1 NaN/inf value\(s\) at its tokens"):
        midness(**args)


def test_midness_rejects_an_empty_mask() -> None:
    hb, hf, hm = (randn(2, 4, 8, seed=s) for s in (1, 2, 3))
    with pytest.raises(LatentMergeError, match=r"^mask of shape \(2, 4\) selects no tokens"):
        midness(hb, hf, hm, torch.zeros(2, 4, dtype=torch.bool))


def test_midness_rejects_a_mask_of_the_wrong_shape() -> None:
    hb, hf, hm = (randn(2, 4, 8, seed=s) for s in (1, 2, 3))
    with pytest.raises(
        LatentMergeError, match=r"^mask must have the leading shape of hb \(2, 4\).*got shape \(4, 2\)"
    ):
        midness(hb, hf, hm, torch.ones(4, 2, dtype=torch.bool))


def test_midness_rejects_inputs_without_tokens() -> None:
    with pytest.raises(LatentMergeError, match=r"^hb has no tokens"):
        midness(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, 4))
