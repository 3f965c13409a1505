"""lmn.analysis.representations against CKA and midness computed by hand from plain-hook captures."""

import copy
import math

import pytest
import torch
from reference import position_ids, ref_op
from tiny import hf_pair, make_tokenizer, pair

import latent_merge_nnsight as lmn
from latent_merge_nnsight import LatentMergeError
from latent_merge_nnsight.analysis import representations, summarize
from latent_merge_nnsight.inputs import encode

PROMPTS = ["The cat sat on the mat.", "Hi!", "Merging in latent space", "abc xyz", "one two three four"]
N_LAYERS = 4


@pytest.fixture(scope="module")
def models():
    base, ft = pair("qwen2", n_layers=N_LAYERS)
    avg = copy.deepcopy(base._module)
    with torch.no_grad():
        for p_avg, p_ft in zip(avg.parameters(), ft._module.parameters(), strict=True):
            p_avg.copy_(0.5 * p_avg + 0.5 * p_ft)
    weight = lmn.wrap(avg, make_tokenizer(), name="tiny-weight-avg")
    return base, ft, weight


# ---------------------------------------------------------------- an independent reference, by hand


def hook_states(hf_model, ids, mask, merge=None):
    """Residual entering every block and leaving the last one (index n), by plain hooks.

    merge: (layer, site, op, source_states {index: tensor}, alpha, positions) applied by a hook first.
    """
    blocks = hf_model.model.layers
    n = len(blocks)
    got, handles = {}, []
    if merge is not None:
        layer, site, op, src, alpha, positions = merge

        def mix(h, index):
            h = h.clone()
            for row in range(h.shape[0]):
                real = [t for t in range(h.shape[1]) if mask[row, t]]
                for t in real[-1:] if positions == "last" else real:
                    h[row, t] = ref_op(op, h[row, t], [src[index][row, t]], alpha)
            return h

        if site == "pre":
            handles.append(blocks[layer].register_forward_pre_hook(lambda m, a: (mix(a[0], layer), *a[1:])))
        else:
            handles.append(blocks[layer].register_forward_hook(lambda m, a, o: mix(o, layer + 1)))
    for i in range(n):
        handles.append(blocks[i].register_forward_pre_hook(lambda m, a, i=i: got.setdefault(i, a[0].clone())))
    handles.append(blocks[n - 1].register_forward_hook(lambda m, a, o: got.setdefault(n, o.clone())))
    try:
        with torch.no_grad():
            hf_model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask))
    finally:
        for h in handles:
            h.remove()
    return got


def hsic_cka(x, y):
    """Linear CKA from the HSIC formula with an explicit centring matrix."""
    n = x.shape[0]
    h = torch.eye(n, dtype=x.dtype) - torch.full((n, n), 1.0 / n, dtype=x.dtype)
    k, l_ = x @ x.T, y @ y.T

    def hsic(a, b):
        return torch.trace(a @ h @ b @ h) / (n - 1) ** 2

    return float(hsic(k, l_) / torch.sqrt(hsic(k, k) * hsic(l_, l_)))


def hand_midness(hb, hf, hm):
    u = hb / hb.norm(dim=-1, keepdim=True)
    v = hf / hf.norm(dim=-1, keepdim=True)
    w = hm / hm.norm(dim=-1, keepdim=True)

    def dist(a, b):
        return torch.acos(((a * b).sum(-1)).clamp(-1, 1))

    mid = (u + v) / (u + v).norm(dim=-1, keepdim=True)
    d_bf, d_bm = dist(u, v), dist(u, w)
    return {
        "midpoint_cos": float((w * mid).sum(-1).mean()),
        "arc_ratio": float((d_bm / d_bf).mean()),
        "arc_deviation": float((d_bm - d_bf / 2).abs().mean()),
    }


def rows_of(states, select):
    return {i: s[select] for i, s in states.items()}


