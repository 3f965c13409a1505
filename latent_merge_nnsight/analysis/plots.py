"""Figures for sweeps and representation tables (matplotlib).

Each function returns a `matplotlib.figure.Figure` and, given `path`, also writes it as a PNG. Figures are
built with the object-oriented API (`Figure()`, not `pyplot`), so they render with Agg on any machine,
headless or not, open no window and are not kept alive by pyplot. In Jupyter a returned figure shows as
the cell's value (or with `display(fig)`).

- `heatmaps(sweep_df, metric)`: layer x alpha grid of a metric, one panel per op.
- `geometry_curves(rep_df)`: CKA / midness against layer, one line per merge (latent vs weight).
- `category_bars(df, metric)`: one group of bars per category, one bar per system.
"""

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from latent_merge_nnsight.errors import LatentMergeError

__all__ = ["category_bars", "geometry_curves", "heatmaps", "system_labels"]

_DPI = 120
_TITLE_SIZE = 12
_LABEL_SIZE = 10

_GEOMETRY_LABELS = {
    "cka_base_ft": "CKA(base, FT)",
    "cka_base_merged": "CKA(base, merged)",
    "cka_ft_merged": "CKA(FT, merged)",
    "midpoint_cos": "midness (cos to spherical midpoint)",
    "arc_ratio": "arc ratio d(b,m)/d(b,f)",
    "arc_deviation": "arc deviation |d(b,m) - d(b,f)/2| (rad)",
}


def _require(df: object, columns: Sequence[str], what: str) -> pd.DataFrame:
    if not isinstance(df, pd.DataFrame):
        raise LatentMergeError(f"df has type {type(df).__name__}; expected a pandas DataFrame ({what})")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise LatentMergeError(f"df lacks column(s) {missing}; expected {what} with columns {list(columns)}")
    if df.empty:
        raise LatentMergeError(f"df is empty; expected {what}")
    return df


def _save(fig: Figure, path: str | Path | None) -> Figure:
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=_DPI, format="png")
    return fig


