"""`lmn.generate`: both engines against the paper's hook loop, baselines, sampling, stopping, bad input.

Every merged token stream is compared with tests/reference_generate.py: an independent plain-PyTorch
lockstep loop (batch 1, no padding, forward-pre-hooks on the models' own `forward`).
"""

import copy
import gc
import os
import warnings

import pytest
import torch
from reference_generate import ensemble_generate, lockstep_generate
from tiny import batch_sizes_seen, hf_pair, make_tokenizer, pair
from tiny import generate_raw as generate

import latent_merge_nnsight as lmn
from latent_merge_nnsight.ensemble import Ensemble
from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.generation import GenerationResult
from latent_merge_nnsight.models import hf_module, truncate
from latent_merge_nnsight.sampling import Sampler, SamplingConfig, filter_logits

PROMPTS = ["hello there", "hi", "what is up with you"]  # different lengths: a padded batch
N_NEW = 6
ENGINES = ["fast", "nnsight"]
EOS = 1


@pytest.fixture(scope="module")
def models():
    base, ft = pair("qwen2", n_layers=4, seed=0)
    _, ft2 = pair("qwen2", n_layers=4, seed=1)
    return base, ft, ft2


@pytest.fixture(scope="module")
def deltas(models):
    base, ft, _ = models
    return lmn.compute_deltas(base, ft, ["a quick test", "of the deltas"], [1, 2])


def prompt_ids(tok, text: str) -> list[int]:
    return tok(text)["input_ids"]


def reference_rows(models, sources, **kw) -> list[list[int]]:
    base = models[0]
    return [
        lockstep_generate(
            hf_module(base),
            [hf_module(s) for s in sources],
            prompt_ids(base.tokenizer, p),
            max_new_tokens=N_NEW,
            eos_id=EOS,
            **kw,
        )
        for p in PROMPTS
    ]


# ----------------------------------------------------------------------------------------------------
# both engines == the paper's hook loop


CASES = {
    "lerp-pre-last": (dict(op="lerp", layers={2: 0.6}), dict(op="lerp", merges={2: 0.6}), 1),
    "slerp-pre-last": (dict(op="slerp", layers={2: 0.5}), dict(op="slerp", merges={2: 0.5}), 1),
    "slerp-positions-all": (
        dict(op="slerp", layers={1: 0.5}, positions="all"),
        dict(op="slerp", merges={1: 0.5}, positions="all"),
        1,
    ),
    "lerp-several-layers": (
        dict(op="lerp", layers={1: 0.7, 3: 0.3}),
        dict(op="lerp", merges={1: 0.7, 3: 0.3}),
        1,
    ),
    "slerp-gradient-alphas": (
        dict(op="slerp", layers=[0, 3], alpha=[0.2, 0.8]),
        dict(op="slerp", merges={0: 0.2, 3: 0.8}),
        1,
    ),
    "lerp-site-post": (
        dict(op="lerp", layers={2: 0.8}, site="post"),
        dict(op="lerp", merges={2: 0.8}, site="post"),
        1,
    ),
    "slerp-prompt-indices": (
        dict(op="slerp", layers={2: 0.9}, positions=[0, -1]),
        dict(op="slerp", merges={2: 0.9}, positions=[0, -1]),
        1,
    ),
    "regmean-lambda-weights": (
        {"op": "regmean", "layers": [2], "lambda": 0.25, "weights": [1.0, 3.0]},
        dict(op="regmean", merges={2: None}, lam=0.25, weights=[1.0, 3.0]),
        2,
    ),
    "regmean-alpha": (dict(op="regmean", layers={1: 0.7}), dict(op="regmean", merges={1: 0.7}), 2),
}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", list(CASES))
def test_engine_greedy_tokens_equal_paper_hook_loop(models, case, engine):
    recipe_kw, ref_kw, n_sources = CASES[case]
    base, ft, ft2 = models
    sources = [ft, ft2][:n_sources]
    out = generate(
        base,
        sources if n_sources > 1 else ft,
        PROMPTS,
        lmn.Recipe(**recipe_kw),
        max_new_tokens=N_NEW,
        engine=engine,
    )
    assert out.engine == engine
    assert out.tokens == reference_rows(models, sources, **ref_kw)


@pytest.mark.parametrize("engine", ENGINES)
def test_delta_steering_equals_hook_loop_from_object_and_file(models, deltas, engine, tmp_path):
    base = models[0]
    expected = reference_rows(
        models,
        [],
        op="delta",
        merges={1: 1.5, 2: 0.5},
        positions="all",
        deltas={k: deltas.vectors[k] for k in (1, 2)},
    )
    from_object = generate(
        base,
        deltas,
        PROMPTS,
        lmn.Recipe(op="delta", layers={1: 1.5, 2: 0.5}),
        max_new_tokens=N_NEW,
        engine=engine,
    )
    path = tmp_path / "deltas.safetensors"
    deltas.save(path)
    from_file = generate(
        base,
        None,
        PROMPTS,
        lmn.Recipe(op="delta", layers={1: 1.5, 2: 0.5}, deltas=str(path)),
        max_new_tokens=N_NEW,
        engine=engine,
    )
    assert from_object.tokens == expected
    assert from_file.tokens == expected


# ----------------------------------------------------------------------------------------------------
# padding: batched == per row, left and right


def right_padded(tok, texts):
    rows = [prompt_ids(tok, t) for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


@pytest.mark.parametrize("engine", ENGINES)
def test_batched_left_and_right_padding_equal_unbatched_rows(models, engine):
    base, ft, _ = models
    recipe = lmn.Recipe(op="slerp", layers={1: 0.4, 2: 0.5})
    singles = [
        generate(base, ft, [p], recipe, max_new_tokens=N_NEW, engine=engine).tokens[0] for p in PROMPTS
    ]
    left = generate(base, ft, PROMPTS, recipe, max_new_tokens=N_NEW, engine=engine, padding_side="left")
    right = generate(base, ft, PROMPTS, recipe, max_new_tokens=N_NEW, engine=engine, padding_side="right")
    ids, mask = right_padded(base.tokenizer, PROMPTS)
    manual = generate(
        base, ft, None, recipe, input_ids=ids, attention_mask=mask, max_new_tokens=N_NEW, engine=engine
    )
    assert left.tokens == singles
    assert right.tokens == singles
    assert manual.tokens == singles
    # sequences are the left-aligned prompt followed by the new tokens
    width = manual.prompt_width
    for row, toks in enumerate(manual.tokens):
        real = ids[row][mask[row].bool()].tolist()
        assert manual.sequences[row, :width][manual.attention_mask[row, :width].bool()].tolist() == real
        assert manual.sequences[row, width : width + len(toks)].tolist() == toks


# ----------------------------------------------------------------------------------------------------
# identities with HF generate


def hf_greedy(model, texts, n):
    enc = model.tokenizer(
        texts, return_tensors="pt", padding=True
    )  # nnsight set the tokenizer to left padding
    with torch.no_grad():
        return hf_module(model).generate(**enc, max_new_tokens=n, do_sample=False)


@pytest.mark.parametrize("engine", ENGINES)
def test_alpha_zero_and_base_alone_reproduce_hf_generate(models, engine):
    base, ft, _ = models
    expected = hf_greedy(base, PROMPTS, N_NEW)
    zero = generate(
        base, ft, PROMPTS, lmn.Recipe(op="slerp", layers={2: 0.0}), max_new_tokens=N_NEW, engine=engine
    )
    alone = generate(base, ft, PROMPTS, None, max_new_tokens=N_NEW, engine=engine)
    for out in (zero, alone):
        assert out.sequences.shape == expected.shape
        assert torch.equal(out.sequences, expected)


@pytest.mark.parametrize("engine", ENGINES)
def test_logit_ensemble_b0_is_base_and_b_matches_paper_loop(models, engine):
    base, ft, _ = models
    b0 = generate(base, ft, PROMPTS, Ensemble(b=0.0), max_new_tokens=N_NEW, engine=engine)
    assert torch.equal(b0.sequences, hf_greedy(base, PROMPTS, N_NEW))
    for b in (0.5, [0.0, 1.0, 0.3]):
        out = generate(base, ft, PROMPTS, Ensemble(b=b), max_new_tokens=N_NEW, engine=engine, ignore_eos=True)
        expected = [
            ensemble_generate(
                hf_module(base), hf_module(ft), prompt_ids(base.tokenizer, p), b, max_new_tokens=N_NEW
            )
            for p in PROMPTS
        ]
        assert out.tokens == expected


def test_source_alone_is_the_source_models_own_generate(models):
    _, ft, _ = models
    out = generate(ft, None, PROMPTS, None, max_new_tokens=N_NEW)
    assert torch.equal(out.sequences, hf_greedy(ft, PROMPTS, N_NEW))


def test_chat_prompts_use_the_chat_template(models):
    base, ft, _ = models
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    templated = [
        base.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats
    ]
    recipe = lmn.Recipe(op="slerp", layers={2: 0.5})
    from_chats = generate(base, ft, chats, recipe, max_new_tokens=4)
    from_text = generate(base, ft, templated, recipe, max_new_tokens=4)
    assert from_chats.tokens == from_text.tokens
    assert from_chats.prompt_width == max(len(prompt_ids(base.tokenizer, t)) for t in templated)


def test_auto_engine_picks_fast(models):
    base, ft, _ = models
    assert (
        generate(base, ft, PROMPTS[:1], lmn.Recipe(op="lerp", layers={1: 0.5}), max_new_tokens=2).engine
        == "fast"
    )


def test_model_generation_config_does_not_leak_into_merged_tokens(models):
    """A repetition penalty in the base's generation config must not change the merged greedy tokens."""
    base, ft, _ = models
    hf = hf_module(base)
    saved = hf.generation_config
    hf.generation_config = copy.deepcopy(saved)
    hf.generation_config.repetition_penalty = 3.0
    try:
        config = hf.generation_config
        out = generate(
            base, ft, PROMPTS, lmn.Recipe(op="slerp", layers={2: 0.5}), max_new_tokens=N_NEW, engine="nnsight"
        )
        assert hf.generation_config is config  # swapped only while generating
    finally:
        hf.generation_config = saved
    assert out.tokens == reference_rows(models, [ft], op="slerp", merges={2: 0.5})


# ----------------------------------------------------------------------------------------------------
# sampling


def test_sampler_frequencies_follow_tempered_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    n = 20000
    sampler = Sampler(SamplingConfig(do_sample=True, temperature=0.7, seed=3), n, "cpu")
    tokens = sampler(logits.expand(n, -1), torch.arange(n))
    freq = torch.bincount(tokens, minlength=5).double() / n
    p = torch.softmax(logits.double() / 0.7, dim=-1)
    assert torch.allclose(freq, p, atol=4 * torch.sqrt(p * (1 - p) / n).max().item())


def test_top_k_and_top_p_keep_the_hand_computed_sets():
    logits = torch.log(torch.tensor([[0.5, 0.05, 0.3, 0.15]]))
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, False, True, False]]
    # mass before each token (ranked): 0 (0.5), 0.5 (0.3), 0.8 (0.15), 0.95 (0.05)
    assert torch.isfinite(filter_logits(logits, top_p=0.8)).tolist() == [[True, False, True, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.81)).tolist() == [[True, False, True, True]]
    assert torch.isfinite(filter_logits(logits, top_p=0.1)).tolist() == [[True, False, False, False]]


def test_seeded_sampling_is_reproducible_and_the_same_on_both_engines(models):
    base, ft, _ = models
    recipe = lmn.Recipe(op="slerp", layers={2: 0.5})
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.95, top_k=50, ignore_eos=True)
    a = generate(base, ft, PROMPTS, recipe, seed=11, engine="fast", **kw)
    b = generate(base, ft, PROMPTS, recipe, seed=11, engine="fast", **kw)
    c = generate(base, ft, PROMPTS, recipe, seed=11, engine="nnsight", **kw)
    d = generate(base, ft, PROMPTS, recipe, seed=12, engine="fast", **kw)
    assert a.tokens == b.tokens == c.tokens
    assert a.tokens != d.tokens
    greedy = generate(base, ft, PROMPTS, recipe, max_new_tokens=8, ignore_eos=True)
    top1 = generate(base, ft, PROMPTS, recipe, seed=5, **{**kw, "top_k": 1})
    assert top1.tokens == greedy.tokens  # top-k 1 leaves only the argmax


@pytest.mark.parametrize("engine", ENGINES)
def test_temperature_zero_is_greedy_even_when_sampling(models, engine):
    """Temperature 0 means greedy everywhere (`SamplingConfig.greedy`), here as in a system's sampling."""
    base, ft, _ = models
    recipe = lmn.Recipe(op="slerp", layers={2: 0.5})
    greedy = generate(base, ft, PROMPTS, recipe, max_new_tokens=6, ignore_eos=True, engine=engine)
    cold = generate(
        base,
        ft,
        PROMPTS,
        recipe,
        max_new_tokens=6,
        ignore_eos=True,
        engine=engine,
        do_sample=True,
        temperature=0.0,
        seed=3,
    )
    assert cold.tokens == greedy.tokens


# ----------------------------------------------------------------------------------------------------
# stopping


@pytest.mark.parametrize("engine", ENGINES)
def test_eos_and_stop_strings_end_rows_independently(models, engine):
    base, ft, _ = models
    tok = base.tokenizer
    recipe = lmn.Recipe(op="slerp", layers={2: 0.5})
    free = generate(base, ft, PROMPTS, recipe, max_new_tokens=8, ignore_eos=True, engine=engine)
    assert free.finish_reasons == ["length"] * 3
    # an EOS id that row 0 produces at its 3rd step, and no other row produces before
    eos = free.tokens[0][2]
    others_first = [toks.index(eos) if eos in toks else 99 for toks in free.tokens[1:]]
    out = generate(base, ft, PROMPTS, recipe, max_new_tokens=8, eos_token_id=eos, engine=engine)
    assert out.tokens[0] == free.tokens[0][:3]
    assert out.finish_reasons[0] == "eos"
    assert out.texts[0] == tok.decode(free.tokens[0][:2], skip_special_tokens=True)
    for row, first in zip((1, 2), others_first, strict=True):
        assert out.tokens[row] == free.tokens[row][: first + 1]
    # a stop string drawn from row 1's text ends row 1 where it completes
    text1 = free.texts[1]
    stop = text1[3:5]
    end = text1.find(stop)  # the stop string is left out of the text (one rule with the servers)
    out = generate(base, ft, PROMPTS, recipe, max_new_tokens=8, ignore_eos=True, stop=[stop], engine=engine)
    assert out.finish_reasons[1] == "stop"
    assert out.texts[1] == text1[:end] and stop not in out.texts[1]
    assert tok.decode(out.tokens[1], skip_special_tokens=True).startswith(text1[: end + len(stop)])
    assert out.tokens[1] == free.tokens[1][: len(out.tokens[1])]
    for row in (0, 2):
        if stop not in free.texts[row]:
            assert out.tokens[row] == free.tokens[row] and out.finish_reasons[row] == "length"


def test_finished_rows_stop_costing_compute_in_the_fast_engine(models):
    base, ft, _ = models
    recipe = lmn.Recipe(op="slerp", layers={2: 0.5})
    free = generate(base, ft, PROMPTS, recipe, max_new_tokens=6, ignore_eos=True)
    eos = free.tokens[0][1]  # row 0 ends at its 2nd token (others may too)
    out = generate(base, ft, PROMPTS, recipe, max_new_tokens=6, eos_token_id=eos)
    with batch_sizes_seen(base) as batch_sizes:
        generate(base, ft, PROMPTS, recipe, max_new_tokens=6, eos_token_id=eos, engine="fast")
    # one forward per step; at each step only the rows still running are in the batch
    alive = [sum(1 for toks in out.tokens if len(toks) > step) for step in range(len(batch_sizes))]
    assert batch_sizes == alive
    assert batch_sizes[-1] < len(PROMPTS)


def test_result_prints_rows_and_reasons(models):
    base, ft, _ = models
    out = generate(
        base, ft, PROMPTS, lmn.Recipe(op="lerp", layers={1: 0.5}), max_new_tokens=3, ignore_eos=True
    )
    text = repr(out)
    assert isinstance(out, GenerationResult) and len(out) == 3
    assert "engine='fast'" in text and text.count("length") == 3 and "lerp" in text


# ----------------------------------------------------------------------------------------------------
# bad input: a clear error before any forward, nothing left hooked


def hook_counts(model) -> list[int]:
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in hf_module(model).modules()]


def assert_untouched(model, reference_copy):
    ids = torch.tensor([[5, 9, 17, 33, 2]])
    with torch.no_grad():
        assert torch.equal(hf_module(model)(input_ids=ids).logits, reference_copy(input_ids=ids).logits)


@pytest.fixture(scope="module")
def untouched_base():
    """A fresh copy of the base (same seed, same weights) that no generation ever touches."""
    return hf_pair("qwen2", n_layers=4, seed=0)[0]


@pytest.fixture(scope="module")
def bad_calls(models):
    base, ft, _ = models
    other_width, _ = pair("qwen2", n_layers=4, hidden=48, seed=2)
    shallow = lmn.wrap(
        truncate(hf_pair("qwen2", n_layers=4, seed=0)[1], 1), make_tokenizer(), name="shallow-ft"
    )
    recipe = lmn.Recipe(op="slerp", layers={2: 0.5})
    return {
        "empty prompt": (lambda: generate(base, ft, [""], recipe, max_new_tokens=2), "empty"),
        "max_new_tokens": (lambda: generate(base, ft, PROMPTS, recipe, max_new_tokens=0), "max_new_tokens=0"),
        "incompatible": (
            lambda: generate(base, other_width, PROMPTS, recipe, max_new_tokens=2),
            "hidden_size",
        ),
        "beam search": (
            lambda: generate(base, ft, PROMPTS, recipe, max_new_tokens=2, num_beams=4),
            "beam search",
        ),
        "layer past shallow source": (
            lambda: generate(base, shallow, PROMPTS, recipe, max_new_tokens=2),
            "up_to_layer >= 2",
        ),
        "engine": (
            lambda: generate(base, ft, PROMPTS, recipe, max_new_tokens=2, engine="turbo"),
            "engine='turbo'",
        ),
        "temperature": (
            lambda: generate(base, ft, PROMPTS, recipe, max_new_tokens=2, do_sample=True, temperature=-0.5),
            "temperature",
        ),
        "stop": (lambda: generate(base, ft, PROMPTS, recipe, max_new_tokens=2, stop=[""]), "stop="),
        "layer past base": (
            lambda: generate(base, ft, PROMPTS, lmn.Recipe(op="slerp", layers={9: 0.5}), max_new_tokens=2),
            "[9]",
        ),
        "delta without deltas": (
            lambda: generate(base, ft, PROMPTS, lmn.Recipe(op="delta", layers={1: 1.0}), max_new_tokens=2),
            "compute_deltas",
        ),
        "ensemble of a shallow source": (
            lambda: generate(base, shallow, PROMPTS, Ensemble(b=0.5), max_new_tokens=2),
            "whole source",
        ),
        "regmean weights": (
            lambda: generate(
                base,
                [ft, ft],
                PROMPTS,
                lmn.Recipe(op="regmean", layers=[1], alpha=0.5, weights=[1.0]),
                max_new_tokens=2,
            ),
            "weights",
        ),
        "recipe type": (lambda: generate(base, ft, PROMPTS, {"op": "slerp"}, max_new_tokens=2), "recipe"),
        "ensemble b": (lambda: Ensemble(b=1.5), "b=1.5"),
    }


