"""Merge operators against hand-computed values, formulas written in the test, and invariances."""

import math

import pytest
import torch
from beartype import beartype
from jaxtyping import jaxtyped
from reference import ref_slerp

from latent_merge_nnsight import LatentMergeError, ops
from latent_merge_nnsight.ops import get_op, list_ops, register_op

lerp = jaxtyped(typechecker=beartype)(ops.lerp)
slerp = jaxtyped(typechecker=beartype)(ops.slerp)
regmean = jaxtyped(typechecker=beartype)(ops.regmean)
delta = jaxtyped(typechecker=beartype)(ops.delta)

HB = torch.tensor([3.0, 0.0, 0.0, 0.0])
HS = torch.tensor([0.0, 4.0, 0.0, 0.0])


def test_lerp_hand_computed():
    assert torch.equal(lerp(HB, HS, 0.5), torch.tensor([1.5, 2.0, 0.0, 0.0]))
    assert torch.allclose(lerp(HB, HS, 0.25), torch.tensor([2.25, 1.0, 0.0, 0.0]))


def test_slerp_hand_computed_orthogonal():
    # theta = 90 degrees: equal sin weights, direction (x+y)/sqrt(2), norm 0.5*3 + 0.5*4 = 3.5
    out = slerp(HB, HS, 0.5)
    expected = torch.tensor([3.5 / math.sqrt(2), 3.5 / math.sqrt(2), 0.0, 0.0])
    assert torch.allclose(out, expected, atol=1e-6)
    # alpha = 1/3: angle to hb is 30 degrees, norm 2/3*3 + 1/3*4 = 10/3
    out = slerp(HB, HS, 1 / 3)
    n = 10 / 3
    assert torch.allclose(
        out, torch.tensor([n * math.cos(math.pi / 6), n * math.sin(math.pi / 6), 0, 0]), atol=1e-5
    )


@pytest.mark.parametrize("fn", [lerp, slerp])
def test_alpha_zero_returns_base_bitwise_and_one_returns_source(fn):
    hb = torch.randn(3, 5, 16, dtype=torch.bfloat16)
    hs = torch.randn(3, 5, 16, dtype=torch.bfloat16)
    assert torch.equal(fn(hb, hs, 0.0), hb)
    assert torch.equal(fn(hb, hs, 1.0), hs)


def test_regmean_and_delta_alpha_zero_bitwise():
    hb = torch.randn(2, 7, 16)
    assert torch.equal(regmean(hb, torch.randn(3, 2, 7, 16), 0.0), hb)
    assert torch.equal(delta(hb, torch.randn(16), 0.0), hb)


def test_slerp_norm_and_angle_properties():
    torch.manual_seed(1)
    hb = torch.randn(64, 32, dtype=torch.float64)
    hs = torch.randn(64, 32, dtype=torch.float64) * 3
    for a in (0.1, 0.3, 0.5, 0.9):
        out = slerp(hb, hs, a)
        norm = (1 - a) * hb.norm(dim=-1) + a * hs.norm(dim=-1)
        assert torch.allclose(out.norm(dim=-1), norm, atol=1e-9)
        cos = lambda x, y: (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))  # noqa: E731
        theta = torch.acos(cos(hb, hs))
        assert torch.allclose(torch.acos(cos(out, hb).clamp(-1, 1)), a * theta, atol=1e-7)


def test_slerp_matches_scalar_reference():
    torch.manual_seed(2)
    hb = torch.randn(20, 24, dtype=torch.float64)
    hs = torch.randn(20, 24, dtype=torch.float64)
    out = slerp(hb, hs, 0.37)
    for i in range(20):
        assert torch.allclose(out[i], ref_slerp(hb[i], hs[i], 0.37), atol=1e-12)


def test_slerp_small_angle_uses_linear_direction():
    hb = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    hs = torch.tensor([2.0, 1e-5, 0.0], dtype=torch.float64)  # theta = 5e-6 < 1e-3
    out = slerp(hb, hs, 0.5)
    assert torch.allclose(out, ref_slerp(hb, hs, 0.5), atol=1e-12)
    assert torch.allclose(out.norm(), torch.tensor(1.5, dtype=torch.float64))


