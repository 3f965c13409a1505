"""The demo's report: per-setup tables, `report.md`, and the trade-off, bar and heatmap figures, all from
the tidy rows `lmn demo` writes to `results.csv` (so a report can be rebuilt without rerunning anything)."""

from pathlib import Path
from typing import Any

import pandas as pd

__all__ = [
    "GAINED",
    "LATENT_OPS",
    "SKILLS",
    "WEIGHT_OPS",
    "mean_table",
    "setup_label",
    "write_figures",
    "write_report",
]

SKILLS: tuple[str, ...] = ("knowledge", "math", "coding")
"""The categories whose mean accuracy is the "skill kept" axis of the trade-off."""
GAINED = "reasoning"
"""The category the fine-tune was trained for (the "reasoning gained" axis)."""
LATENT_OPS: tuple[str, ...] = ("lerp", "slerp", "regmean", "delta")
WEIGHT_OPS: tuple[str, ...] = ("lerp", "slerp", "regmean")


def setup_label(system: str, op: Any, layer: Any, alpha: Any, lam: Any = None) -> str:
    parts = [system if not isinstance(op, str) else f"{system}-{op}"]
    if _present(layer):
        parts.append(f"L={int(layer)}")
    if _present(lam):
        parts.append(f"lambda={float(lam):.3g}")
    elif _present(alpha) and system not in ("base", "reasoner"):
        parts.append(f"{'b' if system == 'ensemble' else 'alpha'}={float(alpha):g}")
    return " ".join(parts)


def _present(v: Any) -> bool:
    return v is not None and not bool(pd.isna(v))


# ---------------------------------------------------------------------------------------------------
# Tables