def expected_table(base, ft, weight, op, layer, alpha, site, positions, tokens):
    batch = encode(base.tokenizer, PROMPTS)
    ids, mask = batch.input_ids, batch.attention_mask
    hb = hook_states(base._module, ids, mask)
    hf = hook_states(ft._module, ids, mask)
    hm = hook_states(base._module, ids, mask, merge=(layer, site, op, hf, alpha, positions))
    hw = hook_states(weight._module, ids, mask)
    if tokens == "real":
        select = mask.bool()
    else:  # the merged positions of "last": each row's last real token
        last = torch.stack([torch.nonzero(r).max() for r in mask])
        select = torch.zeros_like(mask, dtype=torch.bool)
        select[torch.arange(len(last)), last] = True
    hb, hf, hm, hw = (rows_of(s, select) for s in (hb, hf, hm, hw))
    out = {}
    for label, merged in (("latent", hm), ("weight", hw)):
        for i in range(N_LAYERS + 1):
            out[(label, i)] = {
                "cka_base_ft": hsic_cka(hb[i], hf[i]),
                "cka_base_merged": hsic_cka(hb[i], merged[i]),
                "cka_ft_merged": hsic_cka(hf[i], merged[i]),
                **hand_midness(hb[i], hf[i], merged[i]),
            }
    return out, int(select.sum())


# --------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    "op, layer, alpha, site, positions, tokens",
    [
        ("slerp", 2, 0.5, "pre", "all", "real"),
        ("lerp", 1, 0.3, "post", "all", "real"),
        ("slerp", 2, 0.7, "pre", "last", "merged"),
    ],
)
def test_table_matches_metrics_computed_by_hand_from_hook_captures(
    models, op, layer, alpha, site, positions, tokens
):
    base, ft, weight = models
    recipe = lmn.Recipe(op=op, layers={layer: alpha}, site=site, positions=positions)
    df = representations(base, ft, recipe, PROMPTS, weight_merged=weight, tokens=tokens, batch_size=2)
    expected, n_tokens = expected_table(base, ft, weight, op, layer, alpha, site, positions, tokens)
    assert len(df) == 2 * (N_LAYERS + 1)
    for row in df.itertuples():
        assert row.n_tokens == n_tokens
        for metric, value in expected[(row.merge, row.layer)].items():
            got = getattr(row, metric)
            if math.isnan(value):
                assert math.isnan(got), (row.merge, row.layer, metric)
            else:
                assert got == pytest.approx(value, abs=1e-7), (row.merge, row.layer, metric)


def test_layers_below_the_merge_are_marked_unaffected_and_equal_the_base(models):
    base, ft, _ = models
    df = representations(base, ft, lmn.Recipe(op="slerp", layers={2: 0.5}, positions="all"), PROMPTS)
    latent = df.set_index("layer")
    assert list(latent.index) == list(range(N_LAYERS + 1))
    assert list(latent["affected"]) == [False, False, True, True, True]
    assert list(latent["site"]) == [
        "layers.0.resid_pre",
        "layers.1.resid_pre",
        "layers.2.resid_pre",
        "layers.3.resid_pre",
        "layers.3.resid_post",
    ]
    below = latent.loc[[0, 1]]
    assert (below["cka_base_merged"] - 1.0).abs().max() < 1e-12
    assert below["arc_ratio"].abs().max() == 0.0
    # at the merge layer itself every token is the paper's slerp at 0.5: the spherical midpoint, halfway
    assert latent.loc[2, "midpoint_cos"] == pytest.approx(1.0, abs=1e-9)
    assert latent.loc[2, "arc_ratio"] == pytest.approx(0.5, abs=1e-9)
    assert latent.loc[2, "arc_deviation"] == pytest.approx(0.0, abs=1e-7)


def test_site_post_moves_the_first_affected_index_up_by_one(models):
    base, ft, _ = models
    df = representations(
        base, ft, lmn.Recipe(op="lerp", layers={1: 0.5}, site="post", positions="all"), PROMPTS
    )
    assert list(df["affected"]) == [False, False, True, True, True]
    affected = representations(
        base,
        ft,
        lmn.Recipe(op="lerp", layers={1: 0.5}, site="post", positions="all"),
        PROMPTS,
        layers="affected",
    )
    assert list(affected["layer"]) == [2, 3, 4]


