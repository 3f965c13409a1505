"""Per-row recipes on engine="vllm": each row's recipe goes with its request, so one call gives every
row the tokens of a call with that row's recipe alone (and of the fast engine's per-row call), for
live-source rows and for `delta` (steering) rows."""

import pytest
from vllm_helpers import run_driver


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return run_driver("driver_rows.py", out_dir=tmp_path_factory.mktemp("rows"))


def test_per_row_recipes_on_vllm_equal_each_rows_call_alone(result):
    assert result["fast"] == result["alone"]
    assert result["vllm"] == result["alone"]
    assert result["alone"][2] == result["base"][2] and result["alone"][3] == result["base"][3]
    assert sum(a != b for a, b in zip(result["alone"], result["base"], strict=True)) >= 3
    assert "share site, positions and op parameters" in result["mixed_sites"]
    assert "recipe" in result["mixed_sites"]


def test_per_row_delta_recipes_on_vllm_equal_each_rows_call_alone(result):
    assert result["steer_fast"] == result["steer_alone"]
    assert result["steer_vllm"] == result["steer_alone"]
    assert result["steer_alone"][2] == result["base"][2] and result["steer_alone"][3] == result["base"][3]
    assert sum(a != b for a, b in zip(result["steer_alone"], result["base"], strict=True)) >= 2
