"""The qwen3, llama and mistral families in vLLM: merged greedy tokens equal engine="fast"'s (tiny random
pairs built locally; Mistral with a sliding window shorter than the prompts)."""

import pytest
from vllm_helpers import run_driver

FAMILIES = ("qwen3", "llama", "mistral")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return run_driver("driver_families.py", out_dir=tmp_path_factory.mktemp("families"), timeout=900)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("recipe", ["slerp", "lerp"])
def test_vllm_merged_tokens_equal_the_fast_engine(result, family, recipe):
    r = result[family]
    assert len(set(r["prompt_lens"])) == len(r["prompt_lens"]) == 3
    assert r["vllm"][recipe] == r["fast"][recipe]
    assert r["fast"][recipe] != r["base"], "the merge changed no token: the check would be weak"


@pytest.mark.parametrize("family", FAMILIES)
def test_both_recipes_ran_on_one_vllm_engine(result, family):
    engines = result[family]["engines"]
    assert len(engines) == 2 and engines[0] == engines[1]


def test_mistral_window_is_shorter_than_the_prompts_and_changes_the_tokens(result):
    r = result["mistral"]
    assert r["window"] == 8 and max(r["prompt_lens"]) > r["window"]
    assert r["fast_nowindow"] != r["fast"]["slerp"]
