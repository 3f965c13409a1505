"""The demo's per-row passes against one setup at a time (same results but for float32 near-ties, each
listed with its logit margin), and its progress bars (every setup counted, as the user sees them)."""

import contextlib
import io
import json
import re
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import latent_merge_nnsight as lmn
from latent_merge_nnsight.demo import QUICK_GRID, run_demo
from latent_merge_nnsight.demo.checks import near_ties
from latent_merge_nnsight.demo.grid import eval_sets
from latent_merge_nnsight.demo.report import setup_label

GRID = replace(QUICK_GRID, n_per_category=4)
NEAR_TIE = 1e-3
"""Largest logit margin (top-1 minus top-2 log-probability) a float32 rounding difference may flip."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The quick grid (4 prompts a category) in per-row passes, with its progress bars on stderr, and one
    setup at a time."""
    out = tmp_path_factory.mktemp("demo_batched")
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        batched = run_demo(out / "batched", quick=True, progress=True, grid=GRID)
    single = run_demo(out / "single", quick=True, progress=False, grid=GRID, max_batch=1)
    return SimpleNamespace(batched=batched, single=single, stderr=stderr.getvalue(), out=out)


def _meta(run) -> dict:
    return json.loads(run.paths["meta"].read_text())


def test_batched_rows_equal_one_setup_at_a_time_but_for_near_ties(runs):
    batched, single = runs.batched, runs.single
    assert _meta(batched)["passes"] < _meta(single)["passes"]  # the batched run really shared passes
    assert len(batched.recipes) > 10
    prompts = {c: [e.prompt for e in ex] for c, ex in eval_sets(GRID.n_per_category, GRID.seed).items()}
    base, ft = lmn.load("toy-base"), lmn.load("toy-reasoner")
    differing = near_ties(batched.texts, single.texts, batched.recipes, prompts, base, ft)
    listing = "\n".join(map(str, differing))
    assert all(row.get("margin", np.inf) < NEAR_TIE for row in differing), listing
    # the tables agree wherever no answer differs (timings aside; probe numbers to float rounding)
    a, b = (r.results.drop(columns="seconds") for r in (batched, single))
    keys = ["system", "op", "site", "layer", "alpha", "lam", "schedule", "category"]
    assert a[keys].astype(str).equals(b[keys].astype(str))
    flipped = {(row["setup"], row["category"]) for row in differing}
    labels = [
        setup_label(r.system, r.op, r.layer, r.alpha, r.lam, r.site, r.schedule) for r in a.itertuples()
    ]
    same = np.array([(lab, c) not in flipped for lab, c in zip(labels, a["category"], strict=True)])
    assert (a["accuracy"][same] == b["accuracy"][same]).all()
    for column in ("norm_ratio", "source_weight"):
        np.testing.assert_allclose(a[column][same], b[column][same], rtol=1e-4, equal_nan=True)
    assert a["norm_ratio"].notna().sum() > 10  # the probe measured the per-row passes


def test_samples_and_identity_checks_agree(runs):
    meta = [_meta(r) for r in (runs.batched, runs.single)]
    for key in ("regmean_equals_lerp", "post_equals_next_pre", "n_systems", "n_refined"):
        assert meta[0][key] == meta[1][key], key
    assert meta[0]["regmean_equals_lerp"][0] == meta[0]["regmean_equals_lerp"][1]


def _final_counts(stderr: str) -> dict[str, tuple[int, int]]:
    """Each bar's last state as printed, `desc: ... n/total`, by its description."""
    found: dict[str, tuple[int, int]] = {}
    for part in re.split(r"[\r\n]", stderr):
        m = re.search(r"(lmn demo: [a-z ]+):.*?\|\s*(\d+)/(\d+)", part)
        if m:
            found[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    return found


def test_progress_bars_count_every_setup(runs):
    """Each phase's bar ends at its total (it used to end at 95/103), and the totals add up to the
    setups the run evaluated."""
    counts = _final_counts(runs.stderr)
    bars = dict(zip(["lmn demo: grid", "lmn demo: finer alphas"], runs.batched.bars, strict=True))
    shown = {desc: (total, total) for desc, (total, _) in bars.items() if total > 0}
    assert counts == shown, runs.stderr[-2000:]  # each bar printed ends at n == total
    assert all(counted == total for total, counted in bars.values()), bars
    setups = pd.read_csv(runs.out / "batched" / "results.csv").drop_duplicates(
        ["system", "op", "site", "layer", "alpha", "lam", "schedule"]
    )
    assert sum(total for total, _ in bars.values()) == len(setups) == _meta(runs.batched)["n_systems"]
