"""`Perplexity.batch`: recipes scored on the same texts in one `lmn.score` call equal one call each."""

import pytest
from tiny import pair

import latent_merge_nnsight as lmn
from latent_merge_nnsight.analysis import Perplexity, evaluators, sweep

TEXTS = ["The cat sat on the mat.", "Hi there!", "Merging in latent space", "abc xyz"]
RECIPES = [
    lmn.Recipe(op="lerp", layers={1: 0.3}),
    lmn.Recipe(op="slerp", layers={2: 0.7}, site="post"),
    None,
    lmn.Recipe(op="lerp", layers={0: 0.5}, positions="all"),
    lmn.Recipe(op="slerp", layers={1: 0.5, 3: 0.2}),
    lmn.Recipe(op="lerp", layers={2: 0.4}, positions=[0, 1]),  # explicit positions: its own call
]


@pytest.fixture(scope="module")
def models():
    return pair("qwen2", n_layers=4)  # float64


def counting_score(monkeypatch):
    calls: list[int] = []
    real = evaluators.score

    def wrapped(*args, **kwargs):
        calls.append(len(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluators, "score", wrapped)
    return calls


@pytest.mark.parametrize("reuse_prefix", [False, True])
def test_a_list_of_recipes_scores_as_one_call_per_recipe(models, monkeypatch, reuse_prefix):
    base, ft = models
    ev = Perplexity(batch_size=5, reuse_prefix=reuse_prefix)
    want = [ev(base, [ft], r, TEXTS) for r in RECIPES]
    calls = counting_score(monkeypatch)
    got = ev.batch(base, [ft], RECIPES, TEXTS)
    for g, w in zip(got, want, strict=True):
        assert g["n_tokens"] == w["n_tokens"]
        assert g["nll"] == pytest.approx(w["nll"], abs=1e-10)
        assert g["perplexity"] == pytest.approx(w["perplexity"], rel=1e-10)
    assert len({round(g["nll"], 8) for g in got}) == len(RECIPES)  # every recipe scored its own way
    if not reuse_prefix:  # all but the explicit positions in one call, one row per (recipe, text)
        assert calls == [5 * len(TEXTS)]
    else:  # prefix reuse takes the single-layer recipes above layer 0; the rest share one call
        assert calls == [3 * len(TEXTS)]


def test_a_sweep_with_batched_perplexity_equals_one_cell_a_call(models):
    base, ft = models
    grid = dict(ops=["lerp", "slerp"], layers=[1, 3], alphas=[0.25, 0.75], prompts=TEXTS, progress=False)
    ev = Perplexity(batch_size=16, reuse_prefix=False)
    batched = sweep(base, ft, **grid, evaluate=ev)  # 4 cells (16 rows) a pass
    alone = sweep(base, ft, **grid, evaluate=ev, max_batch=1)
    assert batched[["system", "op", "layer", "alpha", "metric"]].equals(
        alone[["system", "op", "layer", "alpha", "metric"]]
    )
    assert batched["value"].tolist() == pytest.approx(alone["value"].tolist(), rel=1e-10)
