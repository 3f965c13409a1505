"""vLLM's merged greedy tokens equal the fast engine's: >= 8 recipes, prompts of different lengths, fresh
and on a prefix-cache hit, with vLLM's default token budget and with chunked prefill forced small."""

import pytest
from vllm_helpers import run_driver


@pytest.mark.parametrize("mode", ["plain", "chunked"])
def test_vllm_tokens_equal_fast_engine(mode, tmp_path):
    result = run_driver("driver_equivalence.py", mode, out_dir=tmp_path)
    cases = result["cases"]
    assert len(cases) >= 8
    lengths = result["prompt_tokens"]
    assert len(set(lengths)) > 1  # prompts of different lengths in one batch
    if mode == "chunked":
        assert max(lengths) > result["budget"]["max_num_batched_tokens"]  # prefills were split
    for name, case in cases.items():
        fresh, cached = case["vllm"]
        assert fresh == case["fast"], f"{name}: vLLM's tokens differ from engine='fast'"
        assert cached == case["fast"], f"{name}: the prefix-cache run differs from engine='fast'"
        assert case["second_run_prefix_hits"] > 0, f"{name}: the second run did not hit the prefix cache"
    changed = [name for name, case in cases.items() if case["fast"] != result["base"]]
    assert len(changed) >= 6, f"too few recipes change the base's tokens ({changed}): the check would be weak"