def _pick_metric(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    sub = df[df["metric"] == metric]
    if sub.empty:
        raise LatentMergeError(
            f"metric={metric!r} is not in df; expected one of: {', '.join(sorted(df['metric'].unique()))}"
        )
    return sub


def _over_categories(sub: pd.DataFrame, category: str | None) -> tuple[pd.DataFrame, str]:
    """Rows of one category, or the mean over categories (each cell's categories weigh the same)."""
    if category is not None:
        picked = sub[sub["category"] == category]
        if picked.empty:
            raise LatentMergeError(
                f"category={category!r} is not in df; expected one of: "
                f"{', '.join(sorted(sub['category'].unique()))}"
            )
        return picked, category
    cats = sorted(sub["category"].unique())
    return sub, ("mean over " + ", ".join(cats)) if len(cats) > 1 else cats[0]


def _chosen(name: str, what: str, given: Sequence[str] | None, present: list[str]) -> list[str]:
    """The `given` subset of `present` to draw (all of them when None); an empty or unknown pick is an error
    naming the parameter."""
    if given is None:
        return present
    chosen = list(given)
    if not chosen:
        raise LatentMergeError(f"{name}=[] is empty; expected at least one {what} to draw")
    for i, item in enumerate(chosen):
        if item not in present:
            expected = ", ".join(present)
            raise LatentMergeError(f"{name}[{i}]={item!r} is not in df; expected any of: {expected}")
    return chosen


def _fmt(v: float, span: float | None = None) -> str:
    """A short label; with `span` (the range of the values shown), enough decimals to tell them apart."""
    if not math.isfinite(v):
        return ""
    decimals = 2
    if span is not None and 0 < span < 1:
        decimals = min(6, max(2, 1 - math.floor(math.log10(span))))
    return f"{v:.{decimals}f}" if abs(v) < 1000 else f"{v:.4g}"


def heatmaps(
    df: pd.DataFrame,
    metric: str,
    *,
    category: str | None = None,
    ops: Sequence[str] | None = None,
    path: str | Path | None = None,
    cmap: str = "viridis",
    annotate: bool = True,
    title: str | None = None,
) -> Figure:
    """Layer (rows) x alpha (columns) heatmap of `metric` for each op of a sweep table.

    Arguments:
        df: the table of `lmn.sweep` (columns system, op, layer, alpha, category, metric, value).
        metric: which metric to colour by, e.g. "accuracy" or "nll".
        category: one category, or None for the mean over the categories present.
        ops: which ops (panels) to draw, in order; default all latent ops in df.
        path: also write a PNG here.
        annotate: print each cell's value.
    All panels share one colour scale; baseline systems (base, source, ...) are listed under the title.
    """
    df = _require(df, ["system", "op", "layer", "alpha", "category", "metric", "value"], "a sweep table")
    sub, cat_label = _over_categories(_pick_metric(df, metric), category)
    latent = sub[sub["system"] == "latent"]
    if latent.empty:
        raise LatentMergeError("df has no latent cells (system == 'latent') to draw")
    ops = _chosen("ops", "op", ops, list(dict.fromkeys(latent["op"])))
    grid = latent.groupby(["op", "layer", "alpha"])["value"].mean()
    layers = sorted(latent["layer"].dropna().unique())
    alphas = sorted(latent["alpha"].dropna().unique())
    finite = grid[np.isfinite(grid.to_numpy(dtype=float))]
    vmin, vmax = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    if vmin == vmax:
        vmin, vmax = vmin - 0.5, vmax + 0.5

    n = len(ops)
    width = max(3.2, 0.55 * len(alphas) + 1.6)
    height = max(2.8, 0.45 * len(layers) + 1.6)
    fig = Figure(figsize=(width * n + 1.2, height), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    image = None
    for ax, op in zip(axes, ops, strict=True):
        values = np.full((len(layers), len(alphas)), np.nan)
        for i, layer in enumerate(layers):
            for j, a in enumerate(alphas):
                key = (op, layer, a)
                if key in grid.index:
                    values[i, j] = grid[key]
        image = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", origin="lower")
        ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas], fontsize=_LABEL_SIZE - 1)
        ax.set_yticks(range(len(layers)), [str(int(layer)) for layer in layers], fontsize=_LABEL_SIZE - 1)
        ax.set_xlabel("alpha (weight of the source)", fontsize=_LABEL_SIZE)
        ax.set_ylabel("merge layer", fontsize=_LABEL_SIZE)
        ax.set_title(op, fontsize=_TITLE_SIZE)
        if annotate:
            mid = (vmin + vmax) / 2
            for i in range(len(layers)):
                for j in range(len(alphas)):
                    v = values[i, j]
                    if math.isfinite(v):
                        colour = "black" if v > mid else "white"
                        label = _fmt(v, span=float(finite.max() - finite.min()) if len(finite) else None)
                        ax.text(j, i, label, ha="center", va="center", fontsize=8, color=colour)
    fig.colorbar(image, ax=list(axes), shrink=0.9, label=metric)
    baselines = sub[sub["system"] != "latent"].groupby("system", sort=False)["value"].mean()
    head = title or f"{metric} ({cat_label})"
    if len(baselines):
        span = float(finite.max() - finite.min()) if len(finite) else None
        head += "\n" + ", ".join(f"{name}: {_fmt(float(v), span)}" for name, v in baselines.items())
    fig.suptitle(head, fontsize=_TITLE_SIZE)
    return _save(fig, path)


