"""Tensor parallel 2 (two CPU workers, compiled): the merged model's greedy tokens still equal
engine="fast"."""

from vllm_helpers import run_driver


def test_tensor_parallel_two_equals_the_fast_engine(tmp_path):
    result = run_driver("driver_tensor_parallel.py", out_dir=tmp_path)
    assert result["vllm_tp2"] == result["fast"]
    assert result["fast"] != result["base"], "the merge changed nothing: the check would be weak"
