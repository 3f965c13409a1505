"""Per-row recipes (`recipe=[r0, r1, ...]`, one per prompt): one pass gives each row the tokens of a call
with that row's recipe alone, on both engines, for rows differing in op, layers, alphas, site and
positions; the reference is the same batch run once per distinct recipe (so sampling noise, keyed by
row, is the same)."""

import functools
import importlib

import pytest
import torch
from tiny import generate_raw as generate
from tiny import pair

import latent_merge_nnsight as lmn
from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.generation.fast import PairedEngine
from latent_merge_nnsight.plan import rows_plan

PROMPTS = ["hello there", "hi", "what is up with you", "abc", "a much longer prompt here", "zq"]
N_NEW = 6

RECIPES = [
    lmn.Recipe(op="slerp", layers={1: 0.3, 2: 0.6}),
    lmn.Recipe(op="lerp", layers={2: 0.8}),
    None,  # the base alone
    lmn.Recipe(op="slerp", layers={0: 0.5}, site="post"),
    lmn.Recipe(op="lerp", layers={1: 0.4}, positions="all"),
    lmn.Recipe(op="slerp", layers={1: 0.0, 3: 0.7}),
]


@pytest.fixture(scope="module")
def models():
    return pair("qwen2", n_layers=4, seed=0)


STEER = [
    lmn.Recipe(op="delta", layers={1: 0.5, 2: 1.5}),
    lmn.Recipe(op="delta", layers={2: -1.0}),
    None,  # the base alone
    lmn.Recipe(op="delta", layers={0: 2.0}, positions="last"),
    lmn.Recipe(op="delta", layers=[2, 3], alpha=0.8),
    lmn.Recipe(op="delta", layers={1: 0.0, 3: 0.7}),
]


@pytest.fixture(scope="module")
def deltas(models):
    base, ft = models
    return lmn.compute_deltas(base, ft, PROMPTS, layers=[0, 1, 2, 3])


def _static_fast(monkeypatch):
    module = importlib.import_module("latent_merge_nnsight.generation.fast")
    monkeypatch.setattr(module, "PairedEngine", functools.partial(PairedEngine, static_step=True))


def _separately(base, ft, prompts, recipes, **kw):
    """Row i of a call with recipes[i] for every row (the same batch: same padding, same noise)."""
    by_recipe = {}
    for r in recipes:
        key = None if r is None else r.to_json()
        if key not in by_recipe:
            by_recipe[key] = generate(base, ft, prompts, r, **kw)
    outs = [by_recipe[None if r is None else r.to_json()] for r in recipes]
    return [out.tokens[i] for i, out in enumerate(outs)], [out.texts[i] for i, out in enumerate(outs)]


