"""`analysis.LmEvalTasks`: the layer x alpha sweep on lm-eval tasks, its cells in shared engine passes.

The reference for each cell is lm-eval's own `simple_evaluate` with the `latent-merge` model for that one
recipe (a recipe file in `model_args`, models loaded by the system path), in float64. Local tasks only
(`dataset_path: json`, no network): multiple choice, rolling loglikelihood and `generate_until`.
"""

import math
import os
import subprocess
import sys

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before datasets is imported by lm-eval
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lm_eval  # noqa: E402
import torch  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from test_lm_eval import write_tasks  # noqa: E402

import latent_merge_nnsight as lmn  # noqa: E402
from latent_merge_nnsight import LatentMergeError, analysis  # noqa: E402
from latent_merge_nnsight.evaluation import lm_eval_model  # noqa: E402
from latent_merge_nnsight.zoo import zoo_path  # noqa: E402

TASKS = ["toy_mc", "toy_ppl", "toy_gen"]
GRID = dict(ops=["lerp", "slerp"], layers=[1, 4], alphas=[0.3, 0.9])
METRICS = {  # (task, lm-eval's key) -> the sweep's metric name
    ("toy_mc", "acc,none"): "toy_mc/acc",
    ("toy_ppl", "word_perplexity,none"): "toy_ppl/word_perplexity",
    ("toy_gen", "exact_match,none"): "toy_gen/exact_match",
}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def toy64():
    return tuple(lmn.load(zoo_path(n), dtype=torch.float64) for n in ("toy-base", "toy-reasoner"))


def one_recipe_reference(tasks, recipe_file, dtype="float64"):
    """lm-eval's own run of the `latent-merge` model for one recipe (loaded from a recipe file)."""
    return lm_eval.simple_evaluate(
        model="latent-merge",
        model_args=f"base={zoo_path('toy-base')},source={zoo_path('toy-reasoner')},recipe={recipe_file},"
        f"dtype={dtype}",
        tasks=TASKS,
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        batch_size=4,
        bootstrap_iters=0,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )


