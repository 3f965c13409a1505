"""`lmn.score`: teacher-forced continuation log-probabilities, merged where generation would have merged.

The reference is written here with plain forward(-pre)-hooks (tests/reference.py's ops and hooks): one
unpadded row at a time, the source's states from its own full forward over the same tokens, the base
mixed at the documented positions (positions "last": the context's last token and every continuation
token; "all": every token; explicit indices: those context positions only). float64 tiny models.
"""

import pytest
import torch
from reference import block, hidden_states, ref_op
from reference_generate import ensemble_generate, lockstep_generate
from tiny import pair

import latent_merge_nnsight as lmn
from latent_merge_nnsight.ensemble import Ensemble
from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.models import hf_module

CONTEXTS = ["the cat", "a", "hello there, how", "xy", "merge me"]
CONTINUATIONS = [" sat down", "bc", " are you", "z", " now!"]


@pytest.fixture(scope="module")
def models():
    base, ft = pair("qwen2", n_layers=4, seed=0)
    _, ft2 = pair("qwen2", n_layers=4, seed=1)
    return base, ft, ft2


def rows(tok):
    ctx = [tok(c)["input_ids"] for c in CONTEXTS]
    cont = [tok(c, add_special_tokens=False)["input_ids"] for c in CONTINUATIONS]
    return ctx, cont


def chosen_positions(n_ctx: int, n_cont: int, positions) -> list[int]:
    if positions == "last":
        return list(range(n_ctx - 1, n_ctx + n_cont))
    if positions == "all":
        return list(range(n_ctx + n_cont))
    return sorted({p % n_ctx for p in positions})


def reference_logprobs(
    hf_base, hf_sources, ctx, cont, merges, op, site, positions, params, chosen=None
) -> list[float]:
    """One row: hooks mix each merged layer at the chosen positions (`positions` as a recipe's, or
    `chosen`: indices over context and continuation); log-softmax of the predicting logits."""
    ids = torch.tensor([ctx + cont])
    mask = torch.ones_like(ids)
    states = {layer: [hidden_states(s, ids, mask, layer, site) for s in hf_sources] for layer in merges}
    if chosen is None:
        chosen = chosen_positions(len(ctx), len(cont), positions)
    handles = []
    for layer, a in merges.items():

        def mix(h, layer=layer, a=a):
            h = h.clone()
            for t in chosen:
                h[0, t] = ref_op(op, h[0, t], [s[0, t] for s in states[layer]], a, **params)
            return h

        b = block(hf_base, layer)
        if site == "pre":
            handles.append(b.register_forward_pre_hook(lambda m, args, mix=mix: (mix(args[0]), *args[1:])))
        else:
            handles.append(
                b.register_forward_hook(
                    lambda m, args, out, mix=mix: (
                        (mix(out[0]), *out[1:]) if isinstance(out, tuple) else mix(out)
                    )
                )
            )
    try:
        with torch.no_grad():
            logits = hf_base(input_ids=ids).logits[0]
    finally:
        for h in handles:
            h.remove()
    logp = torch.log_softmax(logits[len(ctx) - 1 : -1], dim=-1)
    return logp.gather(-1, torch.tensor(cont)[:, None]).squeeze(-1).tolist()


CASES = {
    "slerp-pre-last": (dict(op="slerp", layers={2: 0.6}), dict(op="slerp", merges={2: 0.6}), 1),
    "slerp-pre-all": (
        dict(op="slerp", layers={1: 0.4}, positions="all"),
        dict(op="slerp", merges={1: 0.4}, positions="all"),
        1,
    ),
    "lerp-post-last": (
        dict(op="lerp", layers={2: 0.8}, site="post"),
        dict(op="lerp", merges={2: 0.8}, site="post"),
        1,
    ),
    "lerp-post-all-two-layers": (
        dict(op="lerp", layers={0: 0.3, 2: 0.7}, site="post", positions="all"),
        dict(op="lerp", merges={0: 0.3, 2: 0.7}, site="post", positions="all"),
        1,
    ),
    "slerp-context-indices": (
        dict(op="slerp", layers={2: 0.9}, positions=[0, -1]),
        dict(op="slerp", merges={2: 0.9}, positions=[0, -1]),
        1,
    ),
    "regmean-two-sources": (
        {"op": "regmean", "layers": [2], "lambda": 0.25, "weights": [1.0, 3.0]},
        dict(op="regmean", merges={2: None}, params=dict(lam=0.25, weights=[1.0, 3.0])),
        2,
    ),
}