def mean_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per evaluated setup: its accuracy per category, the mean, skill kept and reasoning."""
    keys = ["system", "op", "layer", "alpha", "lam"]
    df = df.assign(label=[setup_label(*row) for row in df[keys].itertuples(index=False)])
    acc = df.pivot_table(index="label", columns="category", values="accuracy", sort=False)
    wide = df.drop_duplicates("label").set_index("label")[keys].join(acc).reset_index()
    cats = [c for c in df["category"].unique() if c in wide.columns]
    wide["mean"] = wide[cats].mean(axis=1)
    wide["skill"] = wide[[c for c in SKILLS if c in wide.columns]].mean(axis=1)
    wide["gained"] = wide[GAINED] if GAINED in wide.columns else float("nan")
    return wide


def _best(wide: pd.DataFrame, mask: pd.Series) -> pd.Series | None:
    sub = wide[mask]
    return None if sub.empty else sub.loc[sub["mean"].idxmax()]


def _fmt(v: Any) -> str:
    return "" if not _present(v) else f"{float(v):.2f}"


def _config(row: pd.Series) -> str:
    return row["label"].split(" ", 1)[1] if " " in row["label"] else ""


def write_report(df: pd.DataFrame, path: str | Path, meta: dict[str, Any], figures: dict[str, str]) -> Path:
    """Write the Markdown report of a demo results table (`results.csv` read back works too).

    Arguments:
        df: the tidy table (columns `COLUMNS`).
        path: the report file.
        meta: run details shown in the header (models, grid, time, versions).
        figures: caption -> relative path of each figure to link (the first is also shown inline).
    """
    wide = mean_table(df)
    cats = [c for c in ("knowledge", "reasoning", "math", "coding") if c in wide.columns]
    n_layers = int(meta["n_layers"])
    last = n_layers - 1
    is_latent, is_weight = wide["system"] == "latent", wide["system"] == "weight"
    head = "| | config | " + " | ".join(cats) + " | mean |\n|---|---|" + "---|" * (len(cats) + 1) + "\n"

    def line(name: str, row: pd.Series | None) -> str:
        if row is None:
            return f"| {name} | (not run) |" + " |" * (len(cats) + 1) + "\n"
        return (
            f"| {name} | {_config(row)} | "
            + " | ".join(_fmt(row[c]) for c in cats)
            + f" | {_fmt(row['mean'])} |\n"
        )

    out = ["# `lmn demo`: latent vs weight merging on the toy pair\n\n"]
    out.append(
        f"Base `{meta['base']}` and fine-tune `{meta['source']}` ({n_layers} layers). Held-out toy tasks, "
        f"{meta['n_per_category']} examples per category, greedy, exact match. {meta['n_systems']} setups "
        f"evaluated in {meta['seconds']:.0f} s on {meta['threads']} CPU thread(s)"
        f"{' (quick run)' if meta.get('quick') else ''}. Latent merges: site `pre`, positions `last` "
        f"(delta: all tokens), engine `{meta['engine']}`.\n\n"
    )
    out.append("## Reference points\n\n" + head)
    for system in ("base", "reasoner"):
        out.append(line(system, _best(wide, wide["system"] == system)))
    out.append(line("logit ensemble (best b)", _best(wide, wide["system"] == "ensemble")))

    out.append(
        "\n## Best latent vs best weight merge, per op\n\n"
        f"Best = highest mean accuracy over the categories. *Latent (mid)* merges at layers 1..{last - 1}; "
        f"*latent (last)* at layer {last}, which acts much like a logit ensemble and is kept apart. The "
        "winner row compares latent (mid) with weight per category.\n\n" + head
    )
    for op in ("lerp", "slerp", "regmean"):
        mid = _best(wide, is_latent & (wide["op"] == op) & (wide["layer"] < last))
        lst = _best(wide, is_latent & (wide["op"] == op) & (wide["layer"] == last))
        wgt = _best(wide, is_weight & (wide["op"] == op))
        out.append(line(f"**{op}** latent (mid)", mid))
        out.append(line(f"{op} latent (last)", lst))
        out.append(line(f"{op} weight", wgt))
        if mid is not None and wgt is not None:
            wins = []
            for c in [*cats, "mean"]:
                d = float(mid[c]) - float(wgt[c])
                wins.append("tie" if abs(d) < 1e-9 else ("latent" if d > 0 else "weight"))
            out.append(f"| {op}: winner | | " + " | ".join(wins) + " |\n")
    out.append(
        line(
            "**delta** steering (mid)",
            _best(wide, is_latent & (wide["op"] == "delta") & (wide["layer"] < last)),
        )
    )
    out.append(
        line(
            "delta steering (last)",
            _best(wide, is_latent & (wide["op"] == "delta") & (wide["layer"] == last)),
        )
    )

    base_row = _best(wide, wide["system"] == "base")
    if base_row is not None:
        out.append(
            "\n## Trade-off: skill kept vs reasoning gained\n\n"
            "A nominal alpha means different things in weight and latent space, so compare families by what "
            f"they trade: *skill kept* = mean accuracy over {', '.join(SKILLS)}; *reasoning* = accuracy on "
            f"{GAINED}. Each cell: the best reasoning accuracy of a family among its setups that keep at "
            f"least the given share of the base's skill ({_fmt(base_row['skill'])}).\n\n"
        )
        shares = (0.9, 0.75, 0.5)
        out.append("| family | " + " | ".join(f"skill >= {s:.0%} of base" for s in shares) + " |\n")
        out.append("|---|" + "---|" * len(shares) + "\n")
        families = [("logit ensemble", wide["system"] == "ensemble")]
        for op in ("lerp", "slerp", "regmean", "delta"):
            families.append((f"latent {op} (mid)", is_latent & (wide["op"] == op) & (wide["layer"] < last)))
            families.append((f"latent {op} (last)", is_latent & (wide["op"] == op) & (wide["layer"] == last)))
            if op in WEIGHT_OPS:
                families.append((f"weight {op}", is_weight & (wide["op"] == op)))
        for name, mask in families:
            cells = []
            for s in shares:
                ok = wide[mask & (wide["skill"] >= s * float(base_row["skill"]) - 1e-9)]
                if ok.empty:
                    cells.append("-")
                else:
                    top = ok.loc[ok["gained"].idxmax()]
                    cells.append(f"{_fmt(top['gained'])} ({_config(top)})")
            if mask.any():
                out.append(f"| {name} | " + " | ".join(cells) + " |\n")

    check = meta.get("regmean_equals_lerp")
    out.append("\n## Notes\n\n")
    out.append(
        "- Latent RegMean runs with the one fine-tune as its only source, beta = 1/(1+lambda); with one "
        "source the paper's formula is LERP at alpha = beta. "
        + (
            f"Checked in this run: the generated texts equal latent LERP's in {check[0]} of {check[1]} "
            "(setup, category) pairs where both were run.\n"
            if check
            else "\n"
        )
    )
    out.append(
        "- Weight RegMean (Jin et al. 2023) solves every linear layer from each model's Gram matrices "
        f"(off-diagonal scale {meta['off_diagonal']}, the base's on its four-category training mix, the "
        "reasoner's on scratchpad reasoning); alpha weights the two models' Gram matrices (0.5 = the paper's "
        "RegMean). Weight LERP/SLERP are mergekit's `linear` and `slerp`.\n"
    )
    out.append("- Delta steering adds alpha x mean(h_ft - h_base) (same calibration texts) to every token.\n")
    out.append(f"- Versions: {meta['versions']}.\n")
    if figures:
        items = list(figures.items())
        out.append(
            f"\n## Figures\n\n![{items[0][0]}]({items[0][1]})\n\n" + ("Also:\n\n" if items[1:] else "")
        )
        out.extend(f"- [{caption}]({rel})\n" for caption, rel in items[1:])
    path = Path(path)
    path.write_text("".join(out))
    return path


# ---------------------------------------------------------------------------------------------------
# Figures


def _tradeoff_figure(wide: pd.DataFrame, n_layers: int, path: Path) -> Path:
    """One panel per op: reasoning accuracy against skill kept, for weight merges (over alpha, from the
    base to the reasoner), latent merges (one curve per layer) and the logit ensemble."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    last = n_layers - 1
    ends = wide[wide["system"].isin(["base", "reasoner"])].sort_values("alpha")
    ens = pd.concat([ends.iloc[:1], wide[wide["system"] == "ensemble"].sort_values("alpha"), ends.iloc[1:]])
    ops = [op for op in LATENT_OPS if ((wide["system"] == "latent") & (wide["op"] == op)).any()]
    fig = Figure(figsize=(4.2 * len(ops), 4.0), layout="constrained")
    axes = fig.subplots(1, len(ops), squeeze=False)[0]
    layers = sorted(int(v) for v in wide.loc[wide["system"] == "latent", "layer"].dropna().unique())
    cmap = colormaps["viridis"]
    for ax, op in zip(axes, ops, strict=True):
        ax.plot(ens["skill"], ens["gained"], ":", color="grey", marker=".", label="logit ensemble")
        weights = wide[(wide["system"] == "weight") & (wide["op"] == op)].sort_values("alpha")
        if not weights.empty:
            curve = pd.concat([ends.iloc[:1], weights, ends.iloc[1:]])
            ax.plot(curve["skill"], curve["gained"], "-s", color="tab:red", lw=2, ms=5, label=f"weight {op}")
        for i, layer in enumerate(layers):
            cells = wide[(wide["system"] == "latent") & (wide["op"] == op) & (wide["layer"] == layer)]
            cells = cells.sort_values("alpha")
            if cells.empty:
                continue
            is_last = layer == last
            colour = "black" if is_last else cmap(i / max(1, len(layers) - 1) * 0.85)
            ax.plot(
                cells["skill"], cells["gained"], "--" if is_last else "-", marker="o", ms=4, color=colour,
                label=f"latent L={layer}" + (" (last)" if is_last else ""),
            )  # fmt: skip
        for _, row in ends.iterrows():
            ax.plot(row["skill"], row["gained"], "*", ms=14, color="gold", mec="black", zorder=5)
            ax.annotate(
                row["system"], (row["skill"], row["gained"]), xytext=(5, 5), textcoords="offset points"
            )
        ax.set_title(f"{op}: latent vs weight" if op in WEIGHT_OPS else f"{op} steering")
        ax.set_xlabel(f"skill kept (mean acc. {', '.join(SKILLS)})")
        ax.set_ylabel(f"{GAINED} accuracy")
        ax.set_xlim(-0.03, 1.03)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle("Trade-off: skill kept vs reasoning gained (up and right is better)")
    fig.savefig(path, dpi=100)
    return path


