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
from latent_merge_nnsight.demo.grid import refine_alphas
from latent_merge_nnsight.evaluation.tasks import CATEGORIES, MAX_NEW_TOKENS, accuracy, make_eval_set

FIGURES = ("pareto.png", "tradeoff.png", "bars.png", "heatmap_mean.png", "heatmap_reasoning.png")


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
    for name in ("results.csv", "report.md", "meta.json", "samples.json", *FIGURES):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert {p.name for p in result.paths.values()} >= {"results.csv", "report.md", *FIGURES}


def test_results_csv_has_every_system_and_category(demo):
    _, out = demo
    df = pd.read_csv(out / "results.csv")
    assert list(df.columns[:10]) == [
        "system", "op", "site", "layer", "alpha", "lam", "schedule", "category", "accuracy", "n"
    ]  # fmt: skip
    pairs = set(zip(df["system"], df["op"].fillna(""), strict=True))
    expected = {("base", ""), ("reasoner", ""), ("ensemble", "")}
    expected |= {("weight", op) for op in ("lerp", "slerp", "regmean")}
    expected |= {("latent", op) for op in ("lerp", "slerp", "regmean", "delta")}
    assert pairs == expected
    # every setup has one row per category, on n held-out examples
    per_setup = df.fillna({"op": "", "site": "", "layer": -1, "lam": -1, "schedule": ""}).groupby(
        ["system", "op", "site", "layer", "alpha", "lam", "schedule"]
    )
    assert all(sorted(g["category"]) == sorted(CATEGORIES) for _, g in per_setup)
    assert (df["n"] == QUICK_GRID.n_per_category).all()
    assert df["accuracy"].between(0, 1).all()
    single = df[(df["system"] == "latent") & df["schedule"].isna()]
    # the middle and last of 6 layers, and layer 0 for the alpha = 1 limit
    assert set(single.loc[single["site"] == "pre", "layer"]) == {0, 3, 5}
    assert set(single.loc[single["site"] == "post", "layer"]) == {4, 5}


def test_grid_includes_site_post_at_the_last_layer_with_alpha_one_and_schedules(demo):
    _, out = demo
    df = pd.read_csv(out / "results.csv")
    latent = df[df["system"] == "latent"]
    post_last = latent[(latent["site"] == "post") & (latent["layer"] == 5) & latent["schedule"].isna()]
    assert {"lerp", "slerp", "regmean", "delta"} <= set(post_last["op"])
    assert (post_last.loc[post_last["op"] == "lerp", "alpha"] == 1.0).any()  # the limiting row
    assert set(latent["schedule"].dropna()) == {s.text for s in QUICK_GRID.schedules}
    # probes: a norm ratio for every live-source setup, a source weight where the last block's output is mixed
    live = latent[latent["op"].isin(["lerp", "slerp", "regmean"])]
    assert live["norm_ratio"].notna().all() and (live["norm_ratio"] > 0).all()
    assert post_last.loc[post_last["op"] != "delta", "source_weight"].between(0, 1).all()
    lerp1 = post_last[(post_last["op"] == "lerp") & (post_last["alpha"] == 1.0)]
    assert np.allclose(lerp1["source_weight"], 1.0)


def test_refine_alphas_fills_the_interval_of_a_jump():
    assert refine_alphas([(0, 0.04), (0.75, 0.02), (1, 0.94)], 4, 0.25) == [0.8, 0.85, 0.9, 0.95]
    assert refine_alphas([(0, 0.04), (0.5, 0.1), (1, 0.2)], 4, 0.25) == []
    assert refine_alphas([(0, 0.0), (1, 1.0)], 0, 0.25) == []


def test_identities_the_report_checks_hold(demo):
    """post L equals pre L+1 (the same residual stream); the base-head reading of alpha=1 is counted."""
    _, out = demo
    meta = json.loads((out / "meta.json").read_text())
    equal, compared = meta["post_equals_next_pre"]
    assert compared == len(QUICK_GRID.alphas) * len(CATEGORIES) and equal == compared
    same, prompts = meta["post_alpha1_vs_reasoner"]
    assert prompts == QUICK_GRID.n_per_category * len(CATEGORIES) and 0 <= same <= prompts


@torch.no_grad()
def _hf_accuracy(module: torch.nn.Module, tokenizer, n: int, seed: int) -> dict[str, float]:
    """An independent reference: greedy HF `generate` on the held-out chats (left-padded by hand, one
    batch per category, the category's token budget), scored by `tasks.accuracy`."""
    eos = tokenizer.eos_token_id
    pad = eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    result: dict[str, float] = {}
    for category in CATEGORIES:
        examples = make_eval_set(category, n, seed)
        chats = [[{"role": "user", "content": e.prompt}] for e in examples]
        ids = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
        ids = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in ids]
        width = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in ids])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])
        gen = module.generate(
            input_ids=input_ids, attention_mask=mask, max_new_tokens=MAX_NEW_TOKENS[category],
            do_sample=False, eos_token_id=eos, pad_token_id=pad,
        )  # fmt: skip
        result.update(accuracy(examples, tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)))
    return result


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
            ref = _hf_accuracy(module, model.tokenizer, QUICK_GRID.n_per_category, seed=0)
            got = df[df["system"] == system].set_index("category")["accuracy"]
            for category in CATEGORIES:
                assert got[category] == pytest.approx(ref[category]), (system, category)
    finally:
        torch.set_num_threads(threads)


