"""The demo's report: per-setup tables, `report.md`, and the figures, all from the tidy rows `lmn demo`
writes to `results.csv` (so a report can be rebuilt without rerunning anything).

Every sentence of the report that states a finding is built from the run's numbers here: a rerun on
another pair, grid or seed rewrites them, and nothing in the text can go stale.
"""

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from latent_merge_nnsight.analysis.pareto import dominates, pareto_front
from latent_merge_nnsight.analysis.search import GAINED, SKILLS, skill_kept

__all__ = [
    "GAINED",
    "LATENT_OPS",
    "SKILLS",
    "WEIGHT_OPS",
    "best_row",
    "families",
    "mean_table",
    "setup_label",
    "write_report",
]

LATENT_OPS: tuple[str, ...] = ("lerp", "slerp", "regmean", "delta")
WEIGHT_OPS: tuple[str, ...] = ("lerp", "slerp", "regmean")
KEYS = ["system", "op", "site", "layer", "alpha", "lam", "schedule"]
CATS = ("knowledge", "reasoning", "math", "coding")


def setup_label(
    system: str,
    op: str | float | None,
    layer: int | float | None,
    alpha: float | None,
    lam: float | None = None,
    site: str | float | None = None,
    schedule: str | float | None = None,
) -> str:
    """A setup's name in tables, e.g. `latent-lerp post L=5 alpha=0.9`, `latent-slerp post {4: 0.25, 5: 1}`,
    `weight-slerp alpha=0.5`, `ensemble b=0.75`."""
    parts = [system if not isinstance(op, str) else f"{system}-{op}"]
    if _present(site):
        parts.append(str(site))
    if _present(schedule):
        parts.append(str(schedule))
        return " ".join(parts)
    if _present(layer):
        parts.append(f"L={int(layer)}")
    if _present(lam):
        parts.append(f"lambda={float(lam):.3g}")
    elif _present(alpha) and system not in ("base", "reasoner"):
        parts.append(f"{'b' if system == 'ensemble' else 'alpha'}={float(alpha):g}")
    return " ".join(parts)


def _present(v: object) -> bool:
    return v is not None and not bool(pd.isna(v))


# ---------------------------------------------------------------------------------------------------
# Tables


