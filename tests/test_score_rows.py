"""`lmn.score` with per-row recipes (`recipe=[r0, r1, ...]`, one per row): one call scores each row as a
call with that row's recipe alone on that row (float64 tiny models), for rows differing in op, layers,
alphas, site and positions, left and right padding, any batch size; a row at alpha 0 or None is the
base alone; the refusals name `recipe`. The single-recipe calls are themselves checked against a
plain-hook reference in tests/test_score.py."""

from pathlib import Path

import pytest
from tiny import pair

import latent_merge_nnsight as lmn
from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.systems import load_system, logprobs

CONTEXTS = ["the cat", "a", "hello there, how", "xy", "merge me", "one more row", "q", "last one here"]
CONTINUATIONS = [" sat down", "bc", " are you", "z", " now!", " to score", " r s", "!"]

RECIPES = [
    lmn.Recipe(op="slerp", layers={1: 0.3, 2: 0.6}),
    lmn.Recipe(op="lerp", layers={2: 0.8}),
    None,  # the base alone
    lmn.Recipe(op="slerp", layers={0: 0.5}, site="post"),
    lmn.Recipe(op="lerp", layers={1: 0.4}, positions="all"),
    lmn.Recipe(op="slerp", layers={2: 0.9}, positions=[0, -1]),
    lmn.Recipe(op="slerp", layers={1: 0.0, 3: 0.7}),
    lmn.Recipe(op="slerp", layers={2: 0.0}),  # merges nowhere: the base alone
]


@pytest.fixture(scope="module")
def models():
    base, ft = pair("qwen2", n_layers=4, seed=0)
    return base, ft


def _alone(base, ft, recipes, **kw):
    """Row i scored in a call of its own, with recipes[i]."""
    return [
        lmn.score(base, ft, [c], [n], r, **kw)
        for c, n, r in zip(CONTEXTS, CONTINUATIONS, recipes, strict=True)
    ]


def _close(a, b):
    return max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1e-10


@pytest.mark.parametrize("batch_size", [1, 3, 8])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_row_recipes_score_each_row_as_a_call_of_its_own(models, padding_side, batch_size):
    base, ft = models
    alone = _alone(base, ft, RECIPES, top=3)
    got = lmn.score(
        base, ft, CONTEXTS, CONTINUATIONS, RECIPES, batch_size=batch_size, padding_side=padding_side, top=3
    )
    assert got.recipe == RECIPES
    plain = lmn.score(base, None, CONTEXTS, CONTINUATIONS, None)
    for i, one in enumerate(alone):
        assert got.tokens[i] == one.tokens[0]
        assert _close(got.logprobs[i], one.logprobs[0]), i
        assert got.greedy[i] == one.greedy[0]
        assert [tuple(t for t, _ in alts) for alts in got.top[i]] == [
            tuple(t for t, _ in alts) for alts in one.top[0]
        ]
        merges = RECIPES[i] is not None and any(RECIPES[i].layer_alphas(4).values())
        # the rows' recipes do change their numbers (so the comparison above can fail), and only theirs
        assert _close(got.logprobs[i], plain.logprobs[i]) != merges, i


def test_rows_at_alpha_zero_and_none_are_the_base_alone_bit_for_bit(models):
    base, ft = models
    plain = lmn.score(base, None, CONTEXTS[:4], CONTINUATIONS[:4], None, batch_size=4)
    zero = lmn.Recipe(op="slerp", layers={1: 0.0, 2: 0.0})
    rows = [zero, lmn.Recipe(op="slerp", layers={1: 0.9}), None, zero]
    got = lmn.score(base, ft, CONTEXTS[:4], CONTINUATIONS[:4], rows, batch_size=4)
    for i in (0, 2, 3):
        assert got.logprobs[i] == plain.logprobs[i]
    assert not _close(got.logprobs[1], plain.logprobs[1])
    none = lmn.score(base, ft, CONTEXTS[:2], CONTINUATIONS[:2], [None, zero])  # no row merges
    assert none.logprobs == plain.logprobs[:2]


