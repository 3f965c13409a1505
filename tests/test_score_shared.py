"""`lmn.score` on rows that share a context (multiple choice): each context runs once per batch and its
continuations go on from its caches, with the numbers of the plain-hook reference of tests/test_score.py
(one unpadded row at a time, float64), merged and unmerged, positions "last", "all" and indices, left and
right padding, sliding-window attention; `merge_from` moves where the merge starts; `next_logprobs` is
the distribution of the token after the row."""

import pytest
from test_score import reference_logprobs
from tiny import pair

import latent_merge_nnsight as lmn
from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.models import hf_module

QUESTIONS = ["the cat", "hello there, how", "q"]
CHOICES = [[" sat", " sat down", "!", " ran off now"], [" are you", " is it"], ["r", " s t u", "v"]]


@pytest.fixture(scope="module")
def models():
    base, ft = pair("qwen2", n_layers=4, seed=0)
    return base, ft


def mc_rows(tok, questions=QUESTIONS, choices=CHOICES):
    """Rows as lm-eval's multiple choice makes them: each question's context once per choice."""
    ctx, cont = [], []
    for q, options in zip(questions, choices, strict=True):
        for c in options:
            ctx.append(tok(q)["input_ids"])
            cont.append(tok(c, add_special_tokens=False)["input_ids"])
    return ctx, cont


CASES = {
    "base": (None, {}, "last"),
    "slerp-last": (dict(op="slerp", layers={2: 0.6}), {2: 0.6}, "last"),
    "lerp-all": (dict(op="lerp", layers={1: 0.4, 3: 0.7}, positions="all"), {1: 0.4, 3: 0.7}, "all"),
    "slerp-indices": (dict(op="slerp", layers={2: 0.9}, positions=[0, -1]), {2: 0.9}, [0, -1]),
}


def _reference(base, ft, recipe_kw, merges, positions, c, n):
    op = "lerp" if recipe_kw is None else recipe_kw["op"]
    return reference_logprobs(hf_module(base), [hf_module(ft)], c, n, merges, op, "pre", positions, {})


@pytest.mark.parametrize("batch_size", [1, 3, 16])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("case", list(CASES))
def test_shared_contexts_score_as_the_reference(models, case, padding_side, batch_size):
    recipe_kw, merges, positions = CASES[case]
    base, ft = models
    ctx, cont = mc_rows(base.tokenizer)
    recipe = None if recipe_kw is None else lmn.Recipe(**recipe_kw)
    got = lmn.score(
        base, ft if recipe else None, ctx, cont, recipe, batch_size=batch_size, padding_side=padding_side
    )
    for i, (c, n) in enumerate(zip(ctx, cont, strict=True)):
        assert got.tokens[i] == n
        assert got.logprobs[i] == pytest.approx(
            _reference(base, ft, recipe_kw, merges, positions, c, n), abs=1e-10
        )


def test_each_context_runs_once_and_its_continuations_go_on_from_it(models):
    base, ft = models
    ctx, cont = mc_rows(base.tokenizer)
    seen: list[tuple[int, int]] = []
    embed = hf_module(base).model.embed_tokens
    handle = embed.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    try:
        lmn.score(base, ft, ctx, cont, lmn.Recipe(op="slerp", layers={2: 0.6}), batch_size=16)
    finally:
        handle.remove()
    width = max(len(c) for c in ctx)
    fed = max(len(n) for n in cont) - 1  # the last continuation token predicts nothing asked for
    assert seen == [(len(QUESTIONS), width), (len(ctx), fed)]