def test_alpha_zero_weight_merge_is_the_base(models):
    base, ft, _ = models
    same = lmn.wrap(copy.deepcopy(base._module), make_tokenizer(), name="copy-of-base")
    df = representations(
        base,
        ft,
        lmn.Recipe(op="slerp", layers={1: 0.0}, positions="all"),
        PROMPTS,
        weight_merged={"w0": same},
    )
    for label in ("latent", "w0"):
        rows = df[df["merge"] == label]
        assert (rows["cka_base_merged"] - 1.0).abs().max() < 1e-12
        assert rows["arc_ratio"].abs().max() == 0.0
        assert rows["cka_ft_merged"].tolist() == pytest.approx(rows["cka_base_ft"].tolist(), abs=1e-12)


def test_summarize_averages_every_merge_over_the_latent_affected_layers(models):
    base, ft, weight = models
    df = representations(
        base, ft, lmn.Recipe(op="slerp", layers={2: 0.5}, positions="all"), PROMPTS, weight_merged=weight
    )
    table = summarize(df)
    assert list(table.index) == ["latent", "weight"]
    for label in ("latent", "weight"):
        rows = df[(df["merge"] == label) & (df["layer"] >= 2)]
        assert table.loc[label, "n_layers"] == 3
        for metric in ("cka_base_merged", "midpoint_cos", "arc_ratio"):
            assert table.loc[label, metric] == pytest.approx(sum(rows[metric]) / 3, abs=1e-12)


def test_regmean_with_two_sources_uses_the_first_as_ft(models):
    base, ft, _ = models
    _, other = hf_pair("qwen2", N_LAYERS, 32, seed=0, dtype=torch.float64, noise=0.2)
    ft2 = lmn.wrap(other, make_tokenizer(), name="tiny-ft2")
    df = representations(
        base, [ft, ft2], lmn.Recipe(op="regmean", layers={2: 0.5}, positions="all"), PROMPTS, layers=[2]
    )
    batch = encode(base.tokenizer, PROMPTS)
    ids, mask = batch.input_ids, batch.attention_mask
    hb = hook_states(base._module, ids, mask)[2][mask.bool()]
    hf = hook_states(ft._module, ids, mask)[2][mask.bool()]
    h2 = hook_states(other, ids, mask)[2][mask.bool()]
    merged = 0.5 * hb + 0.5 * (0.5 * hf + 0.5 * h2)
    assert df.loc[0, "cka_base_merged"] == pytest.approx(hsic_cka(hb, merged), abs=1e-9)
    assert df.loc[0, "midpoint_cos"] == pytest.approx(hand_midness(hb, hf, merged)["midpoint_cos"], abs=1e-9)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tokens="every"), r"tokens='every'; expected one of: merged, real, last"),
        (dict(layers=[0, 5]), r"layers\[1\]=5 is out of range; expected 0 <= layer <= 4"),
        (dict(layers="some"), r"layers='some'; expected 'all', 'affected'"),
        (dict(batch_size=0), r"batch_size=0; expected an int >= 1"),
        (dict(prompts=[]), r"prompts=\[\]"),
        (dict(prompts=["fine", 3]), r"prompts\[1\] has type int; expected a string or a chat"),
        (
            dict(recipe=dict(op="slrep", layers={1: 0.5})),
            r"recipe is not a valid Recipe: field op: unknown op .slrep.; expected one of: delta",
        ),
        (dict(recipe=lmn.Recipe(op="slerp", layers={9: 0.5})), r"recipe field 'layers': \[9\] out of range"),
        (dict(prompts=["only one prompt"], tokens="last"), r"tokens='last' selects 1 token\(s\) over 1"),
    ],
)
def test_bad_input_names_the_parameter(models, kwargs, message):
    base, ft, _ = models
    args = (
        dict(base=base, sources=ft, recipe=lmn.Recipe(op="slerp", layers={1: 0.5}), prompts=PROMPTS) | kwargs
    )
    with pytest.raises(LatentMergeError, match=message):
        representations(**args)


def test_incompatible_weight_merged_model_is_refused_before_any_forward(models):
    base, ft, _ = models
    wide, _ = hf_pair("qwen2", N_LAYERS, hidden=48)
    other = lmn.wrap(wide, make_tokenizer(), name="wide")
    with pytest.raises(
        LatentMergeError, match=r"hidden_size differs: base tiny-qwen2-base has 32, source wide"
    ):
        representations(base, ft, lmn.Recipe(op="slerp", layers={1: 0.5}), PROMPTS, weight_merged=other)
