"""`lmn demo --quick` on the shipped toy pair: files, table contents, figures, and the report's logic."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
import torch

import latent_merge_nnsight as lmn
from latent_merge_nnsight.demo import QUICK_GRID, export_docs, write_report
from latent_merge_nnsight.evaluation.tasks import CATEGORIES, evaluate_model

FIGURES = ("tradeoff.png", "bars.png", "heatmap_mean.png", "heatmap_reasoning.png")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`lmn demo --quick` run as a user runs it (a subprocess of the console entry point)."""
    out = tmp_path_factory.mktemp("demo")
    cmd = [
        sys.executable,
        "-m",
        "latent_merge_nnsight.cli",
        "demo",
        "--quick",
        "--no-progress",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line.strip().split(": ", 1) for line in proc.stdout.splitlines() if line.startswith("  ")]
    return SimpleNamespace(paths={name: Path(path) for name, path in lines}), out


def test_quick_demo_writes_every_file(demo):
    result, out = demo
    for name in ("results.csv", "report.md", "meta.json", *FIGURES):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert {p.name for p in result.paths.values()} >= {"results.csv", "report.md", *FIGURES}


def test_results_csv_has_every_system_and_category(demo):
    _, out = demo
    df = pd.read_csv(out / "results.csv")
    assert list(df.columns[:8]) == ["system", "op", "layer", "alpha", "lam", "category", "accuracy", "n"]
    pairs = set(zip(df["system"], df["op"].fillna(""), strict=True))
    expected = {("base", ""), ("reasoner", ""), ("ensemble", "")}
    expected |= {("weight", op) for op in ("lerp", "slerp", "regmean")}
    expected |= {("latent", op) for op in ("lerp", "slerp", "regmean", "delta")}
    assert pairs == expected
    # every setup has one row per category, on n held-out examples
    per_setup = df.fillna({"op": "", "layer": -1, "lam": -1}).groupby(
        ["system", "op", "layer", "alpha", "lam"]
    )
    assert all(sorted(g["category"]) == sorted(CATEGORIES) for _, g in per_setup)
    assert (df["n"] == QUICK_GRID.n_per_category).all()
    assert df["accuracy"].between(0, 1).all()
    latent = df[df["system"] == "latent"]
    assert set(latent["layer"]) == {3, 5}  # the middle and the last of the toy pair's 6 layers


def test_base_and_reasoner_rows_match_hf_generate(demo):
    """The demo's accuracies (lmn.generate) equal an independent evaluation with HF `generate`."""
    _, out = demo
    df = pd.read_csv(out / "results.csv")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the demo does: more threads only slow a model this small on a shared CPU
    try:
        for system, name in (("base", "toy-base"), ("reasoner", "toy-reasoner")):
            model = lmn.load(name)
            module = lmn.models.hf_module(model)
            with torch.no_grad():
                ref = evaluate_model(
                    module, model.tokenizer, n_per_category=QUICK_GRID.n_per_category, seed=0
                )
            got = df[df["system"] == system].set_index("category")["accuracy"]
            for category in CATEGORIES:
                assert got[category] == pytest.approx(ref[category]), (system, category)
    finally:
        torch.set_num_threads(threads)


def test_latent_regmean_with_one_source_matches_latent_lerp(demo):
    """With one source the paper's latent RegMean is LERP at alpha = beta: identical greedy outputs."""
    _, out = demo
    equal, compared = json.loads((out / "meta.json").read_text())["regmean_equals_lerp"]
    assert compared == 2 * len(CATEGORIES) and equal == compared


@pytest.mark.parametrize("name", FIGURES)
def test_figures_are_pngs_with_content(demo, name):
    _, out = demo
    assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(out / name)
    assert image.ndim == 3 and image.shape[0] >= 200 and image.shape[1] >= 300
    rgb = image[..., :3].reshape(-1, 3)
    assert float(rgb.var()) > 1e-3
    assert len(np.unique((rgb * 255).astype(np.uint8), axis=0)) > 20


def test_report_has_the_paper_table_and_the_base_row_of_the_csv(demo):
    _, out = demo
    report = (out / "report.md").read_text()
    df = pd.read_csv(out / "results.csv")
    base = df[df["system"] == "base"].set_index("category")["accuracy"]
    cats = ("knowledge", "reasoning", "math", "coding")
    values = " | ".join(f"{base[c]:.2f}" for c in cats)
    assert f"| base |  | {values} | {np.mean([base[c] for c in cats]):.2f} |" in report
    for op in ("lerp", "slerp", "regmean"):
        for row in (f"**{op}** latent (mid)", f"{op} latent (last)", f"{op} weight", f"{op}: winner"):
            assert f"| {row} |" in report
    assert "![Trade-off" in report and "(tradeoff.png)" in report


def test_export_docs_links_only_the_copied_figure(demo, tmp_path):
    _, out = demo
    written = export_docs(out, tmp_path / "docs")
    assert {p.name for p in written} == {"report.md", "tradeoff.png"}
    report = (tmp_path / "docs" / "report.md").read_text()
    assert "(tradeoff.png)" in report and "bars.png" not in report and "heatmap" not in report


def _row(system, op, layer, alpha, accs):
    return [
        {"system": system, "op": op, "layer": layer, "alpha": alpha, "lam": None, "category": c,
         "accuracy": a, "n": 10, "seconds": 0.0}
        for c, a in zip(("knowledge", "reasoning", "math", "coding"), accs, strict=True)
    ]  # fmt: skip


def test_report_picks_the_best_by_mean_and_names_the_winner_per_category(tmp_path):
    rows = _row("base", None, None, 0.0, (1.0, 0.1, 0.9, 1.0))
    rows += _row("reasoner", None, None, 1.0, (0.0, 0.9, 0.9, 0.2))
    rows += _row("latent", "lerp", 2, 0.5, (0.8, 0.6, 0.9, 0.9))  # mean 0.80: best mid-layer latent
    rows += _row("latent", "lerp", 2, 0.25, (0.9, 0.2, 0.9, 1.0))  # mean 0.75
    rows += _row("latent", "lerp", 5, 0.5, (0.3, 0.9, 0.9, 0.3))  # last layer, reported apart
    rows += _row("weight", "lerp", None, 0.5, (0.9, 0.3, 0.9, 0.7))  # mean 0.70
    meta = {"base": "b", "source": "s", "n_layers": 6, "n_per_category": 10, "n_systems": 6, "seconds": 1.0,
            "threads": 1, "engine": "auto", "off_diagonal": 0.9, "versions": "x"}  # fmt: skip
    text = write_report(pd.DataFrame(rows), tmp_path / "r.md", meta, {}).read_text()
    assert "| **lerp** latent (mid) | L=2 alpha=0.5 | 0.80 | 0.60 | 0.90 | 0.90 | 0.80 |" in text
    assert "| lerp latent (last) | L=5 alpha=0.5 | 0.30 | 0.90 | 0.90 | 0.30 | 0.60 |" in text
    assert "| lerp weight | alpha=0.5 | 0.90 | 0.30 | 0.90 | 0.70 | 0.70 |" in text
    assert "| lerp: winner | | weight | latent | tie | latent | latent |" in text
    # trade-off: base skill is (1 + 0.9 + 1) / 3; at >= 90% of it only L=2 alpha=0.25 qualifies (skill 0.933)
    assert "| latent lerp (mid) | 0.20 (L=2 alpha=0.25) | 0.60 (L=2 alpha=0.5) |" in text
    assert "| weight lerp | - | 0.30 (alpha=0.5) |" in text