def mean_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per evaluated setup: its accuracy per category, the mean, skill, skill kept (skill / the
    base's skill, `analysis.search.skill_kept`), reasoning, the balanced score (skill + reasoning) / 2, and
    the mean norm ratio and source weight over categories."""
    df = df.copy()
    for col in ("site", "schedule", "norm_ratio", "source_weight"):
        if col not in df.columns:
            df[col] = np.nan
    df["label"] = [
        setup_label(r.system, r.op, r.layer, r.alpha, r.lam, r.site, r.schedule)
        for r in df[KEYS].itertuples()
    ]
    acc = df.pivot_table(index="label", columns="category", values="accuracy", sort=False)
    probes = df.groupby("label", sort=False)[["norm_ratio", "source_weight"]].mean()
    wide = df.drop_duplicates("label").set_index("label")[KEYS].join(acc).join(probes).reset_index()
    cats = [c for c in df["category"].unique() if c in wide.columns]
    wide["mean"] = wide[cats].mean(axis=1)
    wide["skill"] = wide[[c for c in SKILLS if c in wide.columns]].mean(axis=1)
    wide["gained"] = wide[GAINED] if GAINED in wide.columns else float("nan")
    wide["balanced"] = (wide["skill"] + wide["gained"]) / 2
    base = wide.loc[wide["system"] == "base", "skill"]
    base_skill = float(base.iloc[0]) if len(base) else None
    wide["skill_kept"] = [skill_kept(float(v), base_skill) for v in wide["skill"]]
    return wide


def best_row(wide: pd.DataFrame, mask: pd.Series, by: str = "balanced") -> pd.Series | None:
    """The row of `wide[mask]` with the highest `by` (first on ties), or None."""
    sub = wide[mask]
    return None if sub.empty else sub.loc[sub[by].idxmax()]


def families(wide: pd.DataFrame, n_layers: int) -> dict[str, pd.Series]:
    """The report's families of setups (name -> mask over `wide`)."""
    last = n_layers - 1
    latent, single = wide["system"] == "latent", wide["schedule"].isna()
    live = wide["op"].isin(["lerp", "slerp", "regmean"])
    return {
        "logit ensemble": wide["system"] == "ensemble",
        **{f"weight {op}": (wide["system"] == "weight") & (wide["op"] == op) for op in WEIGHT_OPS},
        "latent, site pre": latent & live & single & (wide["site"] == "pre"),
        f"latent, site post L={last}": latent
        & live
        & single
        & (wide["site"] == "post")
        & (wide["layer"] == last),
        "latent, multi-layer schedules": latent & live & ~single,
        "delta steering": latent & (wide["op"] == "delta"),
    }


def _fmt(v: object) -> str:
    return "" if not _present(v) else f"{float(v):.2f}"


def config_text(row: pd.Series) -> str:
    return row["label"].split(" ", 1)[1] if " " in row["label"] else ""


def _cell(text: str, width: int = 90) -> str:
    text = text.replace("\n", " / ").replace("|", "\\|").strip()
    return ("`" + text[: width - 3] + "...`") if len(text) > width else f"`{text}`" if text else "(empty)"


class _Writer:
    """Accumulates the report's Markdown; `line` renders one setup row of the accuracy table."""

    def __init__(self, cats: list[str]) -> None:
        self.parts: list[str] = []
        self.cats = cats
        self.head = (
            "| | config | " + " | ".join(cats) + " | skill | balanced |\n|---|---|"
            + "---|" * (len(cats) + 2) + "\n"
        )  # fmt: skip

    def add(self, text: str) -> None:
        self.parts.append(text)

    def line(self, name: str, row: pd.Series | None) -> None:
        if row is None:
            self.add(f"| {name} | (not run) |" + " |" * (len(self.cats) + 2) + "\n")
            return
        values = " | ".join(_fmt(row[c]) for c in self.cats)
        self.add(
            f"| {name} | {config_text(row)} | {values} | {_fmt(row['skill'])} | {_fmt(row['balanced'])} |\n"
        )


def _point(row: pd.Series) -> str:
    return f"`{row['label']}` (reasoning {_fmt(row['gained'])}, skill kept {_fmt(row['skill_kept'])})"


def _transition_findings(
    out: list[str], wide: pd.DataFrame, meta: dict[str, Any], latent: pd.Series, last: int
) -> None:
    """Per single-layer op curve, its sharpest transition between neighbouring alphas (or: none sharp)."""
    jump = float(meta.get("grid", {}).get("refine_jump", 0.25))
    jumps = _transitions(wide, latent, last)
    for op, j in jumps.items():
        if abs(j["r1"] - j["r0"]) < jump - 1e-12:
            out.append(
                f"No single-layer {op} curve changes reasoning by {jump:g} or more between neighbouring "
                f"alphas (the largest change is {abs(j['r1'] - j['r0']):.2f})."
            )
            continue
        w = ""
        if _present(j["w0"]) and _present(j["w1"]):
            w = f" (effective source weight {_fmt(j['w0'])} -> {_fmt(j['w1'])})"
        out.append(
            f"The sharpest transition of a single-layer {op} curve is at site `{j['site']}` L={j['layer']}: "
            f"reasoning goes from {_fmt(j['r0'])} at alpha {j['a0']:g} to {_fmt(j['r1'])} at alpha "
            f"{j['a1']:g}{w}."
        )


def _norm_and_ensemble_findings(
    out: list[str],
    wide: pd.DataFrame,
    fam: dict[str, pd.Series],
    live: pd.Series,
    post_last: pd.Series,
    last: int,
) -> None:
    """The norm ratio at the last layer's site post; the best logit ensemble against latent merges."""
    ratios = wide[post_last & wide["norm_ratio"].notna()]
    if not ratios.empty:
        r = float(ratios["norm_ratio"].mean())
        size, side = ("smaller", "below") if r < 1 else ("larger", "above")
        out.append(
            f"At site `post` of layer {last} the source's state is {size} than the base's: mean "
            "|h_source|/|h_base| "
            f"{_fmt(ratios['norm_ratio'].mean())} (from {_fmt(ratios['norm_ratio'].min())} to "
            f"{_fmt(ratios['norm_ratio'].max())} over its setups), so lerp at alpha a gives the source the "
            f"logit-ensemble weight a r / ((1-a) + a r) at norm ratio r, {side} a."
        )
    ens = best_row(wide, fam["logit ensemble"])
    top_latent = best_row(wide, live)
    if ens is not None and top_latent is not None:
        e, t = (ens["skill_kept"], ens["gained"]), (top_latent["skill"], top_latent["gained"])
        verdict = (
            "dominates" if dominates(e, t) else "is dominated by" if dominates(t, e) else "does not dominate"
        )
        n_dom = int(sum(dominates(e, (r.skill, r.gained)) for r in wide[live].itertuples()))
        out.append(
            f"The best logit ensemble {_point(ens)} {verdict} the best latent merge {_point(top_latent)}; "
            f"it dominates {n_dom} of the {int(live.sum())} latent merges."
        )


def _findings(wide: pd.DataFrame, meta: dict[str, Any], fam: dict[str, pd.Series]) -> list[str]:
    """The report's findings, each a sentence computed from the table (none is written by hand)."""
    last = int(meta["n_layers"]) - 1
    base, ft = (best_row(wide, wide["system"] == s) for s in ("base", "reasoner"))
    latent = wide["system"] == "latent"
    live = latent & wide["op"].isin(["lerp", "slerp", "regmean"])
    out: list[str] = []
    if base is None or ft is None:
        return out
    pre = live & (wide["site"] == "pre")
    top_pre = best_row(wide, pre, by="gained")
    if top_pre is not None:
        out.append(
            f"The most reasoning any merge at site `pre` reaches ({int(pre.sum())} setups, single-layer and "
            f"schedules) is {_fmt(top_pre['gained'])}, by {_point(top_pre)}; the base scores "
            f"{_fmt(base['gained'])} and the reasoner {_fmt(ft['gained'])}. A `pre` merge, at any layer, "
            f"still runs the base's own last block (block {last}) on the mixed state."
        )
    post_last = fam[f"latent, site post L={last}"]
    top_post = best_row(wide, post_last)
    if top_post is not None:
        out.append(
            f"At site `post` of the last layer (the last block's output, read by the base's final norm and "
            f"head) the best balanced single-layer merge is {_point(top_post)}."
        )
    agree = meta.get("post_alpha1_vs_reasoner")
    lim = wide[latent & (wide["op"] == "lerp") & (wide["site"] == "post") & (wide["layer"] == last)]
    lim = lim[np.isclose(lim["alpha"].astype(float), 1.0) & lim["schedule"].isna()]
    if not lim.empty:
        row = lim.iloc[0]
        same = f"; its generations equal the reasoner's in {agree[0]} of {agree[1]} prompts" if agree else ""
        out.append(
            f"The alpha = 1 limit there, `{row['label']}` (the reasoner's blocks under the base's final norm "
            f"and head), scores reasoning {_fmt(row['gained'])} and skill {_fmt(row['skill'])}, against the "
            f"reasoner's {_fmt(ft['gained'])} and {_fmt(ft['skill'])}{same}."
        )
    _transition_findings(out, wide, meta, latent, last)
    _norm_and_ensemble_findings(out, wide, fam, live, post_last, last)
    return out


def _transitions(wide: pd.DataFrame, latent: pd.Series, last: int) -> dict[str, dict[str, Any]]:
    """Per op (lerp, slerp): the largest jump in reasoning between neighbouring alphas of one single-layer
    curve (alpha 0 = the base), with the effective source weights at its ends."""
    base = best_row(wide, wide["system"] == "base")
    out: dict[str, dict[str, Any]] = {}
    if base is None:
        return out
    for op in ("lerp", "slerp"):
        best: dict[str, Any] | None = None
        sub = wide[latent & (wide["op"] == op) & wide["schedule"].isna()]
        sub_lerp = wide[latent & (wide["op"] == "lerp") & wide["schedule"].isna()]
        for (site, layer), curve in sub.groupby(["site", "layer"]):
            if site == "post" and int(layer) != last:
                continue
            if op == "slerp" and not (curve["alpha"] >= 1).any():  # alpha = 1: LERP's row (the source state)
                ends = sub_lerp[(sub_lerp["site"] == site) & (sub_lerp["layer"] == layer)]
                curve = pd.concat([curve, ends[ends["alpha"] >= 1]])
            curve = curve.sort_values("alpha")
            pts = [(0.0, float(base["gained"]), np.nan)]
            pts += list(
                zip(curve["alpha"].astype(float), curve["gained"], curve["source_weight"], strict=True)
            )
            for (a0, r0, w0), (a1, r1, w1) in zip(pts, pts[1:], strict=False):
                if best is None or abs(r1 - r0) > abs(best["r1"] - best["r0"]) + 1e-12:
                    best = {"site": site, "layer": int(layer), "a0": a0, "a1": a1, "r0": r0, "r1": r1,
                            "w0": w0, "w1": w1}  # fmt: skip
        if best is not None:
            out[op] = best
    return out


def _intro(
    w: _Writer, wide: pd.DataFrame, meta: dict[str, Any], fam: dict[str, pd.Series], n_layers: int
) -> None:
    """The report's title, the run it describes, and its findings."""
    w.add("# `lmn demo`: latent vs weight merging on the toy pair\n\n")
    w.add(
        f"Base `{meta['base']}` and fine-tune `{meta['source']}` ({n_layers} layers). Held-out toy tasks, "
        f"{meta['n_per_category']} examples per category, greedy, exact match. {meta['n_systems']} setups "
        f"({meta.get('n_refined', 0)} of them on the finer alpha grid) evaluated in {meta['seconds']:.0f} s "
        + (f"({meta['cpu_seconds']:.0f} s of CPU time) " if "cpu_seconds" in meta else "")
        + f"on {meta['threads']} CPU thread(s){' (quick run)' if meta.get('quick') else ''}, engine "
        f"`{meta['engine']}`. Latent merges: positions `last` (delta: all tokens). *Skill* = mean accuracy "
        f"over {', '.join(SKILLS)}; *skill kept* = skill / the base's skill (as in `lmn search`); "
        f'*balanced* = (skill + {GAINED}) / 2, the score "best" refers to.\n\n'
    )
    found = _findings(wide, meta, fam)
    if found:
        w.add("## What this run shows\n\n" + "".join(f"- {s}\n" for s in found))


def _reference_rows(
    w: _Writer, wide: pd.DataFrame, fam: dict[str, pd.Series], latent: pd.Series, last: int
) -> None:
    """The base, the reasoner, the best ensemble, and the alpha = 1 rows of latent lerp."""
    w.add("\n## Reference points and limiting rows\n\n" + w.head)
    for system in ("base", "reasoner"):
        w.line(system, best_row(wide, wide["system"] == system))
    w.line("logit ensemble (best b)", best_row(wide, fam["logit ensemble"]))
    for site, layer in (("pre", 0), ("post", last)):
        lim = wide[latent & (wide["op"] == "lerp") & (wide["site"] == site) & (wide["layer"] == layer)]
        lim = lim[np.isclose(lim["alpha"].astype(float), 1.0) & lim["schedule"].isna()]
        if not lim.empty:
            w.line(f"latent lerp alpha=1, {site} L={layer}", lim.iloc[0])


def _per_op_rows(w: _Writer, wide: pd.DataFrame, latent: pd.Series, last: int, cats: list[str]) -> None:
    """Per op, the best latent merge of each kind against the best weight merge; then delta steering."""
    w.add(f"\n## Best latent vs best weight merge, per op\n\n{w.head}")
    for op in ("lerp", "slerp", "regmean"):
        is_op = latent & (wide["op"] == op)
        pre = best_row(wide, is_op & (wide["site"] == "pre") & wide["schedule"].isna())
        post = best_row(wide, is_op & (wide["site"] == "post") & (wide["layer"] == last))
        sched = best_row(wide, is_op & wide["schedule"].notna())
        wgt = best_row(wide, (wide["system"] == "weight") & (wide["op"] == op))
        lat = best_row(wide, is_op)
        w.line(f"**{op}** latent, site pre", pre)
        w.line(f"{op} latent, site post L={last}", post)
        if sched is not None:
            w.line(f"{op} latent, schedule", sched)
        w.line(f"{op} weight", wgt)
        if lat is not None and wgt is not None:
            wins = []
            for c in [*cats, "skill", "balanced"]:
                d = float(lat[c]) - float(wgt[c])
                wins.append("tie" if abs(d) < 1e-9 else ("latent" if d > 0 else "weight"))
            w.add(f"| {op}: best latent vs weight | | " + " | ".join(wins) + " |\n")
    w.line("**delta** steering", best_row(wide, latent & (wide["op"] == "delta")))


def _curves(w: _Writer, wide: pd.DataFrame, fam: dict[str, pd.Series], latent: pd.Series, last: int) -> None:
    """The alpha curves at the last layer's site post, the multi-layer schedules, the norm ratios."""
    curve = wide[fam[f"latent, site post L={last}"]].sort_values(["op", "alpha"])
    if not curve.empty:
        w.add(
            f"\n## Site post, last layer (L={last}): the alpha curves\n\n"
            "*norm ratio*: mean |h_source|/|h_base| at the merged tokens; *source weight*: the "
            "logit-ensemble weight of the source that the merge amounts to there (`demo.probe`).\n\n"
            f"| op | alpha | {GAINED} | skill | norm ratio | source weight |\n|---|---|---|---|---|---|\n"
        )
        for _, r in curve.iterrows():
            a = f"{float(r['alpha']):g}" + (f" (lambda={float(r['lam']):.3g})" if _present(r["lam"]) else "")
            w.add(
                f"| {r['op']} | {a} | {_fmt(r['gained'])} | {_fmt(r['skill'])} | {_fmt(r['norm_ratio'])} | "
                f"{_fmt(r['source_weight'])} |\n"
            )
    sched = wide[latent & wide["schedule"].notna()]
    if not sched.empty:
        w.add(
            "\n## Multi-layer schedules\n\n"
            f"| setup | {GAINED} | skill | balanced | norm ratio | source weight at L={last} |\n"
            "|---|---|---|---|---|---|\n"
        )
        for _, r in sched.iterrows():
            w.add(
                f"| {r['label']} | {_fmt(r['gained'])} | {_fmt(r['skill'])} | {_fmt(r['balanced'])} | "
                f"{_fmt(r['norm_ratio'])} | {_fmt(r['source_weight'])} |\n"
            )
    norms = wide[latent & wide["schedule"].isna() & wide["norm_ratio"].notna()]
    if not norms.empty:
        w.add("\n## Norm ratio |h_source|/|h_base| per merge site (mean over its single-layer setups)\n\n")
        by = norms.pivot_table(index="site", columns="layer", values="norm_ratio", aggfunc="mean")
        w.add("| site | " + " | ".join(f"L={int(k)}" for k in by.columns) + " |\n")
        w.add("|---|" + "---|" * len(by.columns) + "\n")
        for site, r in by.iterrows():
            w.add(f"| {site} | " + " | ".join(_fmt(v) for v in r) + " |\n")


def _trade_off(w: _Writer, wide: pd.DataFrame, fam: dict[str, pd.Series]) -> None:
    """Per family, the best reasoning at each share of the base's skill kept, and its Pareto front."""
    base_row = best_row(wide, wide["system"] == "base")
    if base_row is not None:
        w.add(
            "\n## Trade-off: skill kept vs reasoning\n\n"
            "A nominal alpha means different things in weight and latent space, so compare families by what "
            "they trade. Each cell: the best reasoning accuracy of a family among its setups that keep at "
            f"least the given share of the base's skill ({_fmt(base_row['skill'])}). The Pareto fronts of "
            "every family are in the figure below.\n\n"
        )
        shares = (0.9, 0.75, 0.5)
        w.add("| family | " + " | ".join(f"skill kept >= {s:g}" for s in shares) + " | Pareto front |\n")
        w.add("|---|" + "---|" * (len(shares) + 1) + "\n")
        for name, mask in fam.items():
            if not mask.any():
                continue
            cells = []
            for s in shares:
                ok = wide[mask & (wide["skill_kept"] >= s - 1e-9)]
                top = None if ok.empty else ok.loc[ok["gained"].idxmax()]
                cells.append("-" if top is None else f"{_fmt(top['gained'])} ({config_text(top)})")
            front = pareto_front(wide[mask], "skill_kept", "gained")
            pts = ", ".join(f"{_fmt(r.skill_kept)}/{_fmt(r.gained)}" for r in front.itertuples())
            w.add(f"| {name} | " + " | ".join(cells) + f" | {pts} |\n")


def _samples(w: _Writer, samples: dict[str, Any] | None) -> None:
    """The sample generations table (left out without samples)."""
    if samples and samples.get("texts"):
        w.add(
            "\n## Sample generations (the first held-out prompt of each category)\n\n"
            "| category | prompt (answer) | " + " | ".join(samples["systems"]) + " |\n"
            "|---|---|" + "---|" * len(samples["systems"]) + "\n"
        )
        for c, prompt in samples["prompts"].items():
            outs = " | ".join(_cell(samples["texts"][s].get(c, "")) for s in samples["systems"])
            w.add(f"| {c} | {_cell(prompt, 60)} ({samples['answers'][c]}) | {outs} |\n")
        w.add(
            "\nColumns: " + "; ".join(f"{s} = `{label}`" for s, label in samples["systems"].items()) + ".\n"
        )


def _notes(w: _Writer, meta: dict[str, Any], figures: dict[str, str]) -> None:
    """The notes (with the identity checks of this run) and the figures."""
    w.add("\n## Notes\n\n")
    check = meta.get("regmean_equals_lerp")
    w.add(
        "- Latent RegMean runs with the one fine-tune as its only source, beta = 1/(1+lambda); with one "
        "source the paper's formula is LERP at alpha = beta. "
        + (
            f"Checked in this run: the generated texts equal latent LERP's in {check[0]} of {check[1]} "
            "(setup, category) pairs where both were run.\n"
            if check
            else "\n"
        )
    )
    post = meta.get("post_equals_next_pre")
    if post:
        w.add(
            "- Site `post` of layer L is the stream entering layer L+1, the same as site `pre` of L+1; "
            f"checked in this run: LERP texts equal in {post[0]} of {post[1]} (setup, category) pairs.\n"
        )
    w.add(
        "- Weight RegMean (Jin et al. 2023) solves every linear layer from each model's Gram matrices "
        f"(off-diagonal scale {meta['off_diagonal']}, the base's on its four-category training mix, the "
        "reasoner's on scratchpad reasoning); alpha weights the two models' Gram matrices (0.5 = the paper's "
        "RegMean). Weight LERP/SLERP are mergekit's `linear` and `slerp`.\n"
    )
    w.add("- Delta steering adds alpha x mean(h_ft - h_base) (same calibration texts) to every token.\n")
    w.add(
        "- At alpha = 1 (beta = 1) LERP, SLERP and RegMean all return the source state itself, so the grid "
        "runs only LERP there.\n"
    )
    if meta.get("passes"):
        w.add(
            f"- {meta['n_systems']} setups ran in {meta['passes']} passes: consecutive latent merges of the "
            f"pair together as per-row recipes, up to {meta['max_batch']} rows (setups x a category's "
            "prompts) a pass (`lmn.generate(recipe=[...])`): the answers of one setup at a time, but where "
            "a float32 near-tie flips a token.\n"
        )
    w.add(f"- Versions: {meta['versions']}.\n")
    if figures:
        items = list(figures.items())
        w.add(f"\n## Figures\n\n![{items[0][0]}]({items[0][1]})\n\n" + ("Also:\n\n" if items[1:] else ""))
        w.parts.extend(f"- [{caption}]({rel})\n" for caption, rel in items[1:])


def write_report(
    df: pd.DataFrame,
    path: str | Path,
    meta: dict[str, Any],
    figures: dict[str, str],
    samples: dict[str, Any] | None = None,
) -> Path:
    """Write the Markdown report of a demo results table (`results.csv` read back works too).

    Arguments:
        df: the tidy table (columns `run.COLUMNS`).
        path: the report file.
        meta: run details shown in the header (models, grid, time, versions, the identity checks).
        figures: caption -> relative path of each figure to link (the first is also shown inline).
        samples: the sample generations (`samples.json`), or None to leave that table out.
    """
    wide = mean_table(df)
    cats = [c for c in CATS if c in wide.columns]
    n_layers = int(meta["n_layers"])
    last = n_layers - 1
    fam = families(wide, n_layers)
    latent = wide["system"] == "latent"
    w = _Writer(cats)
    _intro(w, wide, meta, fam, n_layers)

    _reference_rows(w, wide, fam, latent, last)

    _per_op_rows(w, wide, latent, last, cats)

    _curves(w, wide, fam, latent, last)

    _trade_off(w, wide, fam)

    _samples(w, samples)

    _notes(w, meta, figures)
    path = Path(path)
    path.write_text("".join(w.parts))
    return path
