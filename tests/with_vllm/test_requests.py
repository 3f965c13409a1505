"""Per-request recipes in one vLLM batch, the export's own recipe, alpha 0 against plain vLLM, refusals."""

import pytest
from vllm_helpers import run_driver


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return run_driver("driver_requests.py", out_dir=tmp_path_factory.mktemp("requests"))


def test_eight_alphas_in_one_batch_equal_eight_separate_runs(result):
    assert len(result["batch"]) == 8
    assert result["batch"] == result["separate"]
    assert result["batch"] == result["fast"]  # and each row is the fast engine's merge at its alpha
    changed = sum(b != z for b, z in zip(result["batch"], result["alpha0"], strict=True))
    assert changed >= 2, "the per-request alphas changed no row: the check would be weak"


def test_requests_without_a_recipe_run_the_exports(result):
    assert result["default"] == result["at_export_alpha"]
    assert result["default"] != result["alpha0"]


def test_alpha_zero_is_vllms_plain_base(result):
    assert result["alpha0"] == result["plain_base"]


def test_a_malformed_request_recipe_is_refused(result):
    assert result["refused"] is not None and "latent_merge.alpha" in result["refused"]
