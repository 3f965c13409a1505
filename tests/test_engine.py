"""The block-by-block engine: its pieces against HF forwards, the source's depth, shallow sources, other
architectures, and the fallback when a model cannot run block by block."""

import functools
import importlib

import pytest
import torch
import transformers
from nnsight.intervention.source import Controller
from reference import position_ids
from reference_generate import ensemble_generate, lockstep_generate
from tiny import ARCHS, batch_sizes_seen, hf_pair, make_tokenizer, pair
from tiny import config as tiny_config
from tiny import generate_raw as generate
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import latent_merge_nnsight as lmn
from latent_merge_nnsight._nnsight import plain_forwards
from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.generation.fast import PairedEngine
from latent_merge_nnsight.generation.graphs import EagerStep
from latent_merge_nnsight.generation.stack import KVCache, Stack, attention_bias, fast_support, mask_positions
from latent_merge_nnsight.models import hf_module, truncate

PROMPTS = ["hello there", "hi", "what is up with you"]
N_NEW = 5
ENGINES = ["fast", "nnsight"]


@pytest.fixture(scope="module")
def models():
    return pair("qwen2", n_layers=4, seed=0)


# ----------------------------------------------------------------------------------------------------
# pieces


def test_attention_bias_allows_real_slots_up_to_each_query():
    kv_mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 0]])
    bias = attention_bias(kv_mask, start=2, n_new=2, dtype=torch.float64)  # queries at slots 2 and 3
    allowed = bias == 0
    expected = torch.tensor(
        [
            [[False, True, True, False, False], [False, True, True, True, False]],
            [[True, True, True, False, False], [True, True, True, True, False]],
        ]
    )
    assert bias.shape == (2, 1, 2, 5)
    assert torch.equal(allowed[:, 0], expected)
    assert torch.all(bias[~allowed] == torch.finfo(torch.float64).min)


def test_mask_positions_count_real_tokens():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert mask_positions(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_kv_cache_writes_at_the_cursor_and_keeps_rows():
    cache = KVCache(n_layers=1, capacity=3)
    k1, v1 = torch.randn(2, 1, 2, 4), torch.randn(2, 1, 2, 4)
    cache.begin(2)
    keys, values = cache.update(k1, v1, 0)
    assert torch.equal(keys, k1) and torch.equal(values, v1)
    k2 = torch.randn(2, 1, 2, 4)
    cache.begin(2)  # past capacity 3: the buffers grow and keep what they held
    keys, _ = cache.update(k2, k2, 0)
    assert torch.equal(keys, torch.cat([k1, k2], dim=2))
    cache.keep_rows(torch.tensor([1]))
    assert torch.equal(cache.keys[0][:, :, :4], torch.cat([k1, k2], dim=2)[1:])
    cache.begin(1)
    with pytest.raises(LatentMergeError, match="skipped"):
        cache.filled[0] = 1  # a layer that missed tokens
        cache.update(torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 4), 0)


def test_attention_bias_with_a_window_keeps_only_the_latest_slots():
    kv_mask = torch.tensor([[0, 1, 1, 1, 1, 1]])
    allowed = attention_bias(kv_mask, start=3, n_new=3, dtype=torch.float64, window=2)[0, 0] == 0
    # queries at slots 3, 4, 5 see their own slot and the one before (HF's `kv > q - window`)
    expected = torch.tensor(
        [
            [False, False, True, True, False, False],
            [False, False, False, True, True, False],
            [False] * 4 + [True] * 2,
        ]
    )
    assert torch.equal(allowed, expected)


WINDOWED = ["qwen2", "qwen3", "mistral", "mixtral", "gemma2", "gemma3_text", "phi3"]


@pytest.mark.parametrize(
    ("arch", "window"), [(a, None) for a in ARCHS] + [(a, 3) for a in WINDOWED], ids=lambda v: str(v)
)
def test_stack_prefill_and_decode_equal_hf_forward(arch, window):
    # Gemma 2 attends eagerly with a float32 softmax: in float64 the mask's minimum becomes -inf there,
    # and a left pad's query turns NaN (in HF as here), so they run in float32
    dtype, atol = (torch.float32, 1e-5) if arch == "gemma2" else (torch.float64, 1e-10)
    hf, _ = hf_pair(arch, n_layers=3, seed=4, window=window, dtype=dtype)
    stack = Stack(hf)
    ids = torch.tensor([[0, 0, 40, 41, 42], [50, 51, 52, 53, 54]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    new = torch.tensor([[60], [61]])
    full_ids, full_mask = torch.cat([ids, new], 1), torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    with torch.no_grad():
        expected = hf(
            input_ids=full_ids, attention_mask=full_mask, position_ids=position_ids(full_mask)
        ).logits
        cache = stack.new_cache(8)
        cache.begin(5)
        h, ctx = stack.embed(ids, mask_positions(mask))
        for i in range(stack.n_layers):
            h = stack.block(i, h, stack.attention_bias(mask, 0, 5), mask_positions(mask), ctx, cache)
        prefill = stack.logits(h[:, -1])
        cache.begin(1)
        pos = mask_positions(full_mask)[:, -1:]
        h, ctx = stack.embed(new, pos)
        for i in range(stack.n_layers):
            h = stack.block(i, h, stack.attention_bias(full_mask, 5, 1), pos, ctx, cache)
        decode = stack.logits(h[:, -1])
        if window is not None:  # the window changes the result (so the comparison tests it)
            unwindowed = hf_pair(arch, n_layers=3, seed=4, dtype=dtype)[0](
                input_ids=full_ids, attention_mask=full_mask, position_ids=position_ids(full_mask)
            ).logits
            assert not torch.allclose(unwindowed[:, 5], expected[:, 5], atol=1e-3)
    assert torch.allclose(prefill, expected[:, 4], atol=atol)
    assert torch.allclose(decode, expected[:, 5], atol=atol)


# ----------------------------------------------------------------------------------------------------
# the source stops at the highest merged layer


def count_block_calls(model) -> tuple[list[int], list]:
    counts = [0] * len(hf_module(model).model.layers)
    handles = []
    for i, block in enumerate(hf_module(model).model.layers):
        handles.append(
            block.register_forward_pre_hook(lambda m, a, i=i: counts.__setitem__(i, counts[i] + 1))
        )
    return counts, handles


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    ("recipe", "blocks_run"),
    [
        (dict(op="slerp", layers={2: 0.5}), 2),  # pre at 2: the source's blocks 0, 1
        (dict(op="lerp", layers={0: 0.2, 1: 0.5}), 1),
        (dict(op="lerp", layers={2: 0.5}, site="post"), 3),  # post at 2: blocks 0, 1, 2
    ],
)
def test_source_forward_stops_after_the_highest_merged_layer(models, engine, recipe, blocks_run):
    base, ft = models
    counts, handles = count_block_calls(ft)
    try:
        out = generate(
            base, ft, PROMPTS, lmn.Recipe(**recipe), max_new_tokens=N_NEW, engine=engine, ignore_eos=True
        )
    finally:
        for h in handles:
            h.remove()
    steps = N_NEW  # the prompt step and one step per new token but the last
    assert counts == [steps] * blocks_run + [0] * (4 - blocks_run)
    assert out.info["source_blocks_per_step"] == [blocks_run]


@pytest.mark.parametrize("engine", ENGINES)
def test_source_loaded_only_up_to_the_merge_layer_gives_the_same_tokens(models, engine, tmp_path):
    base, ft = models
    recipe = lmn.Recipe(op="slerp", layers={1: 0.3, 2: 0.6})
    full = generate(base, ft, PROMPTS, recipe, max_new_tokens=N_NEW, engine=engine)
    # in memory: drop the blocks above 2 of a copy of the source
    shallow = lmn.wrap(truncate(hf_pair("qwen2", n_layers=4, seed=0)[1], 2), make_tokenizer(), name="shallow")
    assert lmn.models.model_info(shallow).n_layers == 3
    assert generate(base, shallow, PROMPTS, recipe, max_new_tokens=N_NEW, engine=engine).tokens == full.tokens
    # from disk: lmn.load(..., up_to_layer=2) never builds the upper blocks
    hf_module(ft).save_pretrained(tmp_path)
    loaded = lmn.load(tmp_path, up_to_layer=2, tokenizer=make_tokenizer(), dtype=torch.float64)
    assert len(hf_module(loaded).model.layers) == 3
    assert generate(base, loaded, PROMPTS, recipe, max_new_tokens=N_NEW, engine=engine).tokens == full.tokens


@pytest.mark.parametrize("arch", ["qwen2", "gemma2"])
def test_a_shallow_source_keeps_the_window_of_each_of_its_layers(arch, tmp_path):
    """`up_to_layer` cuts `layer_types` with the blocks: each kept block still slides as before."""
    dtype = torch.float32 if arch == "gemma2" else torch.float64
    base, ft = pair(arch, n_layers=4, seed=3, window=3, dtype=dtype)
    recipe = lmn.Recipe(op="lerp", layers={2: 0.7})
    hf_module(ft).save_pretrained(tmp_path)
    shallow = lmn.load(tmp_path, up_to_layer=2, tokenizer=make_tokenizer(), dtype=dtype)
    assert Stack(shallow).windows == Stack(ft).windows[:3] and len(set(Stack(shallow).windows)) == 2
    for engine in ENGINES:
        full = generate(base, ft, PROMPTS, recipe, max_new_tokens=N_NEW, engine=engine)
        assert (
            generate(base, shallow, PROMPTS, recipe, max_new_tokens=N_NEW, engine=engine).tokens
            == full.tokens
        )


def test_a_cut_source_drops_its_untied_head_unless_asked_to_keep_it():
    hf = hf_pair("qwen2", n_layers=4, seed=0)[1]
    head_params = hf.lm_head.weight.numel()
    full_params = sum(p.numel() for p in hf.parameters())
    block_params = sum(p.numel() for p in hf.model.layers[3].parameters())
    cut = truncate(hf, 2)
    assert isinstance(cut.lm_head, lmn.models.DroppedHead)
    assert sum(p.numel() for p in cut.parameters()) == full_params - head_params - block_params
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert cut(input_ids=ids).logits.shape == (1, 3, 0)
    kept = truncate(hf_pair("qwen2", n_layers=4, seed=0)[1], 2, keep_head=True)
    assert isinstance(kept.lm_head, torch.nn.Linear)
    # a head tied to the embeddings costs nothing and stays
    tied_cfg = tiny_config("qwen2", n_layers=3)
    tied_cfg.tie_word_embeddings = True
    tied = transformers.AutoModelForCausalLM.from_config(tied_cfg)
    assert isinstance(truncate(tied, 1).lm_head, torch.nn.Linear)
    # what a traced capture of the cut source reads is unchanged
    source = lmn.wrap(truncate(hf_pair("qwen2", n_layers=4, seed=0)[1], 2), make_tokenizer(), name="cut")
    reference = lmn.wrap(hf_pair("qwen2", n_layers=4, seed=0)[1], make_tokenizer(), name="whole")
    assert torch.equal(lmn.capture(source, PROMPTS, [2])[2], lmn.capture(reference, PROMPTS, [2])[2])


def test_a_kept_engine_is_reused_with_new_alphas_and_gives_fresh_engine_tokens(models, monkeypatch):
    """keep_engine=True keeps the fixed-shape engine (what CUDA graphs capture) for the next call of the same
    layout; the reused run, with other alphas and prompts, gives the tokens of a fresh eager engine."""
    base, ft = models
    generate_module = importlib.import_module("latent_merge_nnsight.generation.fast")
    first = lmn.Recipe(op="slerp", layers={1: 0.3, 2: 0.6})
    second = lmn.Recipe(op="slerp", layers={1: 0.9, 2: 0.1})
    other_prompts = ["a b c", "zz", "what is up with me"]
    expected = generate(base, ft, other_prompts, second, max_new_tokens=N_NEW, ignore_eos=True)
    stale = generate(base, ft, other_prompts, first, max_new_tokens=N_NEW, ignore_eos=True)
    assert stale.tokens != expected.tokens  # so a reused engine that kept the old alphas would fail below
    monkeypatch.setattr(generate_module, "PairedEngine", functools.partial(PairedEngine, static_step=True))
    kw = dict(max_new_tokens=N_NEW, ignore_eos=True, keep_engine=True)
    one = generate(base, ft, PROMPTS, first, **kw)
    two = generate(base, ft, other_prompts, second, **kw)
    assert not one.info["engine_reused"] and two.info["engine_reused"]
    assert two.tokens == expected.tokens
    # a smaller batch runs on the kept engine, with the tokens of a fresh engine
    fewer = generate(base, ft, other_prompts[:2], second, **kw)
    assert fewer.info["engine_reused"] and fewer.tokens == expected.tokens[:2]
    # a larger batch builds a new engine, sized for both: the smaller batch then reuses it again
    more = other_prompts + ["one more row"]
    assert not generate(base, ft, more, second, **kw).info["engine_reused"]
    assert hf_module(base).__dict__[generate_module._KEPT].max_rows == len(more)
    assert generate(base, ft, other_prompts[:1], second, **kw).tokens == expected.tokens[:1]
    # another layer layout builds a new engine; keep_engine=False lets the kept one go
    other_layers = lmn.Recipe(op="slerp", layers={2: 0.5})
    assert not generate(base, ft, PROMPTS[:2], other_layers, **kw).info["engine_reused"]
    generate(base, ft, PROMPTS, first, max_new_tokens=N_NEW)
    assert generate_module._KEPT not in hf_module(base).__dict__


# ----------------------------------------------------------------------------------------------------
# other architectures


@pytest.mark.parametrize(
    ("arch", "window"),
    [(a, None) for a in ARCHS if a != "qwen2"] + [(a, 3) for a in WINDOWED],
    ids=lambda v: str(v),
)
def test_other_architectures_match_the_hook_loop_on_both_engines(arch, window, monkeypatch):
    # a window of 3 is shorter than every prompt: the source's and the base's masks must slide
    dtype = torch.float32 if arch == "gemma2" else torch.float64  # see the Stack test above
    base, ft = pair(arch, n_layers=3, seed=5, window=window, dtype=dtype)
    tok = base.tokenizer
    recipe = lmn.Recipe(op="slerp", layers={1: 0.5})
    expected = [
        lockstep_generate(
            hf_module(base),
            [hf_module(ft)],
            tok(p)["input_ids"],
            {1: 0.5},
            "slerp",
            max_new_tokens=N_NEW,
            eos_id=1,
        )
        for p in PROMPTS
    ]
    for engine in ENGINES:
        assert generate(base, ft, PROMPTS, recipe, max_new_tokens=N_NEW, engine=engine).tokens == expected
    if window is None:
        return
    # the fixed-shape decode steps CUDA graphs capture (run eagerly here) slide the window too
    replays = [0]
    replay = EagerStep.replay
    monkeypatch.setattr(
        EagerStep, "replay", lambda self: replays.__setitem__(0, replays[0] + 1) or replay(self)
    )
    monkeypatch.setattr(
        importlib.import_module("latent_merge_nnsight.generation.fast"),
        "PairedEngine",
        functools.partial(PairedEngine, static_step=True),
    )
    pair_module = importlib.import_module("latent_merge_nnsight.generation.nnsight")
    monkeypatch.setattr(
        pair_module, "LiveSource", functools.partial(pair_module.LiveSource, static_step=True)
    )
    for engine in ENGINES:
        before = replays[0]
        assert generate(base, ft, PROMPTS, recipe, max_new_tokens=N_NEW, engine=engine).tokens == expected
        assert replays[0] > before


class _RenamedLlamaConfig(transformers.LlamaConfig):
    """A Llama under a model type the package does not know."""

    model_type = "lmn_test_renamed_llama"


class _RenamedLlamaForCausalLM(transformers.LlamaForCausalLM):
    config_class = _RenamedLlamaConfig


def test_a_registered_architecture_captures_merges_and_generates_on_both_engines(monkeypatch):
    """One registry: a family taught with `register_architecture` runs captures, `merge_into` and lockstep
    generation on both engines, matching the hook loop."""
    from latent_merge_nnsight import sites

    monkeypatch.setattr(sites, "_ARCHITECTURES", dict(sites._ARCHITECTURES))  # forgotten after the test
    llama = tiny_config("llama", n_layers=3).to_dict()
    config = _RenamedLlamaConfig(**{k: v for k, v in llama.items() if k != "model_type"})
    torch.manual_seed(8)
    hb, hs = (_RenamedLlamaForCausalLM(config).to(torch.float64).eval() for _ in range(2))
    with torch.no_grad():
        for p in hs.parameters():
            p.add_(0.5 * p.std() * torch.randn_like(p) if p.numel() > 1 else 0 * p)
    with pytest.raises(LatentMergeError, match="register_architecture"):
        lmn.wrap(hb, make_tokenizer())
    lmn.register_architecture(
        "lmn_test_renamed_llama",
        layers="model.layers",
        final_norm="model.norm",
        embed="model.embed_tokens",
        rotary="model.rotary_emb",
    )
    base, ft = (
        lmn.wrap(hb, make_tokenizer(), name="renamed-base"),
        lmn.wrap(hs, make_tokenizer(), name="renamed-ft"),
    )
    assert fast_support(base) is None
    captured = lmn.capture(ft, PROMPTS[0], layers=[1])
    with base.trace(PROMPTS[0]):
        merged = lmn.merge_into(layer=1, source=captured, op="lerp", alpha=1.0).save()
    torch.testing.assert_close(merged[:, -1], captured.resid(1, "pre")[:, -1])
    tok = base.tokenizer
    expected = [
        lockstep_generate(hb, [hs], tok(p)["input_ids"], {1: 0.5}, "slerp", max_new_tokens=N_NEW, eos_id=1)
        for p in PROMPTS
    ]
    recipe = lmn.Recipe(op="slerp", layers={1: 0.5})
    for engine in ENGINES:
        out = generate(base, ft, PROMPTS, recipe, max_new_tokens=N_NEW, engine=engine)
        assert out.engine == engine and out.tokens == expected


def test_logit_ensemble_of_soft_capped_models_matches_the_paper_loop():
    """Gemma 2 soft-caps its logits after the LM head; the engines' source logits must be capped too."""
    base, ft = pair("gemma2", n_layers=3, seed=7, dtype=torch.float32)
    with torch.no_grad():
        for m in (base, ft):
            hf_module(m).lm_head.weight.mul_(10)  # peaked logits, so the cap changes which token wins
    hf_module(base).config.final_logit_softcapping = None
    hf_module(ft).config.final_logit_softcapping = 0.5
    prompts = [base.tokenizer(p)["input_ids"] for p in PROMPTS]

    def paper_loop():
        return [
            ensemble_generate(hf_module(base), hf_module(ft), p, 0.5, max_new_tokens=N_NEW) for p in prompts
        ]

    expected = paper_loop()
    for engine in ENGINES:
        out = generate(
            base, ft, PROMPTS, lmn.Ensemble(b=0.5), max_new_tokens=N_NEW, engine=engine, ignore_eos=True
        )
        assert out.tokens == expected
    hf_module(ft).config.final_logit_softcapping = None
    assert paper_loop() != expected  # the cap matters here


def test_unsupported_model_is_refused_by_fast_and_auto_falls_back_to_nnsight():
    # an attention function registered with HF: the block-by-block engine cannot know what mask it takes
    transformers.AttentionInterface.register("lmn_test_attention", sdpa_attention_forward)
    torch.manual_seed(6)
    hf = (
        transformers.AutoModelForCausalLM.from_config(tiny_config("qwen2", n_layers=3))
        .to(torch.float64)
        .eval()
    )
    hf.set_attn_implementation("lmn_test_attention")
    base = lmn.wrap(hf, make_tokenizer(), name="custom-attention")
    assert "'lmn_test_attention' is not supported" in fast_support(base)
    with pytest.raises(LatentMergeError, match="engine='fast' cannot run"):
        generate(base, None, PROMPTS, None, max_new_tokens=3, engine="fast")
    out = generate(base, None, PROMPTS, None, max_new_tokens=3)
    assert out.engine == "nnsight"
    enc = base.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(out.sequences, hf.generate(**enc, max_new_tokens=3, do_sample=False))


def test_fixed_shape_decode_step_of_cuda_graphs_gives_the_same_tokens(models, monkeypatch):
    """The decode step CUDA graphs capture (full-capacity caches written at a device index, rows compacted in
    place when the batch halves), run eagerly on CPU, gives the tokens of the plain eager step."""
    base, ft = models
    prompts = [*PROMPTS, "one more prompt"]
    recipe = lmn.Recipe(op="slerp", layers={1: 0.3, 2: 0.6})
    free = generate(base, ft, prompts, recipe, max_new_tokens=7, ignore_eos=True)
    eos = free.tokens[0][1]  # row 0 ends early; the others when they produce it
    eager = generate(base, ft, prompts, recipe, max_new_tokens=7, eos_token_id=eos)
    # the module, not `lmn.generate` the function that shadows it as a package attribute
    generate_module = importlib.import_module("latent_merge_nnsight.generation.fast")
    monkeypatch.setattr(generate_module, "PairedEngine", functools.partial(PairedEngine, static_step=True))
    with batch_sizes_seen(base) as batch_sizes:
        static = generate(base, ft, prompts, recipe, max_new_tokens=7, eos_token_id=eos)
        static_free = generate(base, ft, prompts, recipe, max_new_tokens=7, ignore_eos=True)
    assert static.tokens == eager.tokens
    assert static_free.tokens == free.tokens
    # rows are dropped only once at most half are left
    alive = [sum(1 for toks in eager.tokens if len(toks) > step) for step in range(len(eager.tokens[0]) + 7)]
    first_run = batch_sizes[: max(len(t) for t in eager.tokens)]
    for size, left in zip(first_run, alive, strict=False):
        assert size >= left and (size == 4 or size <= 2)


def _controllers(model) -> dict[int, object]:
    return {id(m): m.__dict__.get("forward") for m in hf_module(model).modules()}


def test_the_engines_call_the_models_modules_without_nnsight_controllers(models, monkeypatch):
    """Outside a trace nnsight's per-module controllers only cost time: the fast engine, and the nnsight
    engine's live source, take them off while they run and put the same ones back."""
    base, ft = models
    before = _controllers(base), _controllers(ft)
    assert any(f is not None for f in before[0].values())  # a wrapped model: controllers installed
    called: list[int] = []
    original = Controller.__call__

    def counting(self, *args, **kwargs):
        called.append(id(self.module_ref()))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Controller, "__call__", counting)
    recipe = lmn.Recipe(op="slerp", layers={2: 0.5})
    fast = generate(base, ft, PROMPTS, recipe, max_new_tokens=N_NEW, engine="fast")
    assert called == []
    traced = generate(base, ft, PROMPTS, recipe, max_new_tokens=N_NEW, engine="nnsight")
    source_modules = {id(m) for m in hf_module(ft).modules()}
    assert called and not source_modules & set(called)  # the traced base goes through its controllers
    assert traced.tokens == fast.tokens
    assert (_controllers(base), _controllers(ft)) == before


def test_plain_forwards_puts_the_controllers_back_after_an_error_and_spares_accelerate_hooks(models):
    base, _ = models
    modules = list(hf_module(base).modules())
    before = _controllers(base)
    hooked = hf_module(base).model.layers[0]
    hooked.__dict__["_hf_hook"] = object()  # accelerate's device alignment: its controller runs it
    try:
        with pytest.raises(RuntimeError, match="boom"), plain_forwards(modules):
            assert "forward" in hooked.__dict__
            assert "forward" not in hf_module(base).model.layers[1].__dict__
            raise RuntimeError("boom")
    finally:
        del hooked.__dict__["_hf_hook"]
    assert _controllers(base) == before


def test_the_base_can_be_its_own_live_source(models):
    """The source's module calls bypass the controllers, so the trace of the same model never sees them."""
    base, _ = models
    recipe = lmn.Recipe(op="lerp", layers={2: 0.5}, site="post")
    traced = generate(base, base, PROMPTS, recipe, max_new_tokens=N_NEW, engine="nnsight")
    assert traced.tokens == generate(base, None, PROMPTS, None, max_new_tokens=N_NEW).tokens  # lerp(h, h) = h


def test_cuda_graphs_are_not_used_on_cpu(models):
    base, ft = models
    out = generate(
        base, ft, PROMPTS, lmn.Recipe(op="slerp", layers={2: 0.5}), max_new_tokens=3, cuda_graphs=True
    )
    assert out.info["cuda_graphs"] is False and out.info["kv_cache_bytes"] > 0