def test_one_recipe_for_every_row_gives_the_single_recipe_numbers(models):
    base, ft = models
    recipe = lmn.Recipe(op="slerp", layers={1: 0.3, 2: 0.6})
    single = lmn.score(base, ft, CONTEXTS, CONTINUATIONS, recipe, batch_size=3)
    rows = lmn.score(base, ft, CONTEXTS, CONTINUATIONS, [recipe] * len(CONTEXTS), batch_size=3)
    for a, b in zip(rows.logprobs, single.logprobs, strict=True):
        assert _close(a, b)


def test_regmean_rows_take_their_own_lambda(models):
    base, ft = models
    _, ft2 = pair("qwen2", n_layers=4, seed=1)
    recipes = [
        lmn.Recipe.model_validate({"op": "regmean", "layers": [2], "lambda": 0.25}),
        lmn.Recipe.model_validate({"op": "regmean", "layers": [1], "lambda": 1.0}),
        None,
    ]
    got = lmn.score(base, [ft, ft2], CONTEXTS[:3], CONTINUATIONS[:3], recipes)
    for i, r in enumerate(recipes):
        one = lmn.score(base, [ft, ft2], [CONTEXTS[i]], [CONTINUATIONS[i]], r)
        assert _close(got.logprobs[i], one.logprobs[0]), i


def test_row_recipes_that_cannot_share_a_pass_are_refused_naming_recipe(models):
    base, ft = models
    slerp = lmn.Recipe(op="slerp", layers={1: 0.5})
    ctx, cont = CONTEXTS[:2], CONTINUATIONS[:2]
    with pytest.raises(LatentMergeError, match=r"recipe is a list of 3 recipes for 2 rows"):
        lmn.score(base, ft, ctx, cont, [slerp] * 3)
    steer = lmn.Recipe(op="delta", layers={1: 1.0}, deltas="d.safetensors")
    with pytest.raises(LatentMergeError, match=r"recipe\[1\] has op 'delta'"):
        lmn.score(base, ft, ctx, cont, [slerp, steer])
    with pytest.raises(LatentMergeError, match=r"recipe\[0\] has type Ensemble"):
        lmn.score(base, ft, ctx, cont, [lmn.Ensemble(b=0.5), slerp])
    named = [slerp.model_copy(update={"sources": [s]}) for s in ("ft-a", "ft-b")]
    with pytest.raises(LatentMergeError, match=r"recipe rows name different sources"):
        lmn.score(base, ft, ctx, cont, named)
    with pytest.raises(LatentMergeError, match=r"recipe=\[\] is empty"):
        lmn.score(base, ft, ctx, cont, [])
    with pytest.raises(LatentMergeError, match=r"recipe merges with op 'slerp'.*sources=None"):
        lmn.score(base, None, ctx, cont, [slerp, None])


def test_a_systems_per_request_logprobs_come_from_one_score_call_with_a_recipe_per_row(monkeypatch):
    """`LoadedSystem.complete(..., recipes=..., logprobs=k)`: every row's logprobs equal its own recipe's
    `lmn.score` of the tokens it generated, and all rows are scored in one call."""
    system = load_system(
        Path(__file__).resolve().parents[1] / "examples" / "systems" / "toy-latent-slerp.yaml"
    )
    calls = []

    def recorded(*args, **kwargs):
        calls.append(args)
        return lmn.score(*args, **kwargs)

    monkeypatch.setattr(logprobs, "score", recorded)
    prompts = ["Compute 76+34.", "The list: a, b, c,", "Q: 2+2?"]
    recipes = [lmn.Recipe(op="slerp", layers={3: 0.0}), None, lmn.Recipe(op="lerp", layers={3: 0.9})]
    out = system.complete(prompts, recipes=recipes, logprobs=2, max_new_tokens=6)
    assert len(calls) == 1
    base, sources, contexts, news, rows = calls[0]
    assert rows == [recipes[0], system.config.recipe, recipes[2]]
    for i, recipe in enumerate(rows):
        one = lmn.score(base, sources, [contexts[i]], [news[i]], recipe, top=2)
        got = [t.logprob for t in out[i].logprobs]
        assert max(abs(a - b) for a, b in zip(got, one.logprobs[0], strict=True)) < 1e-4, i
        assert [[alt for alt, _ in t.top] for t in out[i].logprobs] == [
            [system.tokenizer.decode([tok]) for tok, _ in alts] for alts in one.top[0]
        ]
