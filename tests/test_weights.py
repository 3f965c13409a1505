"""Weight-merge baselines: mergekit lerp/slerp/task arithmetic and our RegMean, on tiny local checkpoints."""

import math

import mergekit  # noqa: E402,F401  (declared in the `merge` extra: missing, it must fail, not skip)
import pytest
import tiny
import torch
import transformers

import latent_merge_nnsight as lmn
from latent_merge_nnsight.baselines.regmean_math import regmean_solve, scale_off_diagonal
from latent_merge_nnsight.baselines.weights import (
    collect_grams,
    linear_names,
    merge_weights,
    regmean_weights,
)

PROMPTS = ["hello there", "a", "the quick brown fox", "RegMean!"]


def _tied_pair(seed: int = 1, noise: float = 0.5):
    """Like `tiny.hf_pair` but with the output head tied to the embeddings (as in the toy zoo pair)."""
    torch.manual_seed(seed)
    cfg = tiny.config()
    cfg.tie_word_embeddings = True
    base = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ft = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ft.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(noise * p.std() * torch.randn_like(p))
    return base, ft


@pytest.fixture(scope="module", params=["untied", "tied"])
def checkpoints(request, tmp_path_factory):
    """(base_dir, ft_dir, base_hf, ft_hf) saved as float32 checkpoints with the tiny char tokenizer."""
    hb, hs = tiny.hf_pair(dtype=torch.float32) if request.param == "untied" else _tied_pair()
    root = tmp_path_factory.mktemp(f"ckpt-{request.param}")
    tok = tiny.make_tokenizer()
    for model, name in ((hb, "base"), (hs, "ft")):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root / "base", root / "ft", hb, hs


def _ids() -> torch.Tensor:
    return torch.tensor([[10, 20, 30, 40, 50, 60], [70, 5, 9, 33, 21, 100]])


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    module = lmn.models.hf_module(model)
    with torch.no_grad():
        return module(input_ids=ids).logits


def _state(model) -> dict[str, torch.Tensor]:
    return lmn.models.hf_module(model).state_dict()


# ---------------------------------------------------------------------------------------------------
# mergekit methods


def test_weight_lerp_alpha_zero_and_one_reproduce_each_checkpoints_logits(checkpoints):
    base_dir, ft_dir, hb, hs = checkpoints
    ids = _ids()
    at0 = merge_weights(base_dir, ft_dir, "lerp", 0.0).model
    at1 = merge_weights(base_dir, ft_dir, "lerp", 1.0).model
    assert torch.equal(_logits(at0, ids), _logits(hb, ids))
    assert torch.equal(_logits(at1, ids), _logits(hs, ids))
    assert not torch.allclose(_logits(hb, ids), _logits(hs, ids))


def test_weight_lerp_half_equals_direct_parameter_average(checkpoints, tmp_path):
    base_dir, ft_dir, hb, hs = checkpoints
    result = merge_weights(base_dir, ft_dir, "lerp", 0.5, out=tmp_path / "avg")
    assert (tmp_path / "avg" / "config.json").exists() and (tmp_path / "avg" / "tokenizer.json").exists()
    merged, b, f = _state(result.model), hb.state_dict(), hs.state_dict()
    assert set(merged) == set(b)
    for k in b:
        torch.testing.assert_close(merged[k], (b[k] + f[k]) / 2, rtol=0, atol=1e-6)
    # the written checkpoint loads back through lmn.load with the same logits
    again = lmn.load(tmp_path / "avg")
    assert torch.equal(_logits(again, _ids()), _logits(result.model, _ids()))


