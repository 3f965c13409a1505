"""Pareto fronts of a two-metric trade-off (both maximised), as tables and one figure for many families.

front = pareto_front(table, "skill_kept", "reasoning")        # the non-dominated rows, by x
pareto_figure({"grid": grid_table, "search": trials}, "skill_kept", "reasoning", path="front.png")
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from latent_merge_nnsight.errors import LatentMergeError

__all__ = ["dominates", "pareto_figure", "pareto_front"]


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether point `a` is at least as good as `b` on both metrics and better on one (both maximised)."""
    return a[0] >= b[0] and a[1] >= b[1] and (a[0] > b[0] or a[1] > b[1])


def pareto_front(df: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """The rows of `df` that no other row dominates on (`x`, `y`), both maximised, sorted by `x` (ties of
    a point keep its first row). Rows with a missing `x` or `y` are left out."""
    for col in (x, y):
        if col not in df.columns:
            columns = ", ".join(map(str, df.columns))
            raise LatentMergeError(f"column {col!r} is not in the table; columns: {columns}")
    sub = df.dropna(subset=[x, y]).drop_duplicates(subset=[x, y])
    pts = sub[[x, y]].to_numpy(dtype=float)
    keep = [
        not any(dominates((float(p[0]), float(p[1])), (float(q[0]), float(q[1]))) for p in pts) for q in pts
    ]
    return sub[np.asarray(keep, dtype=bool)].sort_values([x, y], ascending=[True, False])


def pareto_figure(
    families: Mapping[str, pd.DataFrame],
    x: str,
    y: str,
    *,
    references: pd.DataFrame | None = None,
    label: str = "label",
    path: str | Path | None = None,
    title: str = "Pareto fronts (up and right is better)",
    xlabel: str | None = None,
    ylabel: str | None = None,
) -> Any:
    """One axes: every family's points (faint) and its Pareto front (a line through the front's points).

    Arguments:
        families: name -> table with columns `x` and `y` (one row per evaluated setup).
        references: rows drawn as gold stars and annotated with their `label` column (e.g. base, reasoner).
        path: also write a PNG here.
    Returns the matplotlib Figure.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5.6), layout="constrained")
    ax = fig.subplots()
    cmap = colormaps["tab10"]
    for i, (name, table) in enumerate(families.items()):
        if table.empty:
            continue
        colour = cmap(i % 10)
        ax.scatter(table[x], table[y], s=14, color=colour, alpha=0.25, linewidths=0)
        front = pareto_front(table, x, y)
        ax.plot(front[x], front[y], "-o", color=colour, ms=5, lw=1.8, label=f"{name} ({len(table)})")
    if references is not None:
        for _, row in references.iterrows():
            ax.plot(row[x], row[y], "*", ms=15, color="gold", mec="black", zorder=5)
            ax.annotate(str(row[label]), (row[x], row[y]), xytext=(5, 5), textcoords="offset points")
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    ax.set_xlim(left=-0.03)
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left", title="family (setups): Pareto front", title_fontsize=8)
    ax.set_title(title)
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig
