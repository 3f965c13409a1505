"""lmn.analysis plots: valid non-empty PNGs whose drawn data equal the table they were given."""

import io

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from PIL import Image

from latent_merge_nnsight import LatentMergeError
from latent_merge_nnsight.analysis import category_bars, geometry_curves, heatmaps, system_labels

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
OPS, LAYERS, ALPHAS, CATEGORIES = ("lerp", "slerp"), (1, 2, 4), (0.25, 0.5, 1.0), ("knowledge", "math")


def value(op, layer, alpha, category):
    return 0.1 * layer + alpha + (0.05 if op == "slerp" else 0.0) + (0.3 if category == "math" else 0.0)


@pytest.fixture
def sweep_df():
    rows = [("base", None, None, None, c, "accuracy", 0.4) for c in CATEGORIES]
    rows += [
        ("weight-lerp", None, None, None, c, "accuracy", 0.2 if c == "math" else 0.6) for c in CATEGORIES
    ]
    rows += [
        ("latent", op, layer, a, c, "accuracy", value(op, layer, a, c))
        for op in OPS
        for layer in LAYERS
        for a in ALPHAS
        for c in CATEGORIES
    ]
    df = pd.DataFrame(rows, columns=["system", "op", "layer", "alpha", "category", "metric", "value"])
    df["layer"] = df["layer"].astype("Int64")
    return df


@pytest.fixture
def rep_df():
    rows = []
    for merge, cka in (("latent", 0.9), ("weight", 0.4)):
        for layer in range(5):
            rows.append(
                {
                    "merge": merge,
                    "layer": layer,
                    "affected": merge == "weight" or layer >= 2,
                    "cka_base_ft": 0.8 - 0.05 * layer,
                    "cka_base_merged": cka - 0.01 * layer,
                    "cka_ft_merged": cka - 0.02 * layer,
                    "midpoint_cos": 0.7 + 0.01 * layer,
                    "arc_ratio": 0.5,
                    "arc_deviation": 0.1,
                }
            )
    return pd.DataFrame(rows)


def assert_valid_png(path, min_size=(200, 150)):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=float)
    assert image.shape[1] >= min_size[0] and image.shape[0] >= min_size[1]
    # non-trivial content: many distinct colours, not a blank canvas
    assert image.std() > 10
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50


def test_heatmaps_draw_one_panel_per_op_with_the_mean_over_categories(sweep_df, tmp_path):
    path = tmp_path / "heat.png"
    fig = heatmaps(sweep_df, "accuracy", path=path)
    assert isinstance(fig, Figure)
    assert_valid_png(path)
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in panels] == list(OPS)
    for ax, op in zip(panels, OPS, strict=True):
        drawn = np.asarray(ax.images[0].get_array())
        want = np.array(
            [[np.mean([value(op, layer, a, c) for c in CATEGORIES]) for a in ALPHAS] for layer in LAYERS]
        )
        np.testing.assert_allclose(drawn, want)
        assert [t.get_text() for t in ax.get_yticklabels()] == ["1", "2", "4"]
        assert [t.get_text() for t in ax.get_xticklabels()] == ["0.25", "0.5", "1"]
    # one colour scale for all panels, spanning every latent cell
    lo, hi = panels[0].images[0].get_clim()
    assert panels[1].images[0].get_clim() == (lo, hi)
    latent = sweep_df[sweep_df["system"] == "latent"].groupby(["op", "layer", "alpha"])["value"].mean()
    assert (lo, hi) == pytest.approx((latent.min(), latent.max()))
    assert "base: 0.40" in fig._suptitle.get_text() and "weight-lerp: 0.40" in fig._suptitle.get_text()


def test_heatmaps_of_one_category(sweep_df):
    fig = heatmaps(sweep_df, "accuracy", category="math", ops=["slerp"], annotate=False)
    (ax,) = [ax for ax in fig.axes if ax.images]
    drawn = np.asarray(ax.images[0].get_array())
    np.testing.assert_allclose(drawn[2, 0], value("slerp", 4, 0.25, "math"))


def test_geometry_curves_draw_each_merge_per_metric(rep_df, tmp_path):
    path = tmp_path / "geometry.png"
    fig = geometry_curves(rep_df, ["cka_base_merged", "midpoint_cos"], path=path)
    assert_valid_png(path)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 2
    lines = {line.get_label(): line for line in visible[0].get_lines()}
    assert set(lines) == {"latent", "weight", "CKA(base, FT)"}
    np.testing.assert_allclose(lines["weight"].get_ydata(), [0.4 - 0.01 * layer for layer in range(5)])
    np.testing.assert_allclose(lines["CKA(base, FT)"].get_ydata(), [0.8 - 0.05 * layer for layer in range(5)])
    # the layers the latent merge cannot touch (0 and 1) are shaded
    (span,) = visible[0].patches
    assert (span.get_x(), span.get_x() + span.get_width()) == (-0.5, 1.5)


def test_category_bars_draw_one_bar_per_system_and_category(sweep_df, tmp_path):
    chosen = sweep_df[
        (sweep_df["system"] != "latent")
        | ((sweep_df["op"] == "slerp") & (sweep_df["layer"] == 4) & (sweep_df["alpha"] == 0.5))
    ]
    path = tmp_path / "bars.png"
    fig = category_bars(chosen, "accuracy", path=path)
    assert_valid_png(path)
    (ax,) = fig.axes
    containers = ax.containers
    assert [c.get_label() for c in containers] == ["base", "weight-lerp", "latent slerp L4 a=0.5"]
    heights = {c.get_label(): [bar.get_height() for bar in c] for c in containers}
    assert heights["weight-lerp"] == pytest.approx([0.6, 0.2])
    assert heights["latent slerp L4 a=0.5"] == pytest.approx(
        [value("slerp", 4, 0.5, "knowledge"), value("slerp", 4, 0.5, "math")]
    )
    assert [t.get_text() for t in ax.get_xticklabels()] == list(CATEGORIES)


def test_system_labels(sweep_df):
    labels = system_labels(sweep_df)
    assert labels.iloc[0] == "base"
    assert "latent lerp L1 a=0.25" in set(labels)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda df, rep: heatmaps(df, "bleu"), r"metric='bleu' is not in df; expected one of: accuracy"),
        (lambda df, rep: heatmaps(df, "accuracy", category="art"), r"category='art' is not in df"),
        (lambda df, rep: heatmaps(df, "accuracy", ops=["regmean"]), r"ops\[0\]='regmean' is not in df"),
        (lambda df, rep: heatmaps(df.iloc[0:0], "accuracy"), r"df is empty"),
        (lambda df, rep: heatmaps(df.drop(columns="alpha"), "accuracy"), r"df lacks column\(s\) \['alpha'\]"),
        (lambda df, rep: heatmaps(df[df["system"] == "base"], "accuracy"), r"df has no latent cells"),
        (lambda df, rep: geometry_curves(rep, ["cka"]), r"metrics\[0\]='cka' is not a column of df"),
        (lambda df, rep: geometry_curves(rep, []), r"metrics=\[\] is empty"),
        (lambda df, rep: category_bars(df, "accuracy", systems=["ft"]), r"systems\[0\]='ft' is not in df"),
        (lambda df, rep: category_bars([1, 2], "accuracy"), r"df has type list; expected a pandas DataFrame"),
    ],
)
def test_bad_input_names_the_parameter(sweep_df, rep_df, call, message):
    with pytest.raises(LatentMergeError, match=message):
        call(sweep_df, rep_df)