def _slerp_reference(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Classic slerp of two tensors taken as single flattened vectors (linear when nearly parallel)."""
    a, b = v0.double().flatten(), v1.double().flatten()
    if a.norm() == 0 and b.norm() == 0:  # e.g. biases initialised to zero in both
        return torch.zeros_like(v0)
    cos = float(torch.dot(a / a.norm(), b / b.norm()).clamp(-1, 1))
    if abs(cos) > 0.9995:
        out = (1 - t) * a + t * b
    else:
        theta = math.acos(cos)
        out = (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)
    return out.reshape(v0.shape).to(v0.dtype)


def test_weight_slerp_half_equals_per_tensor_slerp(checkpoints):
    base_dir, ft_dir, hb, hs = checkpoints
    merged = _state(merge_weights(base_dir, ft_dir, "slerp", 0.5).model)
    b, f = hb.state_dict(), hs.state_dict()
    some_curved = False
    for k in b:
        ref = _slerp_reference(0.5, b[k], f[k])
        torch.testing.assert_close(merged[k], ref, rtol=1e-5, atol=1e-6)
        some_curved |= not torch.allclose(ref, (b[k] + f[k]) / 2, atol=1e-4)
    assert some_curved, "the checkpoints are too close for slerp to differ from lerp"


def test_weight_slerp_alpha_zero_is_the_base(checkpoints):
    base_dir, ft_dir, hb, _ = checkpoints
    assert torch.equal(
        _logits(merge_weights(base_dir, ft_dir, "slerp", 0.0).model, _ids()), _logits(hb, _ids())
    )


def test_task_arithmetic_adds_scaled_task_vectors(tmp_path):
    hb, hs = tiny.hf_pair(dtype=torch.float32, seed=3)
    _, h2 = tiny.hf_pair(dtype=torch.float32, seed=3, noise=0.2)  # a second "FT" of the same base
    base, ft, ft2 = (lmn.wrap(m, tiny.make_tokenizer()) for m in (hb, hs, h2))
    b, f, f2 = hb.state_dict(), hs.state_dict(), h2.state_dict()
    one = _state(merge_weights(base, ft, "task_arithmetic", 0.3).model)
    two = _state(merge_weights(base, [ft, ft2], "task_arithmetic", 0.5, weights=[1.0, 2.0]).model)
    for k in b:
        torch.testing.assert_close(one[k], b[k] + 0.3 * (f[k] - b[k]), rtol=0, atol=1e-6)
        torch.testing.assert_close(
            two[k], b[k] + 0.5 * ((f[k] - b[k]) + 2.0 * (f2[k] - b[k])), rtol=0, atol=1e-6
        )


def test_in_memory_models_merge_like_their_checkpoints(checkpoints):
    base_dir, ft_dir, hb, hs = checkpoints
    from_disk = merge_weights(base_dir, ft_dir, "lerp", 0.25).model
    from_memory = merge_weights(
        lmn.wrap(hb, tiny.make_tokenizer()), lmn.wrap(hs, tiny.make_tokenizer()), "lerp", 0.25
    ).model
    assert torch.equal(_logits(from_disk, _ids()), _logits(from_memory, _ids()))


def test_checkpoint_paths_with_plus_and_at_signs_are_read_as_paths(tmp_path):
    """mergekit parses "a+b" in a model string as model+LoRA and "a@b" as a revision; ours are folders."""
    hb, hs = tiny.hf_pair(dtype=torch.float32, seed=8)
    tok = tiny.make_tokenizer()
    for model, name in ((hb, "base+v1@x"), (hs, "ft+v2")):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    merged = merge_weights(tmp_path / "base+v1@x", tmp_path / "ft+v2", "lerp", 1.0).model
    assert torch.equal(_logits(merged, _ids()), _logits(hs, _ids()))


# ---------------------------------------------------------------------------------------------------
# RegMean math


def test_scale_off_diagonal_by_hand():
    g = torch.tensor([[4.0, 2.0], [2.0, 9.0]])
    assert torch.equal(scale_off_diagonal(g, 0.25), torch.tensor([[4.0, 0.5], [0.5, 9.0]]))
    assert torch.equal(scale_off_diagonal(g, 0.0), torch.diag(torch.tensor([4.0, 9.0])))
    assert torch.equal(scale_off_diagonal(g, 1.0), g)


def _random_problem(seed: int, d_in: int = 6, d_out: int = 4, n: int = 20):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, d_in, generator=gen, dtype=torch.float64) for _ in range(2)]
    ws = [torch.randn(d_out, d_in, generator=gen, dtype=torch.float64) for _ in range(2)]
    return xs, ws


def test_regmean_solve_minimises_the_summed_output_error():
    """With off_diagonal=1 and no ridge, W* is the least-squares fit of every model's outputs on its own
    inputs (checked against torch.linalg.lstsq on the stacked system, an independent route)."""
    xs, ws = _random_problem(0)
    merged = regmean_solve(ws, [x.T @ x for x in xs], [0.5, 0.5], off_diagonal=1.0, ridge=0.0)
    stacked_x = torch.cat(xs)
    stacked_y = torch.cat([x @ w.T for x, w in zip(xs, ws, strict=True)])
    ref = torch.linalg.lstsq(stacked_x, stacked_y).solution.T
    torch.testing.assert_close(merged, ref, rtol=1e-9, atol=1e-9)
    # weighted: coefficients weight each model's squared error
    merged_w = regmean_solve(ws, [x.T @ x for x in xs], [0.2, 0.8], off_diagonal=1.0, ridge=0.0)
    sx = torch.cat([math.sqrt(0.2) * xs[0], math.sqrt(0.8) * xs[1]])
    sy = torch.cat([math.sqrt(0.2) * xs[0] @ ws[0].T, math.sqrt(0.8) * xs[1] @ ws[1].T])
    torch.testing.assert_close(merged_w, torch.linalg.lstsq(sx, sy).solution.T, rtol=1e-9, atol=1e-9)


def test_regmean_identical_grams_reduce_to_the_plain_average():
    xs, ws = _random_problem(1)
    g = xs[0].T @ xs[0]
    for off in (1.0, 0.5, 0.0):
        merged = regmean_solve(ws, [g, g.clone()], [0.5, 0.5], off_diagonal=off)
        torch.testing.assert_close(merged, (ws[0] + ws[1]) / 2, rtol=1e-10, atol=1e-10)


def test_regmean_dominant_gram_tends_to_that_models_weights():
    xs, ws = _random_problem(2)
    g0, g1 = xs[0].T @ xs[0], xs[1].T @ xs[1]
    to0 = regmean_solve(ws, [1e6 * g0, g1], [0.5, 0.5])
    to1 = regmean_solve(ws, [g0, 1e6 * g1], [0.5, 0.5])
    plain = regmean_solve(ws, [g0, g1], [0.5, 0.5])
    assert (to0 - ws[0]).abs().max() < 1e-4 * ws[0].abs().max()
    assert (to1 - ws[1]).abs().max() < 1e-4 * ws[1].abs().max()
    assert (plain - ws[0]).abs().max() > 0.1  # not trivially close without the scaling


# ---------------------------------------------------------------------------------------------------
# Gram collection and the whole-model RegMean


def test_collect_grams_equals_xtx_from_plain_forward_hooks():
    hb, _ = tiny.hf_pair(dtype=torch.float64, seed=4)
    model = lmn.wrap(hb, tiny.make_tokenizer())
    names = linear_names(model)
    assert len(names) == 4 * 7 + 1  # q, k, v, o, gate, up, down per block, plus the untied head
    grams = collect_grams(model, PROMPTS, batch_size=3)  # two batches, left-padded rows

    batch = lmn.inputs.encode(model.tokenizer, PROMPTS)
    ref: dict[str, torch.Tensor] = {}
    modules = dict(hb.named_modules())

    def hook(name):
        def fn(module, args):
            x = args[0][batch.attention_mask.bool()]
            ref[name] = x.T @ x

        return fn

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens from 0
    try:
        with torch.no_grad():
            hb(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions)
    finally:
        for h in handles:
            h.remove()
    assert grams.n_tokens == sum(len(p) for p in PROMPTS)
    assert set(grams.grams) == set(names)
    for n in names:
        torch.testing.assert_close(grams.grams[n], ref[n], rtol=1e-10, atol=1e-10)


def test_linear_names_leave_out_a_tied_head():
    hb, _ = _tied_pair()
    assert "lm_head" not in linear_names(hb)
    assert len(linear_names(hb)) == 4 * 7


def test_regmean_weights_with_identical_grams_is_the_plain_average():
    hb, hs = _tied_pair(seed=5)
    base, ft = lmn.wrap(hb, tiny.make_tokenizer()), lmn.wrap(hs, tiny.make_tokenizer())
    g = collect_grams(base, PROMPTS)
    merged = _state(regmean_weights(base, ft, grams=[g, g], alpha=0.5).model)
    b, f = hb.state_dict(), hs.state_dict()
    for k in b:
        torch.testing.assert_close(merged[k], (b[k] + f[k]) / 2, rtol=1e-5, atol=1e-6)


def test_regmean_weights_alpha_ends_are_exact_and_the_middle_differs(tmp_path):
    hb, hs = tiny.hf_pair(dtype=torch.float32, seed=6)
    base, ft = lmn.wrap(hb, tiny.make_tokenizer()), lmn.wrap(hs, tiny.make_tokenizer())
    grams = [collect_grams(base, PROMPTS), collect_grams(ft, PROMPTS[:2])]
    ids = _ids()
    assert torch.equal(
        _logits(regmean_weights(base, ft, grams=grams, alpha=0.0).model, ids), _logits(hb, ids)
    )
    assert torch.equal(
        _logits(regmean_weights(base, ft, grams=grams, alpha=1.0).model, ids), _logits(hs, ids)
    )
    mid = regmean_weights(base, ft, PROMPTS, alpha=0.5, source_calibration=[PROMPTS[:2]], out=tmp_path / "rm")
    name = "model.layers.1.mlp.down_proj.weight"
    average = (hb.state_dict()[name] + hs.state_dict()[name]) / 2
    assert (_state(mid.model)[name] - average).abs().max() > 1e-3  # the Gram matrices matter
    again = lmn.load(tmp_path / "rm")
    assert torch.equal(_logits(again, ids), _logits(mid.model, ids))


def test_grams_round_trip_through_safetensors(tmp_path):
    hb, _ = tiny.hf_pair(dtype=torch.float32, seed=7)
    g = collect_grams(lmn.wrap(hb, tiny.make_tokenizer()), PROMPTS)
    g.save(tmp_path / "g.safetensors")
    back = type(g).load(tmp_path / "g.safetensors")
    assert back.n_tokens == g.n_tokens and all(torch.equal(back.grams[k], v) for k, v in g.grams.items())


# ---------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"method": "slurp"}, "method='slurp'"),
        ({"method": "lerp", "alpha": 1.5}, "alpha=1.5 is outside [0, 1]"),
        ({"method": "lerp", "alpha": float("nan")}, "alpha=nan"),
        ({"method": "lerp", "load": False}, "out=None and load=False"),
        ({"method": "lerp", "off_diagonal": 0.5}, "apply to regmean"),
        ({"method": "regmean", "alpha": 0.5}, "calibration is required"),
        ({"method": "regmean", "alpha": 1.5, "allow_extrapolation": True}, "must be non-negative"),
    ],
)
def test_bad_arguments_raise_latent_merge_error(kwargs, needle):
    hb, hs = tiny.hf_pair(dtype=torch.float32)
    base, ft = lmn.wrap(hb, tiny.make_tokenizer()), lmn.wrap(hs, tiny.make_tokenizer())
    with pytest.raises(lmn.LatentMergeError, match=needle.replace("[", r"\[").replace("(", r"\(")):
        merge_weights(base, ft, **kwargs)


def test_slerp_refuses_two_sources_and_scale_off_diagonal_checks_range():
    hb, hs = tiny.hf_pair(dtype=torch.float32)
    base, ft = lmn.wrap(hb, tiny.make_tokenizer()), lmn.wrap(hs, tiny.make_tokenizer())
    with pytest.raises(lmn.LatentMergeError, match="exactly one source"):
        merge_weights(base, [ft, ft], "slerp", 0.5)
    with pytest.raises(lmn.LatentMergeError, match=r"off_diagonal=1.5 is outside \[0, 1\]"):
        scale_off_diagonal(torch.eye(2), 1.5)