def test_compiled_decode_step_gives_the_eager_tokens_and_is_reused_without_recompiling(models):
    """compile_step=True runs the fixed-shape step through torch.compile (on CPU here, without graphs)."""
    base, ft = models
    kw = dict(max_new_tokens=N_NEW, ignore_eos=True)
    first = lmn.Recipe(op="slerp", layers={1: 0.3, 2: 0.6})
    second = lmn.Recipe(op="slerp", layers={1: 0.9, 2: 0.1})
    expected = [generate(base, ft, PROMPTS, r, **kw).tokens for r in (first, second)]
    assert expected[0] != expected[1]
    compiled = generate(base, ft, PROMPTS, first, compile_step=True, keep_engine=True, **kw)
    assert compiled.info["compiled_step"] and compiled.tokens == expected[0]
    counters = torch._dynamo.utils.counters
    graphs_before = counters["stats"]["unique_graphs"]
    again = generate(base, ft, PROMPTS, second, compile_step=True, keep_engine=True, **kw)
    assert again.info["engine_reused"] and counters["stats"]["unique_graphs"] == graphs_before
    assert again.tokens == expected[1]
    generate(base, ft, PROMPTS, first, max_new_tokens=1)  # lets the kept engine go


def test_release_engine_lets_the_kept_engine_and_its_sources_go(models, monkeypatch):
    base, ft = models
    generate_module = importlib.import_module("latent_merge_nnsight.generation.fast")
    monkeypatch.setattr(generate_module, "PairedEngine", functools.partial(PairedEngine, static_step=True))
    recipe = lmn.Recipe(op="slerp", layers={2: 0.5})
    generate(base, ft, PROMPTS, recipe, max_new_tokens=2, keep_engine=True)
    kept = hf_module(base).__dict__[generate_module._KEPT]
    assert any(s.hf is hf_module(ft) for s in kept.sources)
    assert generate_module.release_engine(base) and not generate_module.release_engine(base)
    assert generate_module._KEPT not in hf_module(base).__dict__ and kept.cache_bytes() == 0


