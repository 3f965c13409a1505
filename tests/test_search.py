"""`lmn search` / `analysis.search` on the shipped toy pair with a budget of a few trials: determinism,
a real SIGKILL and resume, the written winner reproducing its test-split score, unmet constraints."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import latent_merge_nnsight as lmn
from latent_merge_nnsight import analysis, cli
from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.evaluation.tasks import CATEGORIES, make_eval_set
from latent_merge_nnsight.systems.spec import System

pytest.importorskip("optuna")

SMALL = {"n_search": 2, "n_test": 3, "progress": False}
SPACE = analysis.SearchSpace(layers=(3, 4, 5))


def _study_rows(db: Path) -> list[tuple[int, str]]:
    with sqlite3.connect(db, timeout=30) as con:
        return con.execute("SELECT number, state FROM trials ORDER BY number").fetchall()


@pytest.fixture(scope="module")
def searched(pair, tmp_path_factory):
    """One small search (3 trials) with its files."""
    out = tmp_path_factory.mktemp("search")
    return analysis.search(*pair, trials=3, seed=7, space=SPACE, out=out, **SMALL), out


def test_search_is_deterministic_with_a_seed(pair, searched, tmp_path):
    first, _ = searched
    again = analysis.search(*pair, trials=3, seed=7, space=SPACE, out=tmp_path, **SMALL)
    cols = ["trial", "setup", *CATEGORIES, "skill_kept", "feasible"]
    pd.testing.assert_frame_equal(first.trials[cols], again.trials[cols])
    assert first.winner == again.winner and first.test == again.test
    assert first.trials["setup"].nunique() == 3  # three different proposals, not one repeated


@pytest.mark.parametrize("parallel", [1, 4])
def test_killed_search_resumes_exactly_the_remaining_trials(pair, tmp_path, parallel):
    """SIGKILL `lmn search` after k finished trials, resume in-process: k + the rest = the budget, no
    finished trial is evaluated again, and a trial cut off mid-run is run again with its parameters (with
    `--parallel-trials 4`, trials asked together and not all told when the kill comes)."""
    base, ft = pair
    out, total = tmp_path / "killed", 5
    args = ["--trials", str(total), "--n-search", "2", "--n-test", "3", "--layers", "3", "4", "5"]
    args += ["--parallel-trials", str(parallel)]
    cmd = [sys.executable, "-m", "latent_merge_nnsight.cli", "search", "--base", "toy-base",
           "--source", "toy-reasoner", "--out", str(out), "--no-progress", *args]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    db = out / "study.db"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"lmn search ended before it was killed: {proc.stderr.read().decode()[-2000:]}")
            if db.exists():
                try:
                    done = [n for n, s in _study_rows(db) if s == "COMPLETE"]
                except sqlite3.OperationalError:  # the tables are not made yet, or locked
                    done = []
                if len(done) >= 2:
                    break
            time.sleep(0.05)
        else:
            pytest.fail("lmn search finished no 2 trials within the deadline")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    import optuna

    before = optuna.load_study(study_name="lmn-search", storage=f"sqlite:///{db.resolve()}").get_trials()
    finished = {t.number: (t.params, t.value) for t in before if t.state.name == "COMPLETE"}
    cut = [t.params for t in before if t.state.name == "RUNNING"]
    assert 2 <= len(finished) < total

    result = analysis.search(base, ft, trials=total, space=analysis.SearchSpace(layers=(3, 4, 5)),
                             out=out, parallel_trials=parallel, **SMALL)  # fmt: skip
    assert result.n_evaluated == total - len(finished)
    after = optuna.load_study(study_name="lmn-search", storage=f"sqlite:///{db.resolve()}").get_trials()
    complete = [t for t in after if t.state.name == "COMPLETE"]
    assert len(complete) == total and len(result.trials) == total
    for t in complete:
        if t.number in finished:
            assert (t.params, t.value) == finished[t.number]  # kept, not rerun
    new = [t for t in complete if t.number not in finished]
    assert len(new) == total - len(finished)
    for params in cut:  # the cut-off trial is not lost: what it had drawn ran to completion after the resume
        assert any(all(t.params.get(k) == v for k, v in params.items()) for t in new), params
    assert all(t.state.name in ("COMPLETE", "FAIL") for t in after)


def test_parallel_trials_score_each_trial_as_its_own_evaluation(pair, tmp_path):
    """Trials asked together and scored in one pass get the metrics their recipe gets alone."""
    base, ft = pair
    result = analysis.search(
        base, ft, trials=4, seed=3, space=SPACE, out=tmp_path, parallel_trials=4, **SMALL
    )
    assert result.n_evaluated == 4 and result.trials["setup"].nunique() == 4
    from latent_merge_nnsight.analysis.search import _splits, task_metrics

    search_set, _ = _splits(SMALL["n_search"], SMALL["n_test"], 0)
    evaluate = analysis.TaskAccuracy()
    base_skill = task_metrics(
        {c: r["accuracy"] for c, r in evaluate(base, None, None, search_set).items()}, None
    )["skill"]
    for _, row in result.trials.iterrows():
        recipe = lmn.Recipe.model_validate(json.loads(row["recipe"]))
        alone = {c: r["accuracy"] for c, r in evaluate(base, [ft], recipe, search_set).items()}
        metrics = task_metrics(alone, base_skill)
        assert all(row[c] == metrics[c] for c in CATEGORIES), (row["trial"], metrics)


def test_written_recipe_reproduces_the_test_split_score(pair, searched):
    base, ft = pair
    result, out = searched
    recipe = lmn.Recipe.from_file(out / "winner.yaml")
    assert recipe == result.winner
    # the test split, rebuilt from the public task generator: the questions after the search split
    test = [e for c in CATEGORIES for e in make_eval_set(c, 2 + 3, seed=0)[2:]]
    search_prompts = {e.prompt for c in CATEGORIES for e in make_eval_set(c, 2, seed=0)}
    assert not search_prompts & {e.prompt for e in test}
    got = analysis.TaskAccuracy()(base, [ft], recipe, test)
    for c in CATEGORIES:
        assert got[c]["accuracy"] == pytest.approx(result.test[c]), c
    system = System.from_file(out / "system.yaml")
    assert system.kind == "latent" and system.recipe == recipe
    assert system.base == "toy-base" and system.sources == ["toy-reasoner"]
    code = cli.main(["generate", "--base", "toy-base", "--source", "toy-reasoner", "--recipe",
                         str(out / "winner.yaml"), "--prompt", "What is 2+3?", "--chat",
                         "--max-new-tokens", "4"])  # fmt: skip
    assert code == 0
    for name in ("trials.csv", "pareto.csv", "pareto.md", "pareto.png", "result.json", "study.db"):
        assert (out / name).stat().st_size > 0, name


def test_a_constraint_no_trial_meets_gives_a_clear_message(pair, tmp_path):
    base, ft = pair
    with pytest.raises(LatentMergeError) as err:
        analysis.search(
            base, ft, trials=2, constraints={"skill_kept": 2.0}, space=SPACE, out=tmp_path, **SMALL
        )
    message = str(err.value)
    assert "no trial of 2 met the constraints skill_kept >= 2 on the search split" in message
    assert "the closest, trial" in message and "--min" in message and "--trials" in message
    assert (tmp_path / "trials.csv").is_file()  # what was run is kept


def test_search_arguments_are_checked_before_any_model_runs():
    with pytest.raises(LatentMergeError, match="target names 'reasonnig'; expected one of: knowledge"):
        analysis.search(None, None, target="reasonnig")
    with pytest.raises(LatentMergeError, match=r"constraints names 'skil'"):
        analysis.search(None, None, constraints={"skil": 0.9})
    with pytest.raises(LatentMergeError, match="trials=0; expected an int >= 1"):
        analysis.search(None, None, trials=0)


def test_a_study_extended_to_more_trials_runs_only_the_new_ones(pair, tmp_path):
    first = analysis.search(*pair, trials=6, space=SPACE, out=tmp_path, **SMALL)
    more = analysis.search(*pair, trials=9, space=SPACE, out=tmp_path, **SMALL)
    assert (first.n_evaluated, more.n_evaluated) == (6, 3)
    assert list(more.trials["trial"]) == list(range(9))
    pd.testing.assert_frame_equal(more.trials.iloc[:6].reset_index(drop=True), first.trials)  # kept as run
    assert analysis.search(*pair, trials=9, space=SPACE, out=tmp_path, **SMALL).n_evaluated == 0


def test_resuming_with_other_settings_is_refused(pair, tmp_path):
    base, ft = pair
    analysis.search(base, ft, trials=1, space=SPACE, out=tmp_path, **SMALL)
    with pytest.raises(LatentMergeError, match="target='mean' differs from the study stored in"):
        analysis.search(base, ft, trials=2, target="mean", space=SPACE, out=tmp_path, **SMALL)


def test_cli_search_refuses_a_malformed_constraint(capsys):
    code = cli.main(["search", "--base", "toy-base", "--source", "toy-reasoner", "--min", "skill_kept"])
    assert code == 2
    assert "--min 'skill_kept'; expected METRIC=VALUE, e.g. skill_kept=0.9" in capsys.readouterr().err