def test_latent_regmean_with_one_source_matches_latent_lerp(demo):
    """With one source the paper's latent RegMean is LERP at alpha = beta: identical greedy outputs."""
    _, out = demo
    equal, compared = json.loads((out / "meta.json").read_text())["regmean_equals_lerp"]
    assert compared == 3 * len(CATEGORIES) and equal == compared  # pre L=3, pre L=5, post L=5


@pytest.mark.parametrize("name", FIGURES)
def test_figures_are_pngs_with_content(demo, name):
    _, out = demo
    assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(out / name)
    assert image.ndim == 3 and image.shape[0] >= 200 and image.shape[1] >= 300
    rgb = image[..., :3].reshape(-1, 3)
    assert float(rgb.var()) > 1e-3
    assert len(np.unique((rgb * 255).astype(np.uint8), axis=0)) > 20


def test_heatmaps_show_every_op_and_alpha_the_grid_ran(demo):
    from latent_merge_nnsight.demo.figures import heatmap_figures

    _, out = demo
    df = pd.read_csv(out / "results.csv")
    cells = df[(df["system"] == "latent") & (df["site"] == "pre") & df["schedule"].isna()]
    grid_alphas = {*QUICK_GRID.alphas, *(1 / (1 + lam) for lam in QUICK_GRID.regmean_lambdas)}
    grid_alphas |= set(QUICK_GRID.delta_strengths)
    ran = set(cells["alpha"])
    assert grid_alphas <= ran  # the grid's alphas ran (with any refined ones besides)
    for name, figure in heatmap_figures(df).items():
        panels = [ax for ax in figure.axes if ax.get_title()]
        assert [ax.get_title() for ax in panels] == ["lerp", "slerp", "regmean", "delta"], name
        for ax in panels:
            shown = [float(t.get_text()) for t in ax.get_xticklabels()]
            assert shown == sorted(ran), (name, ax.get_title())
            rows = [int(t.get_text()) for t in ax.get_yticklabels()]
            assert rows == sorted(set(cells["layer"].astype(int)))
            values = ax.images[0].get_array()
            ran_here = cells[cells["op"] == ax.get_title()]
            assert int(np.isfinite(values.filled(np.nan)).sum()) == len(ran_here.groupby(["layer", "alpha"]))


def test_report_has_the_tables_and_the_base_row_of_the_csv(demo):
    _, out = demo
    report = (out / "report.md").read_text()
    df = pd.read_csv(out / "results.csv")
    base = df[df["system"] == "base"].set_index("category")["accuracy"]
    cats = ("knowledge", "reasoning", "math", "coding")
    values = " | ".join(f"{base[c]:.2f}" for c in cats)
    skill = np.mean([base[c] for c in ("knowledge", "math", "coding")])
    balanced = (skill + base["reasoning"]) / 2
    assert f"| base |  | {values} | {skill:.2f} | {balanced:.2f} |" in report
    for op in ("lerp", "slerp", "regmean"):
        for row in (f"**{op}** latent, site pre", f"{op} latent, site post L=5", f"{op} weight"):
            assert f"| {row} |" in report
    for section in ("## What this run shows", "## Site post, last layer (L=5)", "## Multi-layer schedules",
                    "## Sample generations", "## Norm ratio"):  # fmt: skip
        assert section in report
    assert "![Pareto fronts" in report and "(pareto.png)" in report
    assert "acts much like a logit ensemble" not in report


def test_export_docs_links_only_the_copied_figure(demo, tmp_path):
    _, out = demo
    written = export_docs(out, tmp_path / "docs")
    assert {p.name for p in written} == {"report.md", "pareto.png"}
    report = (tmp_path / "docs" / "report.md").read_text()
    assert "(pareto.png)" in report and "bars.png" not in report and "heatmap" not in report
    assert "## Sample generations" in report


def _row(system, op, layer, alpha, accs, site=None):
    return [
        {"system": system, "op": op, "site": site, "layer": layer, "alpha": alpha, "lam": None,
         "schedule": None, "category": c, "accuracy": a, "n": 10, "seconds": 0.0}
        for c, a in zip(("knowledge", "reasoning", "math", "coding"), accs, strict=True)
    ]  # fmt: skip


META = {"base": "b", "source": "s", "n_layers": 6, "n_per_category": 10, "n_systems": 6, "seconds": 1.0,
        "threads": 1, "engine": "auto", "off_diagonal": 0.9, "versions": "x"}  # fmt: skip