@pytest.mark.parametrize(
    "name",
    [
        "empty prompt",
        "max_new_tokens",
        "incompatible",
        "beam search",
        "layer past shallow source",
        "engine",
        "temperature",
        "stop",
        "layer past base",
        "delta without deltas",
        "ensemble of a shallow source",
        "regmean weights",
        "recipe type",
        "ensemble b",
    ],
)
def test_bad_input_raises_clear_error_before_any_forward(models, bad_calls, untouched_base, name):
    base, ft, _ = models
    call, fragment = bad_calls[name]
    before = [hook_counts(m) for m in (base, ft)]
    forwards = []
    handle = hf_module(base).register_forward_pre_hook(lambda m, a: forwards.append(1))
    try:
        with pytest.raises(LatentMergeError) as info:
            call()
    finally:
        handle.remove()
    assert fragment in str(info.value)
    assert forwards == []  # refused before any forward ran
    assert [hook_counts(m) for m in (base, ft)] == before
    assert_untouched(base, untouched_base)


def test_beam_search_message_says_why(models):
    base, ft, _ = models
    with pytest.raises(LatentMergeError, match="reordered"):
        generate(base, ft, PROMPTS, lmn.Recipe(op="slerp", layers={2: 0.5}), max_new_tokens=2, num_beams=2)


@pytest.mark.parametrize("engine", ENGINES)
def test_error_during_generation_leaves_models_untouched(models, untouched_base, engine):
    base, ft, _ = models
    calls = []

    def fail_at_second_step(module, args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom in the source at a decode step")

    config = hf_module(base).generation_config
    before = [hook_counts(m) for m in (base, ft)]
    handle = hf_module(ft).model.layers[0].register_forward_pre_hook(fail_at_second_step)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            generate(
                base, ft, PROMPTS, lmn.Recipe(op="slerp", layers={2: 0.5}), max_new_tokens=4, engine=engine
            )
    finally:
        handle.remove()
    assert [hook_counts(m) for m in (base, ft)] == before
    assert hf_module(base).generation_config is config
    assert_untouched(base, untouched_base)
    # and the next generation is still right
    ok = generate(
        base, ft, PROMPTS, lmn.Recipe(op="slerp", layers={2: 0.5}), max_new_tokens=N_NEW, engine=engine
    )
    assert ok.tokens == reference_rows(models, [ft], op="slerp", merges={2: 0.5})


# ----------------------------------------------------------------------------------------------------
# memory


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on some lazily deprecated torch objects warns
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc for RSS")
def test_200_merged_generations_leave_memory_flat(models):
    base, ft, _ = models
    recipe = lmn.Recipe(op="slerp", layers={2: 0.5})
    for engine in ENGINES:  # warm up both paths
        generate(base, ft, PROMPTS[:2], recipe, max_new_tokens=3, engine=engine)
    tensors, rss = live_tensors(), rss_bytes()
    for i in range(200):
        generate(base, ft, PROMPTS[:2], recipe, max_new_tokens=3, engine=ENGINES[i % 4 == 0])
    assert live_tensors() - tensors <= 5
    assert rss_bytes() - rss < 40 * 2**20