def test_a_kept_engine_takes_new_deltas_and_leaves_the_callers_untouched(models, monkeypatch):
    base, ft = models
    generate_module = importlib.import_module("latent_merge_nnsight.generation.fast")
    first = lmn.compute_deltas(base, ft, PROMPTS, [1, 2])
    second = lmn.compute_deltas(base, ft, ["something else entirely", "xyz"], [1, 2])
    recipe = lmn.Recipe(op="delta", layers={1: 2.0, 2: 3.0})
    kw = dict(max_new_tokens=N_NEW, ignore_eos=True)
    expected = generate(base, second, PROMPTS, recipe, **kw).tokens
    assert expected != generate(base, first, PROMPTS, recipe, **kw).tokens
    saved = {k: v.clone() for k, v in first.vectors.items()}
    monkeypatch.setattr(generate_module, "PairedEngine", functools.partial(PairedEngine, static_step=True))
    generate(base, first, PROMPTS, recipe, keep_engine=True, **kw)
    again = generate(base, second, PROMPTS, recipe, keep_engine=True, **kw)
    assert again.info["engine_reused"] and again.tokens == expected
    assert all(torch.equal(saved[k], first.vectors[k]) for k in saved)
    generate_module.release_engine(base)


@pytest.mark.parametrize(
    ("engine", "module", "name", "what"),
    [
        ("fast", "latent_merge_nnsight.generation.fast", "PairedEngine", "the decode step"),
        ("nnsight", "latent_merge_nnsight.generation.nnsight", "LiveSource", "the source step"),
    ],
)
def test_a_failed_capture_falls_back_to_the_eager_step_with_a_warning(
    models, monkeypatch, engine, module, name, what
):
    """The fast engine's paired step and the nnsight engine's source step: capture forced on CPU fails."""
    base, ft = models
    owner = importlib.import_module(module)
    recipe = lmn.Recipe(op="slerp", layers={1: 0.3, 2: 0.6})
    kw = dict(max_new_tokens=N_NEW, ignore_eos=True, engine=engine)
    eager = generate(base, ft, PROMPTS, recipe, **kw)

    class Forced(getattr(owner, name)):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.graphs.use_graphs = self.static = True

    monkeypatch.setattr(owner, name, Forced)
    with pytest.warns(UserWarning, match=f"CUDA graph capture of {what} failed"):
        out = generate(base, ft, PROMPTS, recipe, **kw)
    assert out.tokens == eager.tokens
    assert out.info["cuda_graphs"] is False and out.info["cuda_graph_error"]
