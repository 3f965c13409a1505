"""`lmn.pair`: the traceable lockstep form, with the user's own interventions in the same trace."""

import functools

import pytest
import torch
from reference import block, hidden_states, ref_slerp
from tiny import generate_raw as generate
from tiny import pair as tiny_pair

import latent_merge_nnsight as lmn
from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.lockstep import pair
from latent_merge_nnsight.models import hf_module

PROMPTS = ["hello there", "hi", "what is up with you"]
N_NEW = 5

# an open `tracer.iter[:]` loop ends with nnsight's "was never reached" warning by design
pytestmark = pytest.mark.filterwarnings("ignore:.*was never reached")


@pytest.fixture(scope="module")
def models():
    base, ft = tiny_pair("qwen2", n_layers=4, seed=0)
    _, ft2 = tiny_pair("qwen2", n_layers=4, seed=1)
    return base, ft, ft2


def merged_layer3_last_token(base, ft, text: str) -> torch.Tensor:
    """Independent: the base's layer-3 output at the last prompt token, with the FT's layer-2 input slerped
    into the base's at that token by a plain forward-pre-hook (no padding, no nnsight)."""
    ids = torch.tensor([base.tokenizer(text)["input_ids"]])
    mask = torch.ones_like(ids)
    src = hidden_states(hf_module(ft), ids, mask, 2)[0, -1]
    got = {}

    def mix(m, args):
        h = args[0].clone()
        h[0, -1] = ref_slerp(h[0, -1], src, 0.5)
        return (h, *args[1:])

    def grab(m, args, out):
        got["h"] = out[0, -1].clone()

    hb = hf_module(base)
    handles = [block(hb, 2).register_forward_pre_hook(mix), block(hb, 3).register_forward_hook(grab)]
    try:
        with torch.no_grad():
            hb(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return got["h"]


def test_user_save_inside_the_pair_trace_works_alongside_the_merge(models):
    base, ft, _ = models
    p = pair(base, ft)
    with p.generate(PROMPTS, chat=False, max_new_tokens=N_NEW, ignore_eos=True) as tracer:
        states = list().save()
        for _step in tracer.iter[:]:
            lmn.merge_into(layer=2, source=p.ft, op="slerp", alpha=0.5)
            states.append(base.model.layers[3].output[:, -1].clone())
    engine = generate(
        base,
        ft,
        PROMPTS,
        lmn.Recipe(op="slerp", layers={2: 0.5}),
        max_new_tokens=N_NEW,
        ignore_eos=True,
        engine="fast",
    )
    assert tracer.generation.tokens == engine.tokens
    assert len(states) == N_NEW  # one forward per new token
    for row, text in enumerate(PROMPTS):
        assert torch.allclose(states[0][row], merged_layer3_last_token(base, ft, text), atol=1e-10)
    assert p.ft.cache is None  # the live source let go of its cache after the trace


def test_pair_sources_feed_a_multi_source_op(models):
    base, ft, ft2 = models
    p = pair(base, [ft, ft2])
    with p.generate(PROMPTS, chat=False, max_new_tokens=N_NEW) as tracer:
        for _step in tracer.iter[:]:
            lmn.merge_into(layer=1, source=p.sources, op="regmean", alpha=0.6, weights=[2.0, 1.0])
    recipe = lmn.Recipe(op="regmean", layers={1: 0.6}, weights=[2.0, 1.0])
    assert tracer.generation.tokens == generate(base, [ft, ft2], PROMPTS, recipe, max_new_tokens=N_NEW).tokens


def test_pair_sampling_uses_the_same_sampler_as_the_engines(models):
    base, ft, _ = models
    p = pair(base, ft)
    kw = dict(max_new_tokens=N_NEW, do_sample=True, temperature=1.3, seed=7, ignore_eos=True)
    with p.generate(PROMPTS, chat=False, **kw) as tracer:
        for _step in tracer.iter[:]:
            lmn.merge_into(layer=2, source=p.ft, op="lerp", alpha=0.4)
    engine = generate(base, ft, PROMPTS, lmn.Recipe(op="lerp", layers={2: 0.4}), engine="fast", **kw)
    assert tracer.generation.tokens == engine.tokens


def test_live_source_outside_a_trace_is_an_error(models):
    base, ft, _ = models
    with pytest.raises(LatentMergeError, match="only inside a trace"):
        pair(base, ft).ft.resid(2, "pre")


def test_asking_deeper_after_the_prompt_step_needs_up_to_layer(models):
    base, ft, _ = models
    p = pair(base, ft)
    with pytest.raises(LatentMergeError, match="up_to_layer=2"):
        with p.generate(PROMPTS, chat=False, max_new_tokens=3, ignore_eos=True) as tracer:
            for step in tracer.iter[:]:
                lmn.merge_into(layer=1 if step == 0 else 2, source=p.ft, op="lerp", alpha=0.5)
    p = pair(base, ft, up_to_layer=2)
    with p.generate(PROMPTS, chat=False, max_new_tokens=3, ignore_eos=True) as tracer:
        for step in tracer.iter[:]:
            lmn.merge_into(layer=1 if step == 0 else 2, source=p.ft, op="lerp", alpha=0.5)
    assert [len(t) for t in tracer.generation.tokens] == [3, 3, 3]


def test_pair_checks_its_models(models):
    base, ft, _ = models
    wide, _ = tiny_pair("qwen2", n_layers=4, hidden=48, seed=3)
    with pytest.raises(LatentMergeError, match="hidden_size"):
        pair(base, wide)
    with pytest.raises(LatentMergeError, match="nnsight model"):
        pair(hf_module(base), ft)
    with pytest.raises(LatentMergeError, match="max_new_tokens"):
        pair(base, ft).generate(PROMPTS, chat=False, max_new_tokens=0)


# ----------------------------------------------------------------------------------------------------
# the sources' decode step as one fixed-shape step (what a CUDA graph captures), checked on CPU

FIXED_CASES = {
    "slerp-two-layers": (lambda ft, ft2: ft, lmn.Recipe(op="slerp", layers={1: 0.3, 3: 0.7})),
    "lerp-site-post": (lambda ft, ft2: ft, lmn.Recipe(op="lerp", layers={2: 0.8}, site="post")),
    "slerp-positions-all": (lambda ft, ft2: ft, lmn.Recipe(op="slerp", layers={1: 0.5}, positions="all")),
    "regmean-two-sources": (lambda ft, ft2: [ft, ft2], lmn.Recipe(op="regmean", layers={2: 0.6})),
    "ensemble": (lambda ft, ft2: ft, lmn.Ensemble(b=0.6)),
}


def _fixed_live_sources(monkeypatch) -> list[int]:
    """Make run_nnsight's live sources take the fixed-shape step on CPU; returns a replay counter."""
    import functools
    import importlib

    from latent_merge_nnsight.generation.graphs import EagerStep

    pair_module = importlib.import_module("latent_merge_nnsight.generation.nnsight")
    fixed = functools.partial(pair_module.LiveSource, static_step=True)
    monkeypatch.setattr(pair_module, "LiveSource", fixed)
    replays = [0]
    original = EagerStep.replay

    def counting(self):
        replays[0] += 1
        return original(self)

    monkeypatch.setattr(EagerStep, "replay", counting)
    return replays


@pytest.mark.parametrize("case", list(FIXED_CASES))
def test_fixed_shape_source_step_gives_the_tokens_of_the_eager_source(models, monkeypatch, case):
    base, ft, ft2 = models
    make_sources, recipe = FIXED_CASES[case]
    sources = make_sources(ft, ft2)
    kw = dict(max_new_tokens=N_NEW, ignore_eos=True)
    eager = generate(base, sources, PROMPTS, recipe, engine="nnsight", **kw)
    fast = generate(base, sources, PROMPTS, recipe, engine="fast", **kw)  # checked against the hook loop
    replays = _fixed_live_sources(monkeypatch)
    fixed = generate(base, sources, PROMPTS, recipe, engine="nnsight", **kw)
    n_sources = len(sources) if isinstance(sources, list) else 1
    assert replays[0] == n_sources * (N_NEW - 1)  # every decode step of every source, none eager
    assert fixed.tokens == eager.tokens == fast.tokens
    assert fixed.info["cuda_graphs"] is False  # a CPU run: fixed-shape, not captured


def test_fixed_shape_source_states_saved_each_step_are_copies(models, monkeypatch):
    """The fixed step's outputs are buffers it overwrites next step; what a user saves must not change."""
    base, ft, _ = models

    def run(static: bool) -> list[torch.Tensor]:
        # with up_to_layer every step runs 3 blocks, and each step may ask for another layer
        p = pair(base, ft, up_to_layer=2)
        for s in p.sources:
            s.static = static
        with p.generate(PROMPTS, chat=False, max_new_tokens=N_NEW, ignore_eos=True) as tracer:
            states = list().save()
            for step in tracer.iter[:]:
                layer = 1 + step % 2
                states.append(p.ft.resid(layer, "pre")[:, -1])
                lmn.merge_into(layer=layer, source=p.ft, op="lerp", alpha=0.5)
        return list(states)

    eager, fixed = run(False), run(True)
    assert len(fixed) == N_NEW
    for a, b in zip(eager, fixed, strict=True):  # float64: equal up to the summation order over slots
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
    assert (fixed[1] - fixed[2]).abs().max() > 1e-3  # distinct steps kept distinct values


def test_fixed_shape_source_step_survives_a_cache_that_grows(models, monkeypatch):
    """A source cache sized too small grows mid-generation (new buffers): the fixed step is rebuilt."""
    import importlib

    pair_module = importlib.import_module("latent_merge_nnsight.generation.nnsight")
    base, ft, _ = models
    recipe = lmn.Recipe(op="slerp", layers={2: 0.5})
    kw = dict(max_new_tokens=N_NEW, ignore_eos=True, engine="nnsight")
    eager = generate(base, ft, PROMPTS, recipe, **kw)

    class Cramped(pair_module.LiveSource):
        budget = property(lambda self: 1, lambda self, value: None)  # room for one new token only

    monkeypatch.setattr(pair_module, "LiveSource", functools.partial(Cramped, static_step=True))
    grown = generate(base, ft, PROMPTS, recipe, **kw)
    assert grown.tokens == eager.tokens
