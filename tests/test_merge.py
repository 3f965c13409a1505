"""capture + merge_into inside nnsight traces against a plain-PyTorch forward-hook implementation."""

import pytest
import torch
from reference import hidden_states, merged_logits
from tiny import ARCHS, pair

import latent_merge_nnsight as lmn
from latent_merge_nnsight.inputs import encode

PROMPTS = ["The cat sat on the mat.", "Hi!", "Merging in latent space"]


@pytest.fixture(scope="module")
def qwen():
    return pair("qwen2", n_layers=4)


def traced_logits(base, batch, merges, site="pre", positions=None):
    """merges: {layer: (op, sources, alpha, params)} applied with lmn.merge_into in one trace."""
    with torch.no_grad(), base.trace(input_ids=batch.input_ids, attention_mask=batch.attention_mask):
        for layer in sorted(merges):
            op, sources, alpha, params = merges[layer]
            src = sources if op == "regmean" else sources[0]
            lmn.merge_into(
                layer=layer, source=src, op=op, alpha=alpha, positions=positions, site=site, **params
            )
        logits = base.lm_head.output.save()
    return logits


def assert_real_close(a, b, mask, atol=1e-9):
    real = mask.bool()
    assert (a[real] - b[real]).abs().max() < atol


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("site", ["pre", "post"])
@pytest.mark.parametrize("positions", ["last", "all"])
def test_slerp_capture_merge_matches_hook_reference(qwen, padding_side, site, positions):
    base, ft = qwen
    batch = encode(base.tokenizer, PROMPTS, padding_side=padding_side)
    cap = lmn.capture(
        ft, input_ids=batch.input_ids, attention_mask=batch.attention_mask, layers=[1, 2], site=site
    )
    got = traced_logits(
        base,
        batch,
        {1: ("slerp", [cap], 0.3, {}), 2: ("slerp", [cap], 0.6, {})},
        site=site,
        positions=positions,
    )
    srcs = {
        layer: hidden_states(ft._module, batch.input_ids, batch.attention_mask, layer, site)
        for layer in (1, 2)
    }
    ref = merged_logits(
        base._module,
        batch.input_ids,
        batch.attention_mask,
        {1: ("slerp", [srcs[1]], 0.3, {}), 2: ("slerp", [srcs[2]], 0.6, {})},
        site=site,
        positions=positions,
    )
    assert_real_close(got, ref, batch.attention_mask)
    # and the merge did something
    plain = merged_logits(base._module, batch.input_ids, batch.attention_mask, {})
    assert (got - plain).abs().max() > 1e-3


@pytest.mark.parametrize("op", ["lerp", "slerp"])
@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "qwen2"])
def test_other_architectures_match_reference(arch, op):
    # Gemma 2 in float64 turns a left pad's query NaN (its float32 softmax meets the float64 mask minimum)
    dtype, atol = (torch.float32, 1e-4) if arch == "gemma2" else (torch.float64, 1e-9)
    base, ft = pair(arch, n_layers=3, dtype=dtype)
    batch = encode(base.tokenizer, PROMPTS, padding_side="left")
    cap = lmn.capture(ft, input_ids=batch.input_ids, attention_mask=batch.attention_mask, layers=1)
    got = traced_logits(base, batch, {1: (op, [cap], 0.5, {})})
    src = hidden_states(ft._module, batch.input_ids, batch.attention_mask, 1)
    ref = merged_logits(base._module, batch.input_ids, batch.attention_mask, {1: (op, [src], 0.5, {})})
    assert_real_close(got, ref, batch.attention_mask, atol)


def test_regmean_two_sources_and_lambda(qwen):
    base, ft = qwen
    _, ft2 = pair("qwen2", n_layers=4, seed=5)
    batch = encode(base.tokenizer, PROMPTS)
    caps = [
        lmn.capture(m, input_ids=batch.input_ids, attention_mask=batch.attention_mask, layers=2)
        for m in (ft, ft2)
    ]
    srcs = [hidden_states(m._module, batch.input_ids, batch.attention_mask, 2) for m in (ft, ft2)]
    got = traced_logits(base, batch, {2: ("regmean", caps, None, {"lam": 0.5, "weights": [1.0, 2.0]})})
    ref = merged_logits(
        base._module,
        batch.input_ids,
        batch.attention_mask,
        {2: ("regmean", srcs, None, {"lam": 0.5, "weights": [1.0, 2.0]})},
    )
    assert_real_close(got, ref, batch.attention_mask)


def test_delta_steering_defaults_to_all_positions(qwen):
    base, ft = qwen
    deltas = lmn.compute_deltas(base, ft, PROMPTS, layers=[2])
    batch = encode(base.tokenizer, PROMPTS)
    got = traced_logits(base, batch, {2: ("delta", [deltas], 1.5, {})})
    ref = merged_logits(
        base._module,
        batch.input_ids,
        batch.attention_mask,
        {2: ("delta", [deltas.vectors[2].expand(*batch.input_ids.shape, -1)], 1.5, {})},
        positions="all",
    )
    assert_real_close(got, ref, batch.attention_mask)