@pytest.mark.parametrize("a", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_slerp_edge_cases_are_finite(a):
    x = torch.tensor([1.0, 2.0, -1.0, 0.5])
    zero = torch.zeros(4)
    for hb, hs in [(x, -x), (x, 2 * x), (zero, x), (x, zero), (zero, zero), (x, -3 * x)]:
        out = slerp(hb, hs, a)
        assert torch.isfinite(out).all(), (hb, hs, a)


def test_slerp_documented_edge_values():
    x = torch.tensor([1.0, 2.0, -1.0, 0.5], dtype=torch.float64)
    # a zero side contributes no direction: slerp(0, hs, a) = a*hs, slerp(hb, 0, a) = (1-a)*hb
    assert torch.allclose(slerp(torch.zeros(4, dtype=torch.float64), x, 0.3), 0.3 * x, atol=1e-8)
    assert torch.allclose(slerp(x, torch.zeros(4, dtype=torch.float64), 0.3), 0.7 * x, atol=1e-8)
    # exactly antiparallel at 0.5: the linear blend of directions is zero, so is the result
    assert torch.allclose(slerp(x, -x, 0.5), torch.zeros(4, dtype=torch.float64), atol=1e-8)
    # antiparallel at 0.25: direction (0.75u - 0.25u) = u, norm 0.75|x| + 0.25|2x|
    out = slerp(x, -2 * x, 0.25)
    assert torch.allclose(out, x / x.norm() * (0.75 + 0.5) * x.norm(), atol=1e-8)


def test_ops_compute_in_float32_and_return_input_dtype():
    hb = torch.randn(4, 8, dtype=torch.bfloat16)
    hs = torch.randn(4, 8, dtype=torch.bfloat16)
    out = slerp(hb, hs, 0.5)
    assert out.dtype == torch.bfloat16
    ref = ops.slerp(hb.float(), hs.float(), 0.5).to(torch.bfloat16)
    assert torch.equal(out, ref)
    assert slerp(hb.double(), hs.double(), 0.5).dtype == torch.float64


def test_float64_stays_float64_precision():
    hb = torch.randn(8, dtype=torch.float64)
    hs = hb + 1e-12 * torch.randn(8, dtype=torch.float64)
    out = lerp(hb, hs, 0.5)
    assert torch.allclose(out, (hb + hs) / 2, atol=1e-15, rtol=0)


def test_regmean_formula_weights_and_lambda():
    hb = torch.randn(5, 8, dtype=torch.float64)
    s = torch.randn(2, 5, 8, dtype=torch.float64)
    # uniform weights, beta = alpha
    assert torch.allclose(regmean(hb, s, 0.4), 0.6 * hb + 0.4 * (s[0] + s[1]) / 2)
    # weights normalised: [1, 3] -> [0.25, 0.75]
    assert torch.allclose(
        regmean(hb, s, 0.4, weights=[1.0, 3.0]), 0.6 * hb + 0.4 * (0.25 * s[0] + 0.75 * s[1])
    )
    # lambda parametrisation: beta = 1/(1+lam); lam = 1 -> beta 0.5
    assert torch.allclose(regmean(hb, s, None, lam=1.0), 0.5 * hb + 0.5 * (s[0] + s[1]) / 2)
    # one source with weight 1 and beta = alpha is a lerp
    assert torch.allclose(regmean(hb, s[:1], 0.3), ops.lerp(hb, s[0], 0.3))


def test_regmean_rejects_alpha_and_lambda_together():
    with pytest.raises(LatentMergeError, match="not both"):
        ops.regmean(torch.zeros(4), torch.zeros(1, 4), 0.5, lam=1.0)
    with pytest.raises(LatentMergeError, match="weights has 3 entries for 2 sources"):
        ops.regmean(torch.zeros(4), torch.zeros(2, 4), 0.5, weights=[1, 1, 1])


def test_delta_broadcasts_a_vector_over_tokens():
    hb = torch.randn(2, 3, 8)
    d = torch.randn(8)
    assert torch.allclose(delta(hb, d, 2.0), hb + 2.0 * d)


def test_registry_lists_names_on_unknown_op():
    with pytest.raises(LatentMergeError) as e:
        get_op("slrep")
    assert "unknown op 'slrep'; expected one of: " in str(e.value)
    for name in ("delta", "lerp", "regmean", "slerp"):
        assert name in str(e.value)


def test_register_op_checks_signature_and_is_usable_by_name():
    with pytest.raises(LatentMergeError, match=r"first three parameters must be \(hb, hs, alpha\)"):

        @register_op("bad_op")
        def bad(x, y, a):
            return x

    @register_op("test_maxnorm")
    def maxnorm(hb, hs, alpha, scale: float = 1.0):
        return (
            hb
            / hb.norm(dim=-1, keepdim=True)
            * torch.maximum(hb.norm(dim=-1, keepdim=True), hs.norm(dim=-1, keepdim=True))
            * scale
        )

    try:
        assert "test_maxnorm" in list_ops()
        spec = get_op("test_maxnorm")
        assert spec.params == ("scale",)
        out = spec(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0]), 0.5, scale=2.0)
        assert torch.allclose(out, torch.tensor([6.0, 0.0]))
        with pytest.raises(LatentMergeError, match="already registered"):
            register_op("test_maxnorm")(maxnorm)
    finally:
        ops._REGISTRY.pop("test_maxnorm", None)


def test_check_alpha_ranges():
    ops.check_alpha(0.0, "slerp")
    ops.check_alpha(1.0, "lerp")
    ops.check_alpha(4.0, "delta")  # steering strength: any finite value
    ops.check_alpha(1.5, "lerp", allow_extrapolation=True)
    with pytest.raises(LatentMergeError, match=r"alpha=1.5 is outside \[0, 1\] for op 'slerp'"):
        ops.check_alpha(1.5, "slerp")
    with pytest.raises(LatentMergeError, match="must be a finite number"):
        ops.check_alpha(float("nan"), "lerp")
    with pytest.raises(LatentMergeError, match="must be a finite number"):
        ops.check_alpha(float("inf"), "delta")


def test_check_weight_for_weight_merges_and_ensembles():
    assert ops.check_weight(1) == 1.0 and isinstance(ops.check_weight(1), float)
    assert ops.check_weight(-0.5, allow_extrapolation=True) == -0.5
    with pytest.raises(LatentMergeError, match=r"b=1.5 is outside \[0, 1\].*allow_extrapolation=True"):
        ops.check_weight(1.5, what="b")
    for bad in (float("nan"), True, "0.5"):
        with pytest.raises(LatentMergeError, match="must be a finite number"):
            ops.check_weight(bad)