@pytest.mark.parametrize("batch_size", [1, 5])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("case", list(CASES))
def test_score_equals_a_teacher_forced_hook_reference(models, case, padding_side, batch_size):
    recipe_kw, ref_kw, n_sources = CASES[case]
    base, ft, ft2 = models
    sources = [ft, ft2][:n_sources]
    ctx, cont = rows(base.tokenizer)
    got = lmn.score(
        base,
        sources if n_sources > 1 else ft,
        ctx,
        cont,
        lmn.Recipe(**recipe_kw),
        batch_size=batch_size,
        padding_side=padding_side,
    )
    ref = dict(site="pre", positions="last", params={}) | ref_kw
    for i, (c, n) in enumerate(zip(ctx, cont, strict=True)):
        want = reference_logprobs(
            hf_module(base), [hf_module(s) for s in sources], c, n, ref["merges"], ref["op"], ref["site"],
            ref["positions"], ref["params"],
        )  # fmt: skip
        assert got.tokens[i] == n
        assert got.logprobs[i] == pytest.approx(want, abs=1e-10), i
    plain = lmn.score(base, None, ctx, cont, None)  # the merge changes the numbers (the test can fail)
    assert (
        max(
            abs(a - b)
            for x, y in zip(plain.logprobs, got.logprobs, strict=True)
            for a, b in zip(x, y, strict=True)
        )
        > 1e-4
    )


def test_strings_are_tokenized_as_the_ids_and_the_base_alone_is_its_plain_forward(models):
    base = models[0]
    ctx, cont = rows(base.tokenizer)
    by_text = lmn.score(base, None, CONTEXTS, CONTINUATIONS, None)
    by_ids = lmn.score(base, None, ctx, cont, None, batch_size=2, padding_side="left")
    for i, (c, n) in enumerate(zip(ctx, cont, strict=True)):
        want = reference_logprobs(hf_module(base), [], c, n, {}, "lerp", "pre", "last", {})
        assert by_text.logprobs[i] == pytest.approx(want, abs=1e-10)
        assert by_ids.logprobs[i] == pytest.approx(want, abs=1e-10)
        assert by_text.totals[i] == pytest.approx(sum(want), abs=1e-9)


def test_ensemble_scores_with_each_steps_weight(models):
    base, ft, _ = models
    ctx, cont = rows(base.tokenizer)
    weights = [0.2, 0.5, 0.9]
    got = lmn.score(base, ft, ctx, cont, Ensemble(b=weights), batch_size=3)
    for i, (c, n) in enumerate(zip(ctx, cont, strict=True)):
        ids = torch.tensor([c + n])
        with torch.no_grad():
            lb, ls = (hf_module(m)(input_ids=ids).logits[0, len(c) - 1 : -1].float() for m in (base, ft))
        want = []
        for k, token in enumerate(n):
            w = weights[min(k, len(weights) - 1)]
            want.append(float(torch.log_softmax((1 - w) * lb[k] + w * ls[k], dim=-1)[token]))
        assert got.logprobs[i] == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize(
    "recipe_kw, ref_kw, n_sources",
    [
        CASES["slerp-pre-last"],
        CASES["lerp-post-all-two-layers"],
        CASES["slerp-context-indices"],
        CASES["regmean-two-sources"],
    ],
    ids=["slerp-last", "lerp-post-all", "indices", "regmean"],
)
def test_a_greedy_generation_scores_as_its_own_logprobs_and_is_greedy_everywhere(
    models, recipe_kw, ref_kw, n_sources
):
    base, ft, ft2 = models
    sources = [ft, ft2][:n_sources]
    src_arg = sources if n_sources > 1 else ft
    recipe = lmn.Recipe(**recipe_kw)
    out = lmn.generate(base, src_arg, CONTEXTS, recipe, max_new_tokens=6, chat=False, ignore_eos=True)
    ctx = [base.tokenizer(c)["input_ids"] for c in CONTEXTS]
    got = lmn.score(base, src_arg, ctx, out.tokens, recipe, batch_size=5)
    assert got.all_greedy == [True] * len(CONTEXTS)
    params = ref_kw.get("params", {})
    for i, c in enumerate(ctx):
        seen: list[float] = []

        def choose(step, logits, seen=seen):
            token = int(logits.argmax())
            seen.append(float(torch.log_softmax(logits.double(), dim=-1)[token]))
            return token

        tokens = lockstep_generate(
            hf_module(base), [hf_module(s) for s in sources], c, ref_kw["merges"], ref_kw["op"],
            max_new_tokens=6, site=ref_kw.get("site", "pre"), positions=ref_kw.get("positions", "last"),
            choose=choose, **params,
        )  # fmt: skip
        assert tokens == out.tokens[i]
        assert got.logprobs[i] == pytest.approx(seen, abs=1e-6)
        assert got.totals[i] == pytest.approx(sum(seen), abs=1e-6)


