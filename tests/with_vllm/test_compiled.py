"""The merged model compiled by vLLM (no enforce_eager): the mix is an opaque op, so the graph traced
once serves every later batch. Tokens equal engine="fast" for pre/post and last/all recipes, 8 per-request
alphas in one batch equal 8 separate runs, and nothing compiles again after the first call."""

import pytest
from vllm_helpers import run_driver


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return run_driver("driver_compiled.py", out_dir=tmp_path_factory.mktemp("compiled"))


def test_compiled_tokens_equal_fast_engine(result):
    cases = result["cases"]
    assert {"lerp_pre_last", "slerp_pre_last", "lerp_post_all", "delta_pre_last"} <= set(cases)
    for name, case in cases.items():
        for run in case["vllm"]:
            assert run == case["fast"], f"{name}: compiled vLLM's tokens differ from engine='fast'"
        assert case["fast"] != result["base"], f"{name} does not change the base's tokens: a weak check"


def test_compiled_per_request_alphas_in_one_batch(result):
    assert len(set(result["prompt_tokens"])) > 1
    assert result["batch"] == result["separate"]
    assert result["batch"] == result["batch_fast"]
    assert len({tuple(t) for t in result["batch"]}) >= 3, "the alphas changed too few rows: a weak check"


def test_the_model_is_compiled_once_and_never_again(result):
    for layout, c in result["compiles"].items():
        assert c["first"]["vllm_models_seen"] >= 1, f"{layout}: vLLM did not compile the model"
        assert c["first"]["dynamo_graphs"] >= 1, f"{layout}: dynamo traced no graph"
        assert c["first"]["graph_breaks"] == 0, f"{layout}: the forward has graph breaks"
        assert c["end"] == c["first"], f"{layout}: compiled again after the first call: {c}"


def test_per_token_tensors_are_built_once_per_forward(result):
    calls = result["mix_calls"]
    assert calls["builds"] > 0 and calls["merged_layers"] >= 2
    assert calls["sites"] == calls["merged_layers"] * calls["builds"]  # every site of a forward reuses them