class EngineCalls:
    """Counts `lmn.score` / `lmn.generate` calls of the `latent-merge` model: (kind, rows, recipes)."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, int, int]] = []
        for name in ("score", "generate"):
            real = getattr(lm_eval_model, name)
            monkeypatch.setattr(lm_eval_model, name, self._wrap(name, real))

    def _wrap(self, name, real):
        def counted(base, sources, prompts, recipe, *args, **kwargs):
            rows = len(prompts) if name == "score" else int(kwargs["input_ids"].shape[0])
            distinct = {repr(r) for r in recipe} if isinstance(recipe, list) else {repr(recipe)}
            self.calls.append((name, rows, len(distinct)))
            return real(base, sources, prompts, recipe, *args, **kwargs)

        return counted


def test_a_sweep_on_lm_eval_tasks_equals_lm_evals_one_recipe_runs_in_fewer_passes(
    tasks, toy64, tmp_path, monkeypatch
):
    base, ft = toy64
    evaluate = analysis.LmEvalTasks(TASKS, include_path=tasks, include_defaults=False, batch_size=64)
    engine = EngineCalls(monkeypatch)
    df = analysis.sweep(base, ft, **GRID, evaluate=evaluate, prompts=None, baselines=(), progress=False)
    monkeypatch.undo()
    cells = list(df.groupby(["op", "layer", "alpha"], sort=False))
    assert len(cells) == 8
    # one engine pass for all 8 cells: the 12 choices + 2 texts + 3 questions, each once per cell, in
    # forwards of 64 rows mixing the cells' recipes (loglikelihood 96 rows, rolling 16, generation 24)
    assert [(kind, rows) for kind, rows, _ in engine.calls] == [
        ("score", 64), ("score", 32), ("score", 16), ("generate", 24)
    ]  # fmt: skip
    assert len(engine.calls) < len(cells)
    assert all(n_recipes > 1 for _, _, n_recipes in engine.calls)

    for (op, layer, alpha), rows in cells:
        recipe_file = tmp_path / f"{op}-{layer}-{alpha}.yaml"
        recipe_file.write_text(f"op: {op}\nlayers: {{{layer}: {alpha}}}\n")
        ref = one_recipe_reference(tasks, recipe_file)["results"]
        got = dict(zip(rows["metric"], rows["value"], strict=True))
        assert set(got) == set(METRICS.values())
        for (task, key), name in METRICS.items():
            assert got[name] == pytest.approx(ref[task][key], rel=1e-9), (op, layer, alpha, name)
    perplexities = df[df["metric"] == "toy_ppl/word_perplexity"]["value"]
    assert perplexities.nunique() == 8  # every cell merged its own way
    assert all(math.isfinite(v) for v in df["value"])


def test_the_baseline_is_the_base_alone_and_a_results_file_of_other_tasks_is_refused(tasks, toy64, tmp_path):
    base, ft = toy64
    out = tmp_path / "sweep.jsonl"
    grid = dict(ops=["lerp"], layers=[2], alphas=[0.0], progress=False, out=out)
    ev = analysis.LmEvalTasks(["toy_mc"], include_path=tasks, include_defaults=False, limit=3)
    df = analysis.sweep(base, ft, **grid, evaluate=ev)
    by_system = df.set_index(["system", "metric"])["value"]
    ref = lm_eval.simple_evaluate(
        model="latent-merge", model_args=f"base={zoo_path('toy-base')},dtype=float64", tasks=["toy_mc"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False), limit=3, bootstrap_iters=0,
    )  # fmt: skip
    assert by_system[("base", "toy_mc/acc")] == ref["results"]["toy_mc"]["acc,none"]
    assert by_system[("latent", "toy_mc/acc")] == by_system[("base", "toy_mc/acc")]  # alpha 0: the base
    other = analysis.LmEvalTasks(["toy_mc"], include_path=tasks, include_defaults=False, limit=4)
    with pytest.raises(LatentMergeError, match="different sweep"):
        analysis.sweep(base, ft, **grid, evaluate=other)


def test_prompts_are_none_exactly_for_evaluators_with_their_own_data(tasks, toy64):
    base, ft = toy64
    grid = dict(ops=["lerp"], layers=[2], alphas=[0.5], progress=False)
    with pytest.raises(LatentMergeError, match=r"prompts=None, but evaluate=Perplexity.* needs prompts"):
        analysis.sweep(base, ft, **grid, evaluate=analysis.Perplexity())
    ev = analysis.LmEvalTasks("toy_mc", include_path=tasks, include_defaults=False)
    with pytest.raises(LatentMergeError, match=r"brings its own data .*pass prompts=None"):
        analysis.sweep(base, ft, **grid, evaluate=ev, prompts=["a text"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(tasks=[]), "tasks=.*expected one or more"),
        (dict(tasks=["no_such_task"]), r"unknown task\(s\) \['no_such_task'\]"),
        (dict(tasks=["toy_mc"], include_path="/no/such/dir"), "include_path='/no/such/dir': no such folder"),
        (dict(tasks=["toy_mc"], limit=0), "limit=0; expected an int >= 1"),
        (dict(tasks=["toy_mc"], limit=1.5), "limit=1.5"),
        (dict(tasks=["toy_mc"], batch_size=0), "batch_size=0"),
        (dict(tasks=["toy_mc"], num_fewshot=-1), "num_fewshot=-1"),
        (dict(tasks=["toy_mc"], engine="vllm"), "engine='vllm'"),
    ],
)
def test_bad_arguments_are_named(tasks, kwargs, match):
    kwargs.setdefault("include_path", tasks)
    with pytest.raises(LatentMergeError, match=match):
        analysis.LmEvalTasks(**kwargs, include_defaults=False)


def test_the_package_and_analysis_import_no_lm_eval_until_an_evaluator_is_made():
    code = (
        "import sys; import latent_merge_nnsight as lmn\n"
        "assert 'torch' not in sys.modules and 'lm_eval' not in sys.modules\n"
        "from latent_merge_nnsight import analysis\n"
        "cls = analysis.LmEvalTasks\n"
        "assert 'lm_eval' not in sys.modules, 'analysis.LmEvalTasks imported lm_eval'\n"
        "assert cls.__name__ == 'LmEvalTasks' and 'LmEvalTasks' in analysis.__all__\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_from_models_needs_a_recipe_and_use_recipe_names_its_range(toy64):
    base, ft = toy64
    with pytest.raises(LatentMergeError, match=r"recipes=\[\] is empty"):
        lm_eval_model.LatentMergeLM.from_models(base, ft, [])
    lm = lm_eval_model.LatentMergeLM.from_models(base, ft, [None, lmn.Recipe(op="lerp", layers={2: 0.5})])
    with pytest.raises(LatentMergeError, match=r"k=2; expected an int in \[0, 1\]"):
        lm.use_recipe(2)
    # the two recipes' answers to one request come from one lmn.score call; recipe 0 is the base alone
    request = [(None, [5, 6, 7], [8, 9])]
    lm.use_recipe(1)
    merged = lm._loglikelihood_tokens(request)
    lm.use_recipe(0)
    alone = lm._loglikelihood_tokens(request)
    assert alone[0][0] == pytest.approx(lmn.score(base, None, [[5, 6, 7]], [[8, 9]]).totals[0], abs=1e-12)
    want = lmn.score(base, ft, [[5, 6, 7]], [[8, 9]], lmn.Recipe(op="lerp", layers={2: 0.5}))
    assert merged[0][0] == pytest.approx(want.totals[0], abs=1e-12) and merged != alone


def test_lmn_sweep_on_lm_eval_tasks_writes_lm_evals_numbers_per_cell_and_a_heatmap_per_metric(
    tasks, tmp_path
):
    """`lmn sweep --eval lm-eval:TASK,TASK` as a user runs it: each cell's numbers are lm-eval's own run of
    that recipe, and every task metric gets its heatmap; a task lm-eval does not know is one flag error."""
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "latent_merge_nnsight.cli", "sweep", "--base", str(zoo_path("toy-base"))]
    cmd += [
        "--source",
        str(zoo_path("toy-reasoner")),
        "--dtype",
        "float64",
        "--ops",
        "slerp",
        "--layers",
        "2",
    ]
    cmd += ["--alphas", "0.4", "0.8", "--include-path", str(tasks), "--no-progress", "--out", str(out)]
    done = subprocess.run([*cmd, "--eval", "lm-eval:toy_mc,toy_ppl"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    import pandas as pd

    df = pd.read_csv(out / "results.csv")
    assert {p.name for p in out.glob("heatmap_*.png")} == {
        "heatmap_toy_mc-acc.png",
        "heatmap_toy_ppl-word_perplexity.png",
    }
    for alpha in (0.4, 0.8):
        recipe_file = tmp_path / f"slerp-{alpha}.yaml"
        recipe_file.write_text(f"op: slerp\nlayers: {{2: {alpha}}}\n")
        ref = lm_eval.simple_evaluate(
            model="latent-merge",
            model_args=f"base={zoo_path('toy-base')},source={zoo_path('toy-reasoner')},recipe={recipe_file},"
            "dtype=float64",
            tasks=["toy_mc", "toy_ppl"],
            task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
            bootstrap_iters=0,
        )["results"]
        rows = df[(df["op"] == "slerp") & (df["alpha"] == alpha)]
        got = dict(zip(rows["metric"], rows["value"], strict=True))
        assert got["toy_mc/acc"] == pytest.approx(ref["toy_mc"]["acc,none"], rel=1e-9)
        assert got["toy_ppl/word_perplexity"] == pytest.approx(
            ref["toy_ppl"]["word_perplexity,none"], rel=1e-9
        )

    bad = subprocess.run([*cmd, "--eval", "lm-eval:no_such_task", "--fresh"], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("lmn sweep: error: --eval lm-eval:no_such_task")
    assert "no_such_task" in bad.stderr.strip().splitlines()[-1]