def test_ensemble_generation_scores_as_generated(models):
    base, ft, _ = models
    ctx = [base.tokenizer(c)["input_ids"] for c in CONTEXTS]
    out = lmn.generate(
        base, ft, CONTEXTS, Ensemble(b=[0.3, 0.8]), max_new_tokens=5, chat=False, ignore_eos=True
    )
    for i, c in enumerate(ctx):
        assert out.tokens[i] == ensemble_generate(
            hf_module(base), hf_module(ft), c, [0.3, 0.8], max_new_tokens=5
        )
    got = lmn.score(base, ft, ctx, out.tokens, Ensemble(b=[0.3, 0.8]))
    assert got.all_greedy == [True] * len(ctx)


def test_top_alternatives_are_the_most_likely_tokens(models):
    base, ft, _ = models
    got = lmn.score(base, ft, CONTEXTS[:2], CONTINUATIONS[:2], lmn.Recipe(op="lerp", layers={1: 0.5}), top=3)
    for row_lp, row_top, row_greedy in zip(got.logprobs, got.top, got.greedy, strict=True):
        for lp, alts, greedy in zip(row_lp, row_top, row_greedy, strict=True):
            assert len(alts) == 3 and alts[0][1] >= alts[1][1] >= alts[2][1]
            assert (lp == pytest.approx(alts[0][1], abs=1e-12)) == greedy or lp < alts[0][1]


def test_a_loaded_system_scores_as_the_call_with_its_models(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(
        "name: t\nkind: latent\nbase: toy-base\nsources: [toy-reasoner]\n"
        "recipe: {op: slerp, layers: {2: 0.5}}\ndtype: float32\n"
    )
    from latent_merge_nnsight.systems import load_system

    system = load_system(spec)
    got = system.score(["Q: 2+2?"], [" A: 4"])
    direct = lmn.score(system.base, system.sources[0], ["Q: 2+2?"], [" A: 4"], system.config.recipe)
    assert got.logprobs == direct.logprobs
    assert lmn.score(system, None, ["Q: 2+2?"], [" A: 4"]).logprobs == direct.logprobs


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(contexts=["a"], continuations=["b", "c"]), "contexts has 1 rows and continuations 2"),
        (dict(contexts=[[]], continuations=["b"]), r"contexts\[0\] is empty"),
        (dict(contexts=["a"], continuations=[[]]), r"continuations\[0\] is empty"),
        (dict(contexts=["a"], continuations=[[999]]), "vocab_size"),
        (dict(contexts=["a"], continuations=["b"], batch_size=0), "batch_size=0"),
        (dict(contexts=["a"], continuations=["b"], padding_side="up"), "padding_side"),
        (dict(contexts="a", continuations=["b"]), "contexts has type str"),
    ],
)
def test_bad_input_is_named_before_any_forward(models, kwargs, match):
    base, ft, _ = models
    with pytest.raises(LatentMergeError, match=match):
        lmn.score(base, ft, recipe=lmn.Recipe(op="lerp", layers={1: 0.5}), **kwargs)