def geometry_curves(
    df: pd.DataFrame,
    metrics: Sequence[str] = ("cka_base_merged", "cka_ft_merged", "midpoint_cos", "arc_ratio"),
    *,
    path: str | Path | None = None,
    title: str | None = None,
) -> Figure:
    """Each metric of a `representations` table against layer, one line per merge (latent, weight, ...).

    Layers the latent merge cannot change (below its first affected layer) are shaded; CKA panels also
    show CKA(base, FT) as a grey reference line.
    """
    df = _require(df, ["merge", "layer", "affected"], "a representations table")
    metrics = list(metrics)
    if not metrics:
        raise LatentMergeError("metrics=[] is empty; expected at least one metric column")
    for i, m in enumerate(metrics):
        if m not in df.columns:
            raise LatentMergeError(
                f"metrics[{i}]={m!r} is not a column of df; expected any of: {', '.join(_GEOMETRY_LABELS)}"
            )
    n = len(metrics)
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(5.2 * cols, 3.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    latent = df[df["merge"] == "latent"]
    unaffected = latent.loc[~latent["affected"].astype(bool), "layer"]
    markers = ["o", "s", "^", "D", "v", "P"]
    for ax, metric in zip(axes, metrics, strict=False):
        if len(unaffected):
            ax.axvspan(
                float(unaffected.min()) - 0.5,
                float(unaffected.max()) + 0.5,
                color="0.9",
                label="unchanged by the latent merge",
            )
        for k, (merge, group) in enumerate(df.groupby("merge", sort=False)):
            group = group.sort_values("layer")
            ax.plot(group["layer"], group[metric], marker=markers[k % len(markers)], label=str(merge), lw=1.8)
        if metric.startswith("cka_") and metric != "cka_base_ft" and "cka_base_ft" in df.columns:
            ref = df.drop_duplicates("layer").sort_values("layer")
            ax.plot(ref["layer"], ref["cka_base_ft"], color="0.5", ls="--", lw=1.2, label="CKA(base, FT)")
        ax.set_xlabel("layer (residual entering block; last = final block output)", fontsize=_LABEL_SIZE - 1)
        ax.set_ylabel(_GEOMETRY_LABELS.get(metric, metric), fontsize=_LABEL_SIZE - 1)
        ax.set_title(_GEOMETRY_LABELS.get(metric, metric), fontsize=_TITLE_SIZE - 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[n:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=_TITLE_SIZE)
    return _save(fig, path)


def system_labels(df: pd.DataFrame) -> pd.Series:
    """A readable label per row of a sweep table: the system name, or "op L<layer> a=<alpha>" for latent."""
    df = _require(df, ["system", "op", "layer", "alpha"], "a sweep table")

    def label(row: pd.Series) -> str:
        if row["system"] != "latent" or pd.isna(row["op"]):
            return str(row["system"])
        return f"latent {row['op']} L{int(row['layer'])} a={float(row['alpha']):g}"

    return df.apply(label, axis=1)


def category_bars(
    df: pd.DataFrame,
    metric: str,
    *,
    systems: Sequence[str] | None = None,
    path: str | Path | None = None,
    title: str | None = None,
    ylim: tuple[float, float] | None = None,
) -> Figure:
    """Grouped bars: one group per category, one bar per system (e.g. base, FT, best latent, weight merges).

    Arguments:
        df: a sweep table, pre-filtered to the rows to compare (a `label` column, where present and
            not empty, names the bars; otherwise `system_labels` does), e.g. the baselines plus
            `best_cells(df, metric)`.
        metric: the metric to plot.
        systems: which labels to draw, in order; default all, in order of appearance.
    """
    df = _require(df, ["system", "category", "metric", "value"], "a sweep table")
    sub = _pick_metric(df, metric).copy()
    auto = system_labels(sub) if {"op", "layer", "alpha"} <= set(sub.columns) else sub["system"].astype(str)
    sub["label"] = sub["label"].fillna(auto) if "label" in sub.columns else auto
    systems = _chosen("systems", "system", systems, list(dict.fromkeys(sub["label"])))
    table = sub.groupby(["category", "label"], sort=False)["value"].mean().unstack("label")
    categories = list(table.index)
    k = len(systems)
    width = 0.8 / k
    fig = Figure(figsize=(max(5.0, 1.1 * len(categories) * max(1.0, k / 3) + 2.5), 3.8), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(categories))
    for j, s in enumerate(systems):
        values = table[s].reindex(categories).to_numpy(dtype=float)
        bars = ax.bar(x + (j - (k - 1) / 2) * width, values, width * 0.95, label=s)
        ax.bar_label(bars, labels=[_fmt(v) for v in values], fontsize=7, padding=1)
    ax.set_xticks(x, categories, fontsize=_LABEL_SIZE)
    ax.set_ylabel(metric, fontsize=_LABEL_SIZE)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title or f"{metric} per category", fontsize=_TITLE_SIZE)
    return _save(fig, path)