def _bars_figure(wide: pd.DataFrame, n_layers: int, path: Path) -> Path:
    """Per op: accuracy per category of the base, the reasoner, the best weight merge and the best
    mid-layer latent merge (best by mean accuracy)."""
    import numpy as np
    from matplotlib.figure import Figure

    last = n_layers - 1
    cats = [c for c in ("knowledge", "reasoning", "math", "coding") if c in wide.columns]
    ops = [op for op in WEIGHT_OPS if ((wide["system"] == "weight") & (wide["op"] == op)).any()]
    fig = Figure(figsize=(4.6 * max(1, len(ops)), 4.2), layout="constrained")
    axes = fig.subplots(1, max(1, len(ops)), squeeze=False)[0]
    x = np.arange(len(cats))
    for ax, op in zip(axes, ops, strict=False):
        rows = [
            ("base", _best(wide, wide["system"] == "base"), "lightgrey"),
            ("reasoner", _best(wide, wide["system"] == "reasoner"), "darkgrey"),
            ("weight", _best(wide, (wide["system"] == "weight") & (wide["op"] == op)), "tab:red"),
            (
                "latent",
                _best(wide, (wide["system"] == "latent") & (wide["op"] == op) & (wide["layer"] < last)),
                "tab:blue",
            ),
        ]
        rows = [r for r in rows if r[1] is not None]
        width = 0.8 / len(rows)
        for i, (name, row, colour) in enumerate(rows):
            label = name if name in ("base", "reasoner") else f"{name} ({_config(row)})"
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
        ax.set_title(f"{op}: best latent (mid layer) vs weight", fontsize=11)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    fig.savefig(path, dpi=100)
    return path


def _heatmaps(df: pd.DataFrame, out: Path) -> dict[str, Path]:
    from latent_merge_nnsight.analysis.plots import heatmaps

    long = df.assign(metric="accuracy", value=df["accuracy"])
    paths = {}
    for name, category in (("heatmap_mean", None), ("heatmap_reasoning", GAINED)):
        path = out / f"{name}.png"
        heatmaps(long, "accuracy", category=category, path=path)
        paths[name] = path
    return paths


def write_figures(df: pd.DataFrame, wide: pd.DataFrame, n_layers: int, out: Path) -> dict[str, Path]:
    """The trade-off curve, the latent-vs-weight bars and the layer x alpha heatmaps, as PNGs in `out`."""
    paths = {
        "tradeoff": _tradeoff_figure(wide, n_layers, out / "tradeoff.png"),
        "bars": _bars_figure(wide, n_layers, out / "bars.png"),
    }
    paths.update(_heatmaps(df, out))
    return paths
