"""Bad input raises LatentMergeError naming the parameter and the valid range, and leaves the model clean."""

import pytest
import torch
from tiny import hf_pair, make_tokenizer, pair

import latent_merge_nnsight as lmn
from latent_merge_nnsight import LatentMergeError

PROMPT = "a short prompt"


@pytest.fixture(scope="module")
def models():
    return pair("qwen2", n_layers=4)


def merge_in_trace(base, **kwargs):
    with torch.no_grad(), base.trace(PROMPT):
        lmn.merge_into(**kwargs)
        base.lm_head.output.save()


def assert_clean(base):
    """A plain forward through the wrapper still equals the untouched HF module's forward."""
    batch = lmn.inputs.encode(base.tokenizer, PROMPT)
    with torch.no_grad(), base.trace(input_ids=batch.input_ids, attention_mask=batch.attention_mask):
        traced = base.lm_head.output.save()
    with torch.no_grad():
        plain = base._module(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert torch.equal(traced, plain)
    assert not any(blk._forward_pre_hooks or blk._forward_hooks for blk in base._module.model.layers)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layer=4), r"layer=4 is out of range for tiny-qwen2-base \(4 layers\); expected 0 <= layer < 4"),
        (dict(layer=-1), r"layer=-1 is out of range .* expected 0 <= layer < 4"),
        (dict(layer=1, alpha=1.5), r"alpha=1.5 is outside \[0, 1\] for op 'slerp'.*allow_extrapolation=True"),
        (dict(layer=1, alpha=float("nan")), r"alpha=nan must be a finite number"),
        (dict(layer=1, op="slrep"), r"unknown op 'slrep'; expected one of: delta, lerp, regmean, slerp"),
        (dict(layer=1, site="middle"), r"site='middle'; expected one of: 'pre'"),
        (dict(layer=1, positions="first"), r"positions='first'; expected 'last', 'all'"),
        (dict(layer=1, op="lerp", weights=[1.0]), r"op 'lerp' takes no parameter\(s\) \['weights'\]"),
    ],
)
def test_bad_merge_arguments_raise_before_any_change(models, kwargs, message):
    base, ft = models
    cap = lmn.capture(ft, PROMPT, layers=[1])
    with pytest.raises(LatentMergeError, match=message):
        merge_in_trace(base, source=cap, **kwargs)
    assert_clean(base)


def test_capture_of_other_tokens_is_refused(models):
    base, ft = models
    cap = lmn.capture(ft, "different words", layers=[1])
    with pytest.raises(LatentMergeError, match="captured on different tokens"):
        merge_in_trace(base, layer=1, source=cap)
    assert_clean(base)


def test_capture_missing_layer_and_site_mismatch(models):
    base, ft = models
    cap = lmn.capture(ft, PROMPT, layers=[1])
    with pytest.raises(LatentMergeError, match=r"layer=2 was not captured .* captured layers: \[1\]"):
        merge_in_trace(base, layer=2, source=cap)
    with pytest.raises(LatentMergeError, match="site='post' but this capture holds site='pre'"):
        merge_in_trace(base, layer=1, source=cap, site="post")
    assert_clean(base)


def test_source_shape_and_type_errors(models):
    base, _ = models
    with pytest.raises(
        LatentMergeError, match=r"source has shape \(1, 3, 32\) at layer 1; expected \(1, 14, 32\)"
    ):
        merge_in_trace(base, layer=1, source=torch.zeros(1, 3, 32, dtype=torch.float64), op="lerp")
    with pytest.raises(LatentMergeError, match="source has type str"):
        merge_in_trace(base, layer=1, source="ft")
    with pytest.raises(LatentMergeError, match="takes one source, got a list of 2"):
        merge_in_trace(base, layer=1, source=[torch.zeros(1), torch.zeros(1)], op="slerp")
    assert_clean(base)


def test_merge_outside_trace_says_where_to_call_it(models):
    _, ft = models
    cap = lmn.capture(ft, PROMPT, layers=[1])
    with pytest.raises(LatentMergeError, match="no active trace: call merge_into inside"):
        lmn.merge_into(layer=1, source=cap)


def test_capture_layer_errors(models):
    _, ft = models
    with pytest.raises(LatentMergeError, match=r"layers=9 is out of range .* expected 0 <= layers < 4"):
        lmn.capture(ft, PROMPT, layers=[9])
    with pytest.raises(LatentMergeError, match="layers=\\[\\] is empty"):
        lmn.capture(ft, PROMPT, layers=[])
    with pytest.raises(LatentMergeError, match="prompts\\[0\\] is empty"):
        lmn.capture(ft, "", layers=[1])


def test_incompatible_models_are_named(models):
    base, _ = models
    hb, _ = hf_pair("qwen2", n_layers=2, hidden=48)
    other = lmn.wrap(hb, make_tokenizer(), name="wide")
    with pytest.raises(
        LatentMergeError, match="hidden_size differs: base tiny-qwen2-base has 32, source wide has 48"
    ):
        lmn.check_compatible(base, other)
    with pytest.raises(LatentMergeError, match="hidden_size differs"):
        lmn.compute_deltas(base, other, [PROMPT], layers=[0])
    tok = make_tokenizer()
    tok.add_tokens(["<extra>"])
    hb2, _ = hf_pair("qwen2", n_layers=2)
    with pytest.raises(
        LatentMergeError, match="tokenizer vocabularies differ.*only in source \\['<extra>'\\]"
    ):
        lmn.check_compatible(base, lmn.wrap(hb2, tok, name="extra-tok"))


@pytest.mark.parametrize(
    "bad, param, value",
    [
        (dict(recipe=lmn.Recipe(op="slerp", layers={9: 0.5})), "layers", [9]),
        (dict(do_sample=True, temperature=-1.0), "temperature", -1.0),
        (dict(temperature=float("nan")), "temperature", "nan"),
        (dict(engine="turbo"), "engine", "turbo"),
    ],
)
def test_the_error_names_its_parameter_as_a_field(models, bad, param, value):
    """`LatentMergeError.param` and `.value` say which argument was refused (what the CLI and the server
    map to their flag and OpenAI `param`), and the message names it too."""
    base, ft = models
    kwargs = dict(recipe=lmn.Recipe(op="slerp", layers={1: 0.5}), max_new_tokens=1) | bad
    recipe = kwargs.pop("recipe")
    with pytest.raises(LatentMergeError) as info:
        lmn.generate(base, ft, [PROMPT], recipe, **kwargs)
    assert info.value.param == param
    assert str(info.value.value) == str(value)
    assert param in str(info.value)
    assert_clean(base)


def test_a_merge_layer_out_of_range_names_the_layer_parameter(models):
    base, ft = models
    with pytest.raises(LatentMergeError) as info:
        merge_in_trace(base, layer=4, source=lmn.capture(ft, PROMPT, layers=[1]), alpha=0.5)
    assert (info.value.param, info.value.value, info.value.expected) == ("layer", 4, "0 <= layer < 4")