def test_report_picks_the_best_by_balanced_score_and_names_the_winner_per_category(tmp_path):
    rows = _row("base", None, None, 0.0, (1.0, 0.1, 0.9, 1.0))
    rows += _row("reasoner", None, None, 1.0, (0.0, 0.9, 0.9, 0.2))
    rows += _row("latent", "lerp", 2, 0.5, (0.8, 0.6, 0.9, 0.9), "pre")  # balanced (0.867 + 0.6) / 2 = 0.73
    rows += _row("latent", "lerp", 2, 0.25, (0.9, 0.2, 0.9, 1.0), "pre")  # balanced 0.57
    rows += _row("latent", "lerp", 5, 0.5, (0.3, 0.9, 0.9, 0.3), "post")  # balanced 0.70
    rows += _row("weight", "lerp", None, 0.5, (0.9, 0.3, 0.9, 0.7))  # balanced 0.57
    text = write_report(pd.DataFrame(rows), tmp_path / "r.md", META, {}).read_text()
    assert (
        "| **lerp** latent, site pre | pre L=2 alpha=0.5 | 0.80 | 0.60 | 0.90 | 0.90 | 0.87 | 0.73 |" in text
    )
    assert (
        "| lerp latent, site post L=5 | post L=5 alpha=0.5 | 0.30 | 0.90 | 0.90 | 0.30 | 0.50 | 0.70 |"
        in text
    )
    assert "| lerp weight | alpha=0.5 | 0.90 | 0.30 | 0.90 | 0.70 | 0.83 | 0.57 |" in text
    assert "| lerp: best latent vs weight | | weight | latent | tie | latent | latent | latent |" in text
    # trade-off: base skill is (1 + 0.9 + 1) / 3; at >= 90% of it only L=2 alpha=0.25 qualifies (skill 0.933)
    assert "| latent, site pre | 0.20 (pre L=2 alpha=0.25) | 0.60 (pre L=2 alpha=0.5) |" in text
    assert "| weight lerp | - | 0.30 (alpha=0.5) |" in text


def test_findings_are_computed_from_the_numbers(tmp_path):
    """The same report code states different findings for different numbers: nothing is hard-coded."""
    rows = _row("base", None, None, 0.0, (1.0, 0.1, 0.9, 1.0))
    rows += _row("reasoner", None, None, 1.0, (0.0, 0.9, 0.9, 0.2))
    rows += _row("ensemble", None, None, 0.5, (0.9, 0.8, 0.9, 0.9))
    rows += _row("latent", "lerp", 3, 0.5, (0.9, 0.3, 0.9, 0.9), "pre")
    rows += _row("latent", "lerp", 5, 0.5, (0.9, 0.2, 0.9, 0.9), "post")
    rows += _row("latent", "lerp", 5, 1.0, (0.1, 0.9, 0.1, 0.1), "post")
    text = write_report(pd.DataFrame(rows), tmp_path / "a.md", META, {}).read_text()
    assert "site `pre` reaches (1 setups, single-layer and schedules) is 0.30" in text
    assert "reasoning goes from 0.20 at alpha 0.5 to 0.90 at alpha 1" in text
    # skill kept = skill / the base's skill: 0.9 / ((1.0 + 0.9 + 1.0) / 3) = 0.931
    assert "`ensemble b=0.5` (reasoning 0.80, skill kept 0.93) dominates the best latent merge" in text
    rows[-8:-4] = _row("latent", "lerp", 5, 0.5, (1.0, 0.95, 1.0, 1.0), "post")
    text = write_report(pd.DataFrame(rows), tmp_path / "b.md", META, {}).read_text()
    assert "is dominated by the best latent merge `latent-lerp post L=5 alpha=0.5`" in text


def test_probe_records_without_changing_tokens_or_the_op_registry():
    from latent_merge_nnsight.demo.probe import NormProbe
    from latent_merge_nnsight.evaluation.tasks import chat_messages, make_eval_set
    from latent_merge_nnsight.ops import get_op, list_ops

    before = {name: get_op(name) for name in list_ops()}
    base, ft = lmn.load("toy-base"), lmn.load("toy-reasoner")
    chats = [chat_messages(e.prompt) for e in make_eval_set("reasoning", 2, seed=0)]
    recipe = lmn.Recipe(op="lerp", site="post", layers={5: 0.9})
    plain = lmn.generate(base, ft, chats, recipe, max_new_tokens=16)
    probe = NormProbe()
    with probe.recording(recipe, n_layers=6):
        seen = lmn.generate(base, ft, chats, recipe, max_new_tokens=16)
    assert seen.tokens == plain.tokens
    summary = probe.summary()
    assert 0 < summary["norm_ratio"] < 10 and 0 < summary["source_weight"][5] < 1
    assert {name: get_op(name) for name in list_ops()} == before  # the op is put back as it was
