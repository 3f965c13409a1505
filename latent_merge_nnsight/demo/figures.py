"""The demo's figures (`write_figures`): the Pareto fronts of every family, the trade-off per op, the best
latent vs the best weight merge per category, and the layer x alpha heatmaps, all from the tidy rows
(`results.csv`) and their per-setup table (`report.mean_table`).

matplotlib (and `analysis.plots`, which imports it) loads inside the figure functions only, as in
`analysis`: the tables and the report need none of it.
"""

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from latent_merge_nnsight.analysis.pareto import pareto_figure
from latent_merge_nnsight.analysis.search import GAINED, SKILLS
from latent_merge_nnsight.demo.report import CATS, LATENT_OPS, WEIGHT_OPS, best_row, config_text, families

__all__ = ["heatmap_figures", "write_figures"]


def _references(wide: pd.DataFrame) -> pd.DataFrame:
    ends = wide[wide["system"].isin(["base", "reasoner"])].sort_values("alpha")
    return ends.assign(name=ends["system"])


SKILL_KEPT_LABEL = f"skill kept (skill / the base's skill; skill = mean acc. {', '.join(SKILLS)})"


def _pareto(wide: pd.DataFrame, n_layers: int, path: Path) -> Path:
    fam = {name: wide[mask] for name, mask in families(wide, n_layers).items() if mask.any()}
    pareto_figure(
        fam,
        "skill_kept",
        "gained",
        references=_references(wide),
        label="name",
        path=path,
        title="Skill kept vs reasoning: every family's Pareto front (up and right is better)",
        xlabel=SKILL_KEPT_LABEL,
        ylabel=f"{GAINED} accuracy",
    )
    return path


