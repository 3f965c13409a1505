"""`share_prompt_states`: prefills on prompts seen before read back the unmerged blocks, and generate
exactly what a fresh run generates."""

import contextlib

import pytest
import torch
from tiny import generate_raw as generate
from tiny import pair

import latent_merge_nnsight as lmn
from latent_merge_nnsight.ensemble import Ensemble
from latent_merge_nnsight.generation.prefix import prompt_states, share_prompt_states
from latent_merge_nnsight.models import hf_module

PROMPTS = ["hello there", "hi", "what is up with you"]
OTHER = ["a different prompt", "and another"]
N_LAYERS = 4

RECIPES = {
    "base alone": None,
    "lerp pre 2": lmn.Recipe(op="lerp", layers={2: 0.5}),
    "slerp post last": lmn.Recipe(op="slerp", site="post", layers={3: 0.7}),
    "lerp pre 1-3": lmn.Recipe(op="lerp", layers=[1, 2, 3], alpha=0.5),
    "slerp post 2,3": lmn.Recipe(op="slerp", site="post", layers={2: 0.25, 3: 0.8}),
    "lerp pre 0, all positions": lmn.Recipe(op="lerp", layers={0: 0.3}, positions="all"),
    "ensemble": Ensemble(b=0.4),
}
# Prefill block runs once the pair's unmerged streams are stored: (base, source) blocks actually run.
# The base runs from its first merged layer (site post: the one after); a source never runs again.
RUN_WHEN_STORED = {
    "base alone": (0, 0),
    "lerp pre 2": (2, 0),
    "slerp post last": (0, 0),
    "lerp pre 1-3": (3, 0),
    "slerp post 2,3": (1, 0),
    "lerp pre 0, all positions": (4, 0),
    "ensemble": (0, 0),
}


@pytest.fixture(scope="module")
def models():
    return pair("qwen2", n_layers=N_LAYERS, seed=3)


@contextlib.contextmanager
def prefill_blocks(*models):
    """Count, per model, the decoder-block forwards over more than one position (prefills)."""
    counts = [0] * len(models)
    handles = []
    for k, model in enumerate(models):
        for block in hf_module(model).model.layers:

            def hook(module, args, k=k):
                if args[0].shape[1] > 1:
                    counts[k] += 1

            handles.append(block.register_forward_pre_hook(hook))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def run(models, recipe, prompts=PROMPTS, **kw):
    base, ft = models
    sources = None if recipe is None else ft
    out = generate(base, sources, prompts, recipe, max_new_tokens=6, engine="fast", **kw)
    return out.tokens, out.texts


def test_shared_prompt_states_generate_exactly_what_fresh_runs_do(models):
    fresh = {name: run(models, r) for name, r in RECIPES.items()}
    with share_prompt_states(*models):
        first = {name: run(models, r) for name, r in RECIPES.items()}
        again = {name: run(models, r) for name, r in reversed(RECIPES.items())}
    assert first == fresh
    assert again == fresh


def test_stored_blocks_are_not_run_again(models):
    base, ft = models
    attrs = [set(hf_module(m).__dict__) for m in models]
    with share_prompt_states(*models):
        assert [set(hf_module(m).__dict__) for m in models] == attrs  # nothing stored on the models
        with prefill_blocks(base, ft) as counts:
            run(models, RECIPES["slerp post last"])  # stores every block of both streams
        assert counts == [N_LAYERS, N_LAYERS]
        for name, recipe in RECIPES.items():
            with prefill_blocks(base, ft) as counts:
                run(models, recipe)
            assert tuple(counts) == RUN_WHEN_STORED[name], name
        with prefill_blocks(base, ft) as counts:
            run(models, RECIPES["lerp pre 2"], prompts=OTHER)  # other prompts: computed, not read back
        assert counts == [N_LAYERS, 2]
    with prefill_blocks(base, ft) as counts:  # after the block, nothing is kept
        run(models, RECIPES["slerp post last"])
    assert counts == [N_LAYERS, N_LAYERS]
    assert [prompt_states(hf_module(m)) for m in models] == [None, None]


def test_shared_prompt_states_with_sampling_and_steering(models):
    base, ft = models
    deltas = lmn.compute_deltas(base, ft, PROMPTS, [1, 2])
    steer = lmn.Recipe(op="delta", layers={2: 1.0})
    sample = dict(do_sample=True, temperature=0.9, top_p=0.9, seed=7)
    want = [
        run(models, RECIPES["lerp pre 2"], **sample),
        generate(base, deltas, PROMPTS, steer, max_new_tokens=6),
    ]
    with share_prompt_states(*models):
        run(models, RECIPES["slerp post last"])
        got = [
            run(models, RECIPES["lerp pre 2"], **sample),
            generate(base, deltas, PROMPTS, steer, max_new_tokens=6),
        ]
    assert got[0] == want[0]
    assert torch.equal(torch.as_tensor(got[1].tokens), torch.as_tensor(want[1].tokens))


def test_a_nested_block_gives_the_outer_stores_back(models):
    base, ft = models
    with share_prompt_states(*models):
        outer = [prompt_states(hf_module(m)) for m in models]
        with share_prompt_states(base):
            inner = prompt_states(hf_module(base))
            assert inner is not outer[0]
            assert prompt_states(hf_module(ft)) is outer[1]
        assert [prompt_states(hf_module(m)) for m in models] == outer
    assert [prompt_states(hf_module(m)) for m in models] == [None, None]