def test_explicit_real_token_indices(qwen):
    base, ft = qwen
    for side in ("left", "right"):
        batch = encode(base.tokenizer, PROMPTS, padding_side=side)
        cap = lmn.capture(ft, input_ids=batch.input_ids, attention_mask=batch.attention_mask, layers=1)
        got = traced_logits(base, batch, {1: ("lerp", [cap], 0.5, {})}, positions=[0, -2])
        src = hidden_states(ft._module, batch.input_ids, batch.attention_mask, 1)
        ref = merged_logits(
            base._module,
            batch.input_ids,
            batch.attention_mask,
            {1: ("lerp", [src], 0.5, {})},
            positions=[0, -2],
        )
        assert_real_close(got, ref, batch.attention_mask)


def test_alpha_zero_is_bit_identical_to_unmerged_forward(qwen):
    base, ft = qwen
    batch = encode(base.tokenizer, PROMPTS)
    cap = lmn.capture(ft, input_ids=batch.input_ids, attention_mask=batch.attention_mask, layers=[0, 3])
    with torch.no_grad(), base.trace(input_ids=batch.input_ids, attention_mask=batch.attention_mask):
        plain = base.lm_head.output.save()
    merged = traced_logits(base, batch, {0: ("slerp", [cap], 0.0, {}), 3: ("lerp", [cap], 0.0, {})})
    assert torch.equal(plain, merged)


def test_design_card_form_with_text_prompt(qwen):
    """merge_into(layer=L, source=capture, op=...) in base.trace(prompt), the model found from the trace."""
    base, ft = qwen
    prompt = "What is 2+2?"
    ft_trace = lmn.capture(ft, prompt, layers=[2])
    with torch.no_grad(), base.trace(prompt):
        lmn.merge_into(layer=2, source=ft_trace, op="slerp")
        logits = base.lm_head.output.save()
    src = hidden_states(ft._module, ft_trace.input_ids, ft_trace.attention_mask, 2)
    ref = merged_logits(
        base._module, ft_trace.input_ids, ft_trace.attention_mask, {2: ("slerp", [src], 0.5, {})}
    )
    assert torch.allclose(logits, ref, atol=1e-9)


def test_capture_stops_after_highest_layer_and_matches_hf_hidden_states(qwen):
    base, ft = qwen
    calls = []
    handles = [
        blk.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))
        for i, blk in enumerate(ft._module.model.layers)
    ]
    try:
        cap = lmn.capture(ft, PROMPTS, layers=[1, 2], site="pre")
    finally:
        for h in handles:
            h.remove()
    assert calls == [0, 1, 2]  # block 3 never ran
    from reference import position_ids

    with torch.no_grad():
        hs = ft._module(
            input_ids=cap.input_ids,
            attention_mask=cap.attention_mask,
            position_ids=position_ids(cap.attention_mask),
            output_hidden_states=True,
        ).hidden_states
    real = cap.attention_mask.bool()
    for layer in (1, 2):
        assert torch.allclose(cap[layer][real], hs[layer][real], atol=1e-12)
    cap_post = lmn.capture(ft, PROMPTS, layers=[1], site="post")
    assert torch.allclose(cap_post[1][real], hs[2][real], atol=1e-12)


def test_capture_inputs_chat_and_tensors(qwen):
    _, ft = qwen
    chat = [{"role": "user", "content": "hello"}]
    cap = lmn.capture(ft, chat, layers=1)
    text = ft.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    ids = ft.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    assert torch.equal(cap.input_ids, ids)
    cap2 = lmn.capture(ft, input_ids=ids, layers=1)
    assert torch.equal(cap2[1], cap[1])
    assert "layers.1.resid_pre" in repr(cap) and "batch=1" in repr(cap)


def test_capture_save_load_roundtrip(qwen, tmp_path):
    _, ft = qwen
    cap = lmn.capture(ft, PROMPTS, layers=[0, 2], site="post")
    cap.save(tmp_path / "c.safetensors")
    back = lmn.Capture.load(tmp_path / "c.safetensors")
    assert back.layers == [0, 2] and back.site == "post" and back.model_name == cap.model_name
    assert torch.equal(back[2], cap[2]) and torch.equal(back.attention_mask, cap.attention_mask)
    raw = (tmp_path / "c.safetensors").read_bytes()
    assert not raw.startswith(b"\x80")  # not a pickle


def test_invoke_batches_merge_each_invoke_with_its_own_rows(qwen):
    base, ft = qwen
    a, b = "first prompt here", "second"
    cap_a = lmn.capture(ft, a, layers=1)
    cap_b = lmn.capture(ft, b, layers=1)
    with torch.no_grad(), base.trace() as tracer:
        with tracer.invoke(a):
            lmn.merge_into(layer=1, source=cap_a, op="lerp", alpha=0.5)
            la = base.lm_head.output.save()
        with tracer.invoke(b):
            lb = base.lm_head.output.save()
    with torch.no_grad(), base.trace(a):
        lmn.merge_into(layer=1, source=cap_a, op="lerp", alpha=0.5)
        ref_a = base.lm_head.output.save()
    with torch.no_grad(), base.trace(b):
        ref_b = base.lm_head.output.save()
    n_a = cap_a.input_ids.shape[1]
    assert torch.allclose(la[:, -n_a:], ref_a, atol=1e-9)
    assert torch.allclose(lb[:, -cap_b.input_ids.shape[1] :], ref_b, atol=1e-9)
