"""lm-eval 0.4.13's own `local-completions` client against a real `vllm serve` of the toy export (lerp on
layers 2 and 3, alpha 0.5, positions "last") on loopback, on a local multiple-choice task
(`dataset_path: json`): sent through the `latent_merge` request argument with `merge_from` at the
context's last token, per-request alphas 0 and 1 give each choice the loglikelihood of an independent
teacher-forced hook reference (mixed at the context's last token and every continuation token), and
they differ; the plain client, which sends no `merge_from`, is refused with a 400 that says why."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before datasets is imported by lm-eval
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lm_eval  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402
from lm_eval.models.openai_completions import LocalCompletionsAPI  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval_tasks import write_task  # noqa: E402
from reference import hidden_states, merged_logits  # noqa: E402
from serve_helpers import LAYERS, served  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from vllm_helpers import vllm_env  # noqa: E402

from latent_merge_nnsight.zoo import zoo_path  # noqa: E402

MC = [
    {"question": "Compute 2+3.", "choices": ["5", "6", "23"], "label": 0},
    {"question": "Compute 7+1.", "choices": ["8", "9 or 10"], "label": 0},
]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tasks")
    write_task(root, "vllm_mc", MC, "multiple_choice")
    return root


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    with served(tmp_path_factory.mktemp("serve-lm-eval")) as (port, _, _):
        yield f"http://127.0.0.1:{port}/v1/completions"


class _MergeFrom(LocalCompletionsAPI):
    """lm-eval's `local-completions`, adding `latent_merge` = {merge_from: the context's last token,
    alpha: ALPHA} to each loglikelihood request (batch size 1: a request is one (context, continuation)),
    and keeping what it sent."""

    ALPHA = 0.0
    sent: list[tuple[list[int], int]] = []

    def batch_loglikelihood_requests(self, chunks):
        inputs, ctxlens, keys = super().batch_loglikelihood_requests(chunks)
        self.sent_ctxlens = ctxlens
        return inputs, ctxlens, keys

    def _create_payload(self, messages, generate=False, **kwargs):
        payload = super()._create_payload(messages, generate=generate, **kwargs)
        if not generate:
            ((ids,), (ctxlen,)) = messages, self.sent_ctxlens
            type(self).sent.append((list(ids), ctxlen))
            merge = {"merge_from": ctxlen - 1, "alpha": self.ALPHA}
            payload["vllm_xargs"] = {"latent_merge": json.dumps(merge)}
        return payload


@register_model("lmn-vllm-alpha0")
class _Alpha0(_MergeFrom):
    ALPHA = 0.0
    sent = []


@register_model("lmn-vllm-alpha1")
class _Alpha1(_MergeFrom):
    ALPHA = 1.0
    sent = []


def model_args(url: str) -> str:
    return f"model=toy-merge,base_url={url},tokenizer={zoo_path('toy-base')},max_retries=1"


def per_choice(samples: list[dict]) -> list[list[float]]:
    return [[float(r[0][0]) for r in s["resps"]] for s in sorted(samples, key=lambda s: s["doc_id"])]


def reference(ids: list[int], ctxlen: int, alpha: float) -> float:
    """The continuation's loglikelihood, teacher-forced, lerp-mixed by plain hooks on LAYERS at the
    context's last token and every continuation token."""
    base, source = (AutoModelForCausalLM.from_pretrained(zoo_path(m)) for m in ("toy-base", "toy-reasoner"))
    x = torch.tensor([ids])
    mask = torch.ones_like(x)
    merges = {layer: ("lerp", [hidden_states(source, x, mask, layer, "pre")], alpha, {}) for layer in LAYERS}
    logits = merged_logits(base, x, mask, merges, "pre", positions=list(range(ctxlen - 1, len(ids))))
    logp = torch.log_softmax(logits[0].double(), dim=-1)
    return float(sum(logp[i - 1, ids[i]] for i in range(ctxlen, len(ids))))


def test_lm_eval_local_completions_with_merge_from_scores_each_alpha_as_the_reference(url, tasks):
    got = {}
    for alpha, name, cls in ((0.0, "lmn-vllm-alpha0", _Alpha0), (1.0, "lmn-vllm-alpha1", _Alpha1)):
        out = lm_eval.simple_evaluate(
            model=name,
            model_args=model_args(url),
            tasks=["vllm_mc"],
            task_manager=TaskManager(include_path=str(tasks)),
            log_samples=True,
        )
        got[alpha] = per_choice(out["samples"]["vllm_mc"])
        assert [len(d) for d in got[alpha]] == [len(r["choices"]) for r in MC]
        flat = sorted(x for d in got[alpha] for x in d)
        want = sorted(reference(ids, ctxlen, alpha) for ids, ctxlen in cls.sent)
        assert len(cls.sent) == len(flat)
        assert flat == pytest.approx(want, abs=2e-3)
    a0 = [x for d in got[0.0] for x in d]
    a1 = [x for d in got[1.0] for x in d]
    assert max(abs(a - b) for a, b in zip(a0, a1, strict=True)) > 1e-2  # the merge reaches the scores


def test_plain_local_completions_without_merge_from_is_refused_with_a_400_that_says_why(url, tasks, tmp_path):
    cmd = [
        str(Path(sys.executable).with_name("lm_eval")),
        "--model", "local-completions", "--model_args", model_args(url),
        "--tasks", "vllm_mc", "--include_path", str(tasks), "--output_path", str(tmp_path / "out"),
    ]  # fmt: skip
    env = vllm_env() | {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode != 0
    assert "merge_from" in done.stderr and "base" in done.stderr, done.stderr[-3000:]
    assert not list((tmp_path / "out").rglob("results_*.json"))  # nothing answered
