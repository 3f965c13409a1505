"""`lmn.score(..., engine="vllm")` and lm-eval's `latent-merge` model with `engine=vllm` give the fast
engine's numbers on the toy pair: per-token logprobs and greedy flags of multiple-choice rows (merged at
alpha 0.5 and 1, and the base alone), lm-eval's per-choice loglikelihoods and its `generate_until` texts
(local tasks, `dataset_path: json`)."""

import pytest
from lm_eval_tasks import generate_until_body, write_task
from vllm_helpers import run_driver

MC = [
    {"question": "Compute 2+3.", "choices": ["5", "6", "23"], "label": 0},
    {"question": "Name a color.", "choices": ["red", "a kind of blue"], "label": 0},
]
GEN = [{"question": "Compute 7+1."}, {"question": "Say hello."}]


def write_tasks(root):
    write_task(root, "vllm_score_mc", MC, "multiple_choice")
    write_task(root, "vllm_score_gen", GEN, "generate_until", generate_until_body(" 8", "\\n\\n"))


def test_score_and_lm_eval_on_vllm_equal_the_fast_engine(tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_tasks(tasks)
    result = run_driver("driver_score.py", str(tasks), out_dir=tmp_path, timeout=1200)
    scores = result["scores"]
    for name, got in scores.items():
        for fast, vllm in zip(got["fast"]["logprobs"], got["vllm"]["logprobs"], strict=True):
            assert vllm == pytest.approx(fast, abs=2e-3), name
        assert got["vllm"]["greedy"] == got["fast"]["greedy"], name
    flat = {name: [x for row in got["fast"]["logprobs"] for x in row] for name, got in scores.items()}
    for merged in ("slerp-last", "slerp-last-alpha1"):  # the merge reaches the numbers (the test can fail)
        assert max(abs(a - b) for a, b in zip(flat[merged], flat["base"], strict=True)) > 1e-2
    evals = result["lm_eval"]
    for fast, vllm in zip(evals["fast"]["mc"], evals["vllm"]["mc"], strict=True):
        assert vllm == pytest.approx(fast, abs=2e-3)
    assert evals["vllm"]["gen"] == evals["fast"]["gen"]
    assert all(isinstance(t, str) for t in evals["fast"]["gen"])
