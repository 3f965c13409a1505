"""`latent-merge/<system.yaml>` in Inspect AI: a local eval on the toy pair runs through the provider.

The reference is the system's own `generate` on the same chats (the provider must hand Inspect exactly
those answers, with Inspect's sampling settings applied), and a hand-checked score: the toy pair answers
these held-out sums correctly (README of the zoo: the base is 0.99 on math).
"""

from pathlib import Path

import pytest
from inspect_ai import Task
from inspect_ai import eval as inspect_eval
from inspect_ai.dataset import Sample
from inspect_ai.scorer import includes
from inspect_ai.solver import generate

import latent_merge_nnsight.evaluation.inspect_provider as provider
from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.evaluation.tasks import make_eval_set
from latent_merge_nnsight.systems import load_system

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = ROOT / "examples" / "systems"


def toy_task() -> Task:
    problems = make_eval_set("math", 6, seed=3)
    samples = [Sample(input=p.prompt, target=f"Answer: {p.answer}") for p in problems]
    return Task(dataset=samples, solver=generate(), scorer=includes())


@pytest.mark.parametrize("system", ["toy-base.yaml", "toy-latent-slerp.yaml"])
def test_a_local_inspect_eval_runs_through_the_provider(tmp_path, system):
    path = SYSTEMS / system
    [log] = inspect_eval(
        toy_task(), model=f"latent-merge/{path}", log_dir=str(tmp_path), display="none",
        max_tokens=16, temperature=0.0, model_args={"max_batch_size": 4},
    )  # fmt: skip
    assert log.status == "success", log.error
    samples = sorted(log.samples, key=lambda s: s.id)
    chats = [[{"role": "user", "content": s.input}] for s in samples]
    want = load_system(path).generate(chats, max_new_tokens=16, temperature=0.0)
    assert [s.output.completion for s in samples] == want
    assert all(s.output.stop_reason in ("stop", "max_tokens") for s in samples)
    accuracy = log.results.scores[0].metrics["accuracy"].value
    assert accuracy == sum(s.target in text for s, text in zip(samples, want, strict=True)) / len(samples)
    if system == "toy-base.yaml":
        assert accuracy >= 0.8  # the base does 2-digit sums


def test_the_package_declares_the_provider_to_inspect():
    text = (ROOT / "pyproject.toml").read_text()
    assert f'[project.entry-points.inspect_ai]\nlatent_merge_nnsight = "{provider.__name__}"\n' in text


def test_unknown_model_args_are_refused_before_loading():
    with pytest.raises(LatentMergeError, match=r"model args \['colour'\] are unknown"):
        provider.LatentMergeAPI(str(SYSTEMS / "toy-base.yaml"), colour="red")
