"""Summaries of pairwise judgments: win rates with and without ties, order consistency, bootstrap
confidence intervals; written as JSON, a markdown table in the paper's format, and a PNG bar chart."""

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.evaluation.judge import ORDERS, Judgment
from latent_merge_nnsight.evaluation.judgebench.data import CATEGORIES


def _as_judgment(j: Judgment | Mapping[str, Any], i: int) -> Judgment:
    return j if isinstance(j, Judgment) else Judgment.from_dict(j, f"judgments[{i}]")


def _bootstrap(
    wins_a: np.ndarray, wins_b: np.ndarray, ties: np.ndarray, n_boot: int, seed: int, confidence: float
) -> dict[str, list[float] | None]:
    """Percentile CIs of both win rates, resampling pairs with replacement."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(wins_a), size=(n_boot, len(wins_a)))
    a, b, t = wins_a[idx].sum(1), wins_b[idx].sum(1), ties[idx].sum(1)
    q = [50 * (1 - confidence), 50 * (1 + confidence)]
    out: dict[str, list[float] | None] = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for name, num, den in (("no_ties", a, a + b), ("ties_half", a + 0.5 * t, a + b + t)):
            rate = num / den
            out[name] = [float(x) for x in np.nanpercentile(rate, q)] if np.isfinite(rate).any() else None
    return out


def _group_summary(
    pairs: dict[str, dict[str, Any]], group: str, n_boot: int, seed: int, confidence: float
) -> dict[str, Any]:
    """Counts, order consistency and win rates (with bootstrap CIs) of one category, or "overall"."""
    members = [e for e in pairs.values() if group == "overall" or e["category"] == group]
    per_pair = np.array(
        [
            [sum(v == k for v in e["verdicts"].values()) for k in ("A", "B", "tie", None, "failed")]
            for e in members
        ]
    )
    a, b, t, inv, failed = (int(x) for x in per_pair.sum(0))
    both = [  # pairs judged in both orders (a failed request is no judgment)
        v for e in members if set(ORDERS) <= (v := e["verdicts"]).keys() and "failed" not in v.values()
    ]
    agree = sum(1 for v in both if v["AB"] in ("A", "B", "tie") and v["AB"] == v["BA"])
    ci = _bootstrap(per_pair[:, 0], per_pair[:, 1], per_pair[:, 2], n_boot, seed, confidence)
    return {
        "n_pairs": len(members),
        "n_judgments": a + b + t + inv + failed,
        "a_wins": a,
        "b_wins": b,
        "ties": t,
        "invalid": inv,
        "failed": failed,
        "order_consistency": agree / len(both) if both else None,
        "win_rate_no_ties": a / (a + b) if a + b else None,
        "win_rate_no_ties_ci": ci["no_ties"],
        "win_rate_ties_half": (a + 0.5 * t) / (a + b + t) if a + b + t else None,
        "win_rate_ties_half_ci": ci["ties_half"],
    }


def summarize(
    judgments: Iterable[Judgment | Mapping[str, Any]],
    *,
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Win rates of system A over system B per category and overall, as fractions in [0, 1].

    Counts are per judgment (each order is one vote): ``a_wins``, ``b_wins``, ``ties``, ``invalid`` (a
    reply with no verdict) and ``failed`` (the endpoint refused the request, e.g. a prompt over its
    context).
    ``win_rate_no_ties`` = A/(A+B); ``win_rate_ties_half`` = (A + tie/2)/(A+B+tie); invalid judgments
    count in neither. ``order_consistency`` is the fraction of pairs judged in both orders whose two
    (mapped-back, valid) verdicts agree (a failed request is no judgment; a statistic over no judgment
    is None, written null). CIs resample pairs (``n_boot`` times, numpy seeded by ``seed``).
    """
    if not 0 < confidence < 1:
        raise LatentMergeError(f"confidence={confidence} must be in (0, 1)")
    if n_boot < 1:
        raise LatentMergeError(f"n_boot={n_boot} must be >= 1")
    items = [_as_judgment(j, i) for i, j in enumerate(judgments)]
    if not items:
        raise LatentMergeError("judgments is empty; nothing to summarize")
    for field in ("system_a", "system_b", "judge_model", "template_id"):
        values = sorted({getattr(j, field) for j in items})
        if len(values) > 1:
            raise LatentMergeError(
                f"judgments mix several {field} values {values}; summarize one comparison at a time"
            )
    pairs: dict[str, dict[str, Any]] = {}
    for j in items:
        entry = pairs.setdefault(j.pair_id, {"category": j.category, "verdicts": {}})
        if j.order in entry["verdicts"]:
            raise LatentMergeError(f"pair_id {j.pair_id!r} has two judgments for order {j.order!r}")
        entry["verdicts"][j.order] = "failed" if j.error is not None else j.verdict
    present = {e["category"] for e in pairs.values()}
    groups = [c for c in CATEGORIES if c in present] + sorted(present - set(CATEGORIES)) + ["overall"]
    results = {g: _group_summary(pairs, g, n_boot, seed, confidence) for g in groups}
    first = items[0]
    return {
        "system_a": first.system_a,
        "system_b": first.system_b,
        "judge_model": first.judge_model,
        "template_id": first.template_id,
        "n_boot": n_boot,
        "seed": seed,
        "confidence": confidence,
        "results": results,
    }