def test_sliding_window_rows_share_their_context_as_the_reference(models):
    base, ft = pair("mistral", n_layers=3, seed=2, window=3)
    ctx, cont = mc_rows(base.tokenizer)
    recipe = lmn.Recipe(op="lerp", layers={1: 0.7})
    for side in ("left", "right"):
        got = lmn.score(base, ft, ctx, cont, recipe, batch_size=16, padding_side=side)
        for i, (c, n) in enumerate(zip(ctx, cont, strict=True)):
            want = reference_logprobs(
                hf_module(base), [hf_module(ft)], c, n, {1: 0.7}, "lerp", "pre", "last", {}
            )
            assert got.logprobs[i] == pytest.approx(want, abs=1e-10), (side, i)


@pytest.mark.parametrize("positions", ["last", "all", [0]])
def test_merge_from_merges_every_position_from_it(models, positions):
    base, ft = models
    ctx, cont = mc_rows(base.tokenizer)
    merges = {1: 0.5, 2: 0.8}
    recipe = lmn.Recipe(op="slerp", layers=merges, positions=positions)
    starts = [0] + [
        len(c) - (i % 3) for i, c in enumerate(ctx[1:], 1)
    ]  # from the start, in and after contexts
    starts[-1] = None  # the recipe's own positions
    got = lmn.score(base, ft, ctx, cont, recipe, merge_from=starts, batch_size=4, padding_side="left")
    for i, (c, n) in enumerate(zip(ctx, cont, strict=True)):
        chosen = None if starts[i] is None else list(range(starts[i], len(c) + len(n)))
        want = reference_logprobs(
            hf_module(base), [hf_module(ft)], c, n, merges, "slerp", "pre", positions, {}, chosen=chosen
        )
        assert got.logprobs[i] == pytest.approx(want, abs=1e-10), i


def test_next_logprobs_is_the_distribution_of_the_token_after_the_row(models):
    base, ft = models
    ctx, cont = mc_rows(base.tokenizer)
    recipe = lmn.Recipe(op="lerp", layers={2: 0.6})
    got = lmn.score(base, ft, ctx, cont, recipe, next_logprobs=True, batch_size=5)
    assert len(got.next) == len(ctx) and got.next[0].shape == (hf_module(base).config.vocab_size,)
    for t in (5, 17):
        longer = lmn.score(base, ft, ctx, [n + [t] for n in cont], recipe)
        for i in range(len(ctx)):
            assert float(got.next[i][t]) == pytest.approx(longer.logprobs[i][-1], abs=1e-10)
            assert got.logprobs[i] == pytest.approx(longer.logprobs[i][:-1], abs=1e-10)
    # no continuation at all: the distribution after the context
    alone = lmn.score(base, ft, ctx[:1], [[]], recipe, next_logprobs=True)
    assert alone.logprobs == [[]]
    first = lmn.score(base, ft, ctx[:1], [[7]], recipe)
    assert float(alone.next[0][7]) == pytest.approx(first.logprobs[0][0], abs=1e-10)


@pytest.mark.parametrize(
    "merge_from, match",
    [
        (3, "merge_from has type int"),
        ([0], "merge_from has 1 entries for 2 rows"),
        ([0, 99], r"merge_from\[1\]=99; expected None or a token index"),
        ([0, -1], r"merge_from\[1\]=-1"),
    ],
)
def test_bad_merge_from_is_named(models, merge_from, match):
    base, ft = models
    with pytest.raises(LatentMergeError, match=match):
        lmn.score(
            base, ft, ["a b", "c"], ["d", "e"], lmn.Recipe(op="lerp", layers={1: 0.5}), merge_from=merge_from
        )


def test_bad_engine_and_next_logprobs_on_vllm_are_named(models):
    base, ft = models
    recipe = lmn.Recipe(op="lerp", layers={1: 0.5})
    with pytest.raises(LatentMergeError, match="engine='gpu'; expected one of fast, vllm"):
        lmn.score(base, ft, ["a"], ["b"], recipe, engine="gpu")
    with pytest.raises(LatentMergeError, match="next_logprobs=True runs on engine='fast'"):
        lmn.score(base, ft, ["a"], ["b"], recipe, engine="vllm", next_logprobs=True)