@pytest.mark.parametrize("kind", ["live", "delta"])
@pytest.mark.parametrize("engine", ["fast", "fast-static", "nnsight"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_row_recipes_equal_separate_calls_token_for_token(
    models, engine, padding_side, kind, request, monkeypatch
):
    """Live-source rows (on the source model) and steering rows (`STEER`, on one `Deltas`) alike."""
    base, ft = models
    sources, recipes = (ft, RECIPES) if kind == "live" else (request.getfixturevalue("deltas"), STEER)
    kw = dict(max_new_tokens=N_NEW, ignore_eos=True, padding_side=padding_side)
    expected, _ = _separately(base, sources, PROMPTS, recipes, **kw)
    assert len({tuple(t) for t in expected}) > 3  # the rows' recipes do change their tokens
    if engine == "fast-static":
        _static_fast(monkeypatch)
    out = generate(base, sources, PROMPTS, recipes, engine=engine.split("-")[0], **kw)
    assert out.tokens == expected
    assert out.recipe == recipes


def test_rows_finishing_at_different_steps_keep_their_own_recipes(models, monkeypatch):
    """Finished rows leave the fast engine's batch (their per-row alphas with them)."""
    base, ft = models
    free = generate(base, ft, PROMPTS, RECIPES, max_new_tokens=8, ignore_eos=True)
    eos = free.tokens[0][1]
    kw = dict(max_new_tokens=8, eos_token_id=eos)
    expected, texts = _separately(base, ft, PROMPTS, RECIPES, **kw)
    assert len({len(t) for t in expected}) > 1  # rows do finish at different steps
    for engine in ("fast", "nnsight"):
        assert generate(base, ft, PROMPTS, RECIPES, engine=engine, **kw).tokens == expected
    _static_fast(monkeypatch)  # compacting rows in place, as under CUDA graphs
    out = generate(base, ft, PROMPTS, RECIPES, engine="fast", **kw)
    assert out.tokens == expected and out.texts == texts


@pytest.mark.parametrize("engine", ["fast", "nnsight"])
def test_sampled_rows_take_the_noise_of_their_row(models, engine):
    base, ft = models
    kw = dict(max_new_tokens=N_NEW, ignore_eos=True, do_sample=True, temperature=1.5, seed=7)
    expected, _ = _separately(base, ft, PROMPTS, RECIPES, **kw)
    assert generate(base, ft, PROMPTS, RECIPES, engine=engine, **kw).tokens == expected


def test_a_row_at_alpha_zero_equals_the_base_alone(models):
    base, ft = models
    kw = dict(max_new_tokens=N_NEW, ignore_eos=True)
    alone = generate(base, None, PROMPTS[:3], None, **kw)
    zero = lmn.Recipe(op="slerp", layers={1: 0.0, 2: 0.0})
    rows = [zero, lmn.Recipe(op="slerp", layers={1: 0.9}), None]
    for engine in ("fast", "nnsight"):
        out = generate(base, ft, PROMPTS[:3], rows, engine=engine, **kw)
        assert out.tokens[0] == alone.tokens[0] and out.tokens[2] == alone.tokens[2]
        assert out.tokens[1] != alone.tokens[1]


def test_a_row_plan_mixes_each_row_by_its_alpha_and_leaves_zero_rows_bitwise():
    """`Plan.apply` on a per-row plan against each row's op called alone."""
    torch.manual_seed(0)
    recipes = [
        lmn.Recipe(op="slerp", layers={1: 0.25}),
        lmn.Recipe(op="lerp", layers={1: 0.5}),
        lmn.Recipe(op="slerp", layers={2: 0.5}),
        lmn.Recipe(op="slerp", layers={1: 0.75}, positions="all"),
    ]
    plan = rows_plan(recipes, n_layers=4)
    hb, hs = torch.randn(4, 3, 8, dtype=torch.float32), torch.randn(4, 3, 8, dtype=torch.float32)
    mask = torch.ones(4, 3, dtype=torch.long)
    out = plan.apply(1, "pre", hb, [hs], plan.select(mask, decoding=False))
    assert torch.equal(out[0, -1], lmn.ops.slerp(hb[0, -1], hs[0, -1], 0.25))
    assert torch.equal(out[1, -1], lmn.ops.lerp(hb[1, -1], hs[1, -1], 0.5))
    assert torch.equal(out[:3, :-1], hb[:3, :-1])  # "last": the prompt's other tokens stay
    assert torch.equal(out[2], hb[2])  # not merged at layer 1: the base bit for bit
    assert torch.equal(out[3], lmn.ops.slerp(hb[3], hs[3], 0.75))


def test_a_kept_engine_takes_new_row_alphas_without_a_new_capture(models, monkeypatch):
    base, ft = models
    graphs = importlib.import_module("latent_merge_nnsight.generation.graphs")
    captures = []
    real = graphs.EagerStep.__init__

    def counted(self, step):
        captures.append(1)
        real(self, step)

    monkeypatch.setattr(graphs.EagerStep, "__init__", counted)
    first = [lmn.Recipe(op="slerp", layers={1: a}) for a in (0.1, 0.5, 0.9)]
    second = [lmn.Recipe(op="slerp", layers={1: a}) for a in (0.7, 0.0, 0.3)]
    kw = dict(max_new_tokens=N_NEW, ignore_eos=True)
    expected = generate(base, ft, PROMPTS[:3], second, **kw)
    _static_fast(monkeypatch)
    one = generate(base, ft, PROMPTS[:3], first, keep_engine=True, **kw)
    n = len(captures)
    assert n >= 1 and not one.info["engine_reused"]
    two = generate(base, ft, PROMPTS[:3], second, keep_engine=True, **kw)
    assert two.info["engine_reused"] and len(captures) == n
    assert two.tokens == expected.tokens
    fewer = generate(base, ft, PROMPTS[:2], second[:2], keep_engine=True, **kw)
    assert fewer.info["engine_reused"] and fewer.tokens == expected.tokens[:2]
    lmn.generation.run.release_engine(base)


def test_row_recipes_that_cannot_share_a_pass_are_refused(models):
    base, ft = models
    kw = dict(max_new_tokens=2)
    slerp = lmn.Recipe(op="slerp", layers={1: 0.5})
    with pytest.raises(LatentMergeError, match=r"recipe is a list of 2 recipes for 3 prompts"):
        generate(base, ft, PROMPTS[:3], [slerp, slerp], **kw)
    steer = lmn.Recipe(op="delta", layers={1: 1.0}, deltas="d.safetensors")
    with pytest.raises(LatentMergeError, match=r"recipe\[1\] has op 'delta'"):
        generate(base, ft, PROMPTS[:2], [slerp, steer], **kw)
    with pytest.raises(LatentMergeError, match=r"recipe\[0\] has type Ensemble"):
        generate(base, ft, PROMPTS[:2], [lmn.Ensemble(b=0.5), slerp], **kw)
    named = [slerp.model_copy(update={"sources": [s]}) for s in ("ft-a", "ft-b")]
    with pytest.raises(LatentMergeError, match=r"recipe rows name different sources"):
        generate(base, ft, PROMPTS[:2], named, **kw)


def test_merge_into_takes_one_alpha_per_row(models):
    """`merge_into(alpha=[...])` in a trace: each row mixed by its own alpha, equal to separate traces."""
    base, ft = models
    prompts = ["hello there", "hi", "what is up"]
    captured = lmn.capture(ft, prompts, layers=[2])
    alphas = [0.2, 0.0, 0.9]

    def logits(alpha):
        with torch.no_grad(), base.trace(prompts):
            lmn.merge_into(layer=2, source=captured, op="slerp", alpha=alpha)
            out = base.lm_head.output.save()
        return out

    together = logits(alphas)
    for row, a in enumerate(alphas):
        assert torch.equal(together[row], logits(a)[row])
    with pytest.raises(LatentMergeError, match=r"alpha has \[2\] per-row values for a batch of 3 rows"):
        logits([0.5, 0.5])
    with pytest.raises(LatentMergeError, match=r"alpha\[1\]=1.5 is outside \[0, 1\]"):
        logits([0.5, 1.5, 0.0])


def test_a_delta_row_at_alpha_zero_equals_the_base_alone(models, deltas):
    base, _ = models
    kw = dict(max_new_tokens=N_NEW, ignore_eos=True)
    alone = generate(base, None, PROMPTS[:3], None, **kw)
    rows = [lmn.Recipe(op="delta", layers={1: 0.0, 2: 0.0}), lmn.Recipe(op="delta", layers={1: 3.0}), None]
    for engine in ("fast", "nnsight"):
        out = generate(base, deltas, PROMPTS[:3], rows, engine=engine, **kw)
        assert out.tokens[0] == alone.tokens[0] and out.tokens[2] == alone.tokens[2]
        assert out.tokens[1] != alone.tokens[1]


def test_a_kept_engine_takes_new_delta_rows_without_a_new_capture(models, deltas, monkeypatch):
    """A kept fast engine refills per-row alphas and the steering vectors in place."""
    base, ft = models
    other = lmn.compute_deltas(base, ft, PROMPTS[3:], layers=[1])
    first = [lmn.Recipe(op="delta", layers={1: a}) for a in (0.5, 1.0, 2.0)]
    second = [lmn.Recipe(op="delta", layers={1: a}) for a in (-1.0, 0.0, 3.0)]
    kw = dict(max_new_tokens=N_NEW, ignore_eos=True)
    expected = generate(base, other, PROMPTS[:3], second, **kw)
    _static_fast(monkeypatch)
    one = generate(base, deltas, PROMPTS[:3], first, keep_engine=True, **kw)
    assert not one.info["engine_reused"]
    two = generate(base, other, PROMPTS[:3], second, keep_engine=True, **kw)
    assert two.info["engine_reused"] and two.tokens == expected.tokens
    lmn.generation.run.release_engine(base)


def test_delta_rows_that_cannot_share_a_pass_are_refused(models, deltas):
    base, ft = models
    kw = dict(max_new_tokens=2)
    slerp = lmn.Recipe(op="slerp", layers={1: 0.5})
    steer = lmn.Recipe(op="delta", layers={1: 1.0})
    with pytest.raises(LatentMergeError, match=r"recipe\[0\] has op 'delta'.*recipe\[1\] has op 'slerp'"):
        generate(base, deltas, PROMPTS[:2], [steer, slerp], **kw)
    files = [steer.model_copy(update={"deltas": f}) for f in ("a.safetensors", "b.safetensors")]
    with pytest.raises(LatentMergeError, match=r"recipe rows name different deltas files"):
        generate(base, None, PROMPTS[:2], files, **kw)
    with pytest.raises(LatentMergeError, match=r"but the recipe merges at site='post'"):
        generate(base, deltas, PROMPTS[:2], [steer, steer.model_copy(update={"site": "post"})], **kw)


def test_per_row_delta_rows_score_as_separate_calls(models, deltas):
    """`lmn.score` takes the same per-row steering plan: each row's logprobs equal its call alone."""
    base, _ = models
    contexts, continuations = PROMPTS[:3], [" a b", " c", " d e f"]
    together = lmn.score(base, deltas, contexts, continuations, STEER[:3])
    base_alone = lmn.score(base, None, contexts, continuations, None)
    for i, r in enumerate(STEER[:3]):
        alone = lmn.score(base, deltas if r is not None else None, contexts, continuations, r)
        assert torch.equal(torch.as_tensor(together.logprobs[i]), torch.as_tensor(alone.logprobs[i]))
    assert not torch.equal(torch.as_tensor(together.logprobs[0]), torch.as_tensor(base_alone.logprobs[0]))
    assert torch.equal(torch.as_tensor(together.logprobs[2]), torch.as_tensor(base_alone.logprobs[2]))