SummaryRows = Mapping[str, Mapping[str, Any] | Sequence[Mapping[str, Any]]]
"""Row label -> one summary, or several (e.g. latent and weight merge vs the same opponent)."""


def _rows(rows: SummaryRows) -> dict[str, list[Mapping[str, Any]]]:
    out = {label: [s] if isinstance(s, Mapping) else list(s) for label, s in rows.items()}
    for label, summaries in out.items():
        if not summaries or any("results" not in s for s in summaries):
            raise LatentMergeError(f"rows[{label!r}] must be a summarize() result or a list of them")
    return out


def _columns(rows: dict[str, list[Mapping[str, Any]]]) -> list[str]:
    present = {g for ss in rows.values() for s in ss for g in s["results"]} - {"overall"}
    return [c for c in CATEGORIES if c in present] + sorted(present - set(CATEGORIES)) + ["overall"]


def markdown_table(rows: SummaryRows, metric: str = "win_rate_no_ties", *, decimals: int = 3) -> str:
    """The paper's table: one column per category (+ overall), one row per label; values are fractions
    in [0, 1] (the paper prints percent).

    A row with several summaries gets cells like ``0.625 / 0.550`` (e.g. latent / weight merge), in the
    order given; a missing value is ``-``.
    """
    table = _rows(rows)
    columns = _columns(table)
    lines = [
        "| System | " + " | ".join(c.capitalize() for c in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for label, summaries in table.items():
        cells = []
        for column in columns:
            values = [s["results"].get(column, {}).get(metric) for s in summaries]
            cells.append(" / ".join("-" if v is None else f"{v:.{decimals}f}" for v in values))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


COUNT_FIELDS: tuple[str, ...] = ("a_wins", "b_wins", "ties", "invalid", "failed")


def counts_table(rows: SummaryRows) -> str:
    """The overall vote counts behind each row (so a run with no valid verdict still shows what it got)."""
    table = _rows(rows)
    lines = ["| System | A wins | B wins | Ties | Invalid | Failed |", "|---|---|---|---|---|---|"]
    for label, summaries in table.items():
        cells = [
            " / ".join(str(s["results"].get("overall", {}).get(f, 0)) for s in summaries)
            for f in COUNT_FIELDS
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_win_rates(
    rows: SummaryRows,
    path: str | Path,
    metric: str = "win_rate_no_ties",
    *,
    series_names: Sequence[str] | None = None,
) -> Path:
    """Grouped bar chart (PNG) of ``metric`` per category, one bar per (row, series), with CI whiskers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    table = _rows(rows)
    columns = _columns(table)
    series = [(label, k) for label, ss in table.items() for k in range(len(ss))]
    fig = Figure(figsize=(max(6.0, 1.6 * len(columns)), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    for n, (label, k) in enumerate(series):
        summary = table[label][k]
        heights, errs = [], [[], []]
        for column in columns:
            res = summary["results"].get(column, {})
            value, ci = res.get(metric), res.get(f"{metric}_ci")
            heights.append(np.nan if value is None else value)
            errs[0].append(0.0 if value is None or ci is None else max(0.0, value - ci[0]))
            errs[1].append(0.0 if value is None or ci is None else max(0.0, ci[1] - value))
        name = label if len(table[label]) == 1 else f"{label} ({series_names[k] if series_names else k + 1})"
        xs = np.arange(len(columns)) + (n - (len(series) - 1) / 2) * width
        ax.bar(xs, heights, width, yerr=errs, capsize=3, label=name)
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks(np.arange(len(columns)), [c.capitalize() for c in columns])
    ax.set_ylabel(f"{metric} (fraction)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
    return path


def write_report(
    rows: SummaryRows,
    out_dir: str | Path,
    metric: str = "win_rate_no_ties",
    *,
    series_names: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Write ``summary.json``, ``summary.md`` (markdown table) and ``win_rates.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = _rows(rows)
    paths = {"json": out / "summary.json", "markdown": out / "summary.md", "png": out / "win_rates.png"}
    paths["json"].write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    cells = f"; cells: {' / '.join(series_names)}" if series_names else ""
    note = f"Metric: {metric} (a fraction in [0, 1]){cells}\n\n"
    counts = (
        "\nJudgments (one per order; invalid: the reply names no verdict; "
        "failed: the endpoint refused the request):\n\n"
    )
    paths["markdown"].write_text(
        note + markdown_table(table, metric) + counts + counts_table(table), encoding="utf-8"
    )
    plot_win_rates(table, paths["png"], metric, series_names=series_names)
    return paths