def _tradeoff_figure(wide: pd.DataFrame, n_layers: int, path: Path) -> Path:
    """One panel per op: reasoning accuracy against skill kept, for weight merges (over alpha, from the
    base to the reasoner), single-layer latent merges (one curve per site and layer) and the ensemble."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    last = n_layers - 1
    ends = _references(wide)
    ens = pd.concat([ends.iloc[:1], wide[wide["system"] == "ensemble"].sort_values("alpha"), ends.iloc[1:]])
    single = (wide["system"] == "latent") & wide["schedule"].isna()
    ops = [op for op in LATENT_OPS if (single & (wide["op"] == op)).any()]
    fig = Figure(figsize=(4.2 * len(ops), 4.0), layout="constrained")
    axes = fig.subplots(1, len(ops), squeeze=False)[0]
    curves = sorted(
        {(str(s), int(la)) for s, la in wide.loc[single, ["site", "layer"]].itertuples(index=False)},
        key=lambda k: (k[1], k[0] == "post"),
    )
    cmap = colormaps["viridis"]
    for ax, op in zip(axes, ops, strict=True):
        ax.plot(ens["skill_kept"], ens["gained"], ":", color="grey", marker=".", label="logit ensemble")
        weights = wide[(wide["system"] == "weight") & (wide["op"] == op)].sort_values("alpha")
        if not weights.empty:
            curve = pd.concat([ends.iloc[:1], weights, ends.iloc[1:]])
            ax.plot(
                curve["skill_kept"], curve["gained"], "-s", color="tab:red", lw=2, ms=5, label=f"weight {op}"
            )
        for i, (site, layer) in enumerate(curves):
            cells = wide[single & (wide["op"] == op) & (wide["site"] == site) & (wide["layer"] == layer)]
            if cells.empty or (site == "post" and layer != last):
                continue
            cells = cells.sort_values("alpha")
            is_post = site == "post"
            colour = "black" if is_post else cmap(i / max(1, len(curves) - 1) * 0.85)
            ax.plot(
                cells["skill_kept"], cells["gained"], "--" if is_post else "-", marker="o", ms=3,
                color=colour, label=f"latent {site} L={layer}",
            )  # fmt: skip
        for _, row in ends.iterrows():
            ax.plot(row["skill_kept"], row["gained"], "*", ms=14, color="gold", mec="black", zorder=5)
            ax.annotate(
                row["system"], (row["skill_kept"], row["gained"]), xytext=(5, 5), textcoords="offset points"
            )
        ax.set_title(f"{op}: latent vs weight" if op in WEIGHT_OPS else f"{op} steering")
        ax.set_xlabel(SKILL_KEPT_LABEL)
        ax.set_ylabel(f"{GAINED} accuracy")
        ax.set_xlim(-0.03, max(1.03, float(wide["skill_kept"].max()) + 0.03))
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="lower left")
    fig.suptitle("Trade-off per op: skill kept vs reasoning (up and right is better)")
    fig.savefig(path, dpi=100)
    return path


def _bars_figure(wide: pd.DataFrame, n_layers: int, path: Path) -> Path:
    """Per op: accuracy per category of the base, the reasoner, the best weight merge and the best latent
    merge (best by balanced score)."""
    from matplotlib.figure import Figure

    cats = [c for c in CATS if c in wide.columns]
    ops = [op for op in WEIGHT_OPS if ((wide["system"] == "weight") & (wide["op"] == op)).any()]
    fig = Figure(figsize=(4.6 * max(1, len(ops)), 4.2), layout="constrained")
    axes = fig.subplots(1, max(1, len(ops)), squeeze=False)[0]
    x = np.arange(len(cats))
    for ax, op in zip(axes, ops, strict=False):
        rows = [
            ("base", best_row(wide, wide["system"] == "base"), "lightgrey"),
            ("reasoner", best_row(wide, wide["system"] == "reasoner"), "darkgrey"),
            ("weight", best_row(wide, (wide["system"] == "weight") & (wide["op"] == op)), "tab:red"),
            ("latent", best_row(wide, (wide["system"] == "latent") & (wide["op"] == op)), "tab:blue"),
        ]
        rows = [r for r in rows if r[1] is not None]
        width = 0.8 / len(rows)
        for i, (name, row, colour) in enumerate(rows):
            label = name if name in ("base", "reasoner") else f"{name} ({config_text(row)})"
            ax.bar(
                x + (i - (len(rows) - 1) / 2) * width,
                [row[c] for c in cats],
                width,
                color=colour,
                label=label,
            )
        ax.set_xticks(x, cats)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("accuracy")
        ax.set_title(f"{op}: best latent vs best weight", fontsize=11)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    fig.savefig(path, dpi=100)
    return path


def heatmap_figures(df: pd.DataFrame, out: Path | None = None) -> dict[str, Any]:
    """Layer x alpha heatmaps of the single-layer site-`pre` merges (written to OUT/NAME.png when `out` is
    given): one panel per op the grid ran, one column per alpha (or delta strength) it ran, refined alphas
    included (a cell the grid did not run is blank); the mean over the categories, and reasoning."""
    from latent_merge_nnsight.analysis.plots import heatmaps

    pre = df[(df["system"] != "latent") | ((df["site"] == "pre") & df["schedule"].isna())]
    long = pre.assign(metric="accuracy", value=pre["accuracy"])
    return {
        name: heatmaps(long, "accuracy", category=category, path=None if out is None else out / f"{name}.png")
        for name, category in (("heatmap_mean", None), ("heatmap_reasoning", GAINED))
    }


def _heatmaps(df: pd.DataFrame, out: Path) -> dict[str, Path]:
    return {name: out / f"{name}.png" for name in heatmap_figures(df, out)}


def write_figures(df: pd.DataFrame, wide: pd.DataFrame, n_layers: int, out: Path) -> dict[str, Path]:
    """The Pareto fronts, the per-op trade-off, the latent-vs-weight bars and the layer x alpha heatmaps,
    as PNGs in `out`."""
    paths = {
        "pareto": _pareto(wide, n_layers, out / "pareto.png"),
        "tradeoff": _tradeoff_figure(wide, n_layers, out / "tradeoff.png"),
        "bars": _bars_figure(wide, n_layers, out / "bars.png"),
    }
    paths.update(_heatmaps(df, out))
    return paths
