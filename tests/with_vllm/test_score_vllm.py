"""`lmn.score(..., engine="vllm")` and lm-eval's `latent-merge` model with `engine=vllm` give the fast
engine's numbers on the toy pair: per-token logprobs and greedy flags of multiple-choice rows (merged at
alpha 0.5 and 1, and the base alone), lm-eval's per-choice loglikelihoods and its `generate_until` texts
(local tasks, `dataset_path: json`)."""

import json

import pytest
from vllm_helpers import run_driver

MC = [
    {"question": "Compute 2+3.", "choices": ["5", "6", "23"], "label": 0},
    {"question": "Name a color.", "choices": ["red", "a kind of blue"], "label": 0},
]
GEN = [{"question": "Compute 7+1."}, {"question": "Say hello."}]


def write_tasks(root):
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC))
    (root / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GEN))
    common = "dataset_path: json\ntest_split: test\n"
    (root / "mc.yaml").write_text(
        f"task: vllm_score_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'mc.jsonl'}\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Q: {{question}}\\nA:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    (root / "gen.yaml").write_text(
        f"task: vllm_score_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'gen.jsonl'}\n"
        "output_type: generate_until\n"
        'doc_to_text: "Q: {{question}}\\nA:"\ndoc_to_target: " 8"\n'
        'generation_kwargs:\n  until: ["\\n\\n"]\n  max_gen_toks: 12\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n"
    )


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
