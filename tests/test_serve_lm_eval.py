"""`lmn serve` as lm-eval's `local-completions` uses it: raw prompts, token ids, echo with prompt logprobs.

lm-eval 0.4.13 (its `api` extra) against a real server over loopback, on a local multiple-choice task
(`dataset_path: json`, `data_files` in tmp_path): the base alone gives lm-eval's own `hf` model's
per-choice loglikelihoods; a merged system scored with `merge_from` at the context's last token gives an
independent teacher-forced hook reference; a `last` system without it is refused naming `echo`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before datasets is imported by lm-eval
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lm_eval  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402
from lm_eval.models.openai_completions import LocalCompletionsAPI  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval_tasks import write_task  # noqa: E402
from reference import hidden_states, merged_logits  # noqa: E402

from latent_merge_nnsight.serve import start_server  # noqa: E402
from latent_merge_nnsight.systems.loaded import load_system  # noqa: E402
from latent_merge_nnsight.zoo import zoo_path  # noqa: E402

SYSTEMS = Path(__file__).resolve().parents[1] / "examples" / "systems"
MC = [
    {"question": "Compute 2+3.", "choices": ["5", "6", "23"], "label": 0},
    {"question": "Compute 7+1.", "choices": ["8", "9"], "label": 0},
    {"question": "a b c", "choices": ["d", "e f"], "label": 0},
]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tasks")
    write_task(root, "serve_mc", MC, "multiple_choice")
    return root


def per_choice(samples: list[dict]) -> list[list[float]]:
    """Per document (by id), each choice's loglikelihood."""
    return [[float(r[0][0]) for r in s["resps"]] for s in sorted(samples, key=lambda s: s["doc_id"])]


@pytest.fixture(scope="module")
def hf_reference(tasks):
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={zoo_path('toy-base')},device=cpu,dtype=float32",
        tasks=["serve_mc"],
        task_manager=TaskManager(include_path=str(tasks)),
        log_samples=True,
    )
    return per_choice(out["samples"]["serve_mc"])


def test_lm_eval_cli_local_completions_on_the_served_base_gives_hf_numbers(tasks, hf_reference, tmp_path):
    url, stop = start_server(SYSTEMS / "toy-base.yaml")
    try:
        cmd = [
            str(Path(sys.executable).with_name("lm_eval")),
            "--model", "local-completions",
            "--model_args", f"model=toy-base,base_url={url}/completions,max_retries=1",
            "--tasks", "serve_mc", "--include_path", str(tasks),
            "--output_path", str(tmp_path / "out"), "--log_samples",
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    finally:
        stop()
    assert done.returncode == 0, done.stderr[-3000:]
    assert "remote tokenizer" in done.stderr.lower()  # it found /tokenizer_info and /tokenize
    (samples,) = (tmp_path / "out").rglob("samples_serve_mc_*.jsonl")
    got = per_choice([json.loads(line) for line in samples.read_text().splitlines()])
    assert [len(d) for d in got] == [len(d) for d in hf_reference]
    for doc, ref in zip(got, hf_reference, strict=True):
        assert doc == pytest.approx(ref, abs=1e-4)


@register_model("lmn-test-merge-from")
class MergeFromCompletions(LocalCompletionsAPI):
    """lm-eval's `local-completions`, adding `latent_merge.merge_from` (the context's last token) to each
    loglikelihood request (batch size 1, no concurrency: each request is one (context, continuation))."""

    def batch_loglikelihood_requests(self, chunks):
        inputs, ctxlens, keys = super().batch_loglikelihood_requests(chunks)
        self.sent_ctxlens = ctxlens
        return inputs, ctxlens, keys

    def _create_payload(self, messages, generate=False, **kwargs):
        payload = super()._create_payload(messages, generate=generate, **kwargs)
        if not generate:
            (ctxlen,) = self.sent_ctxlens
            payload["vllm_xargs"] = {"latent_merge": json.dumps({"merge_from": ctxlen - 1})}
        return payload


def hook_reference(system, context: str, continuation: str) -> float:
    """The continuation's loglikelihood, teacher-forced, mixed by plain hooks at the context's last token
    and at every continuation token (where generation from the context mixes)."""
    tok = AutoTokenizer.from_pretrained(zoo_path("toy-base"))
    ctx, cont = tok(context)["input_ids"], tok(continuation)["input_ids"]
    ids = torch.tensor([ctx + cont])
    mask = torch.ones_like(ids)
    recipe = system.config.recipe
    ((layer, alpha),) = recipe.layer_alphas(6).items()  # the toy pair has 6 blocks; one merged layer
    base, source = (AutoModelForCausalLM.from_pretrained(zoo_path(m)) for m in ("toy-base", "toy-reasoner"))
    src = hidden_states(source, ids, mask, layer, recipe.site)
    chosen = list(range(len(ctx) - 1, ids.shape[1]))
    merges = {layer: (recipe.op, [src], alpha, {})}
    logits = merged_logits(base, ids, mask, merges, recipe.site, positions=chosen)
    logp = torch.log_softmax(logits[0].float(), dim=-1)
    return float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def test_merged_system_scored_from_merge_from_equals_a_hook_reference(tasks, hf_reference):
    system = load_system(SYSTEMS / "toy-latent-slerp.yaml")
    url, stop = start_server(system)
    try:
        out = lm_eval.simple_evaluate(
            model="lmn-test-merge-from",
            model_args=f"model=toy-latent-slerp,base_url={url}/completions,max_retries=1",
            tasks=["serve_mc"],
            task_manager=TaskManager(include_path=str(tasks)),
            log_samples=True,
        )
    finally:
        stop()
    samples = sorted(out["samples"]["serve_mc"], key=lambda s: s["doc_id"])
    got = per_choice(samples)
    for doc, row in zip(got, MC, strict=True):
        want = [hook_reference(system, f"Q: {row['question']}\nA:", f" {c}") for c in row["choices"]]
        assert doc == pytest.approx(want, abs=1e-4)
    flat = [x for d in got for x in d]
    base = [x for d in hf_reference for x in d]
    assert max(abs(a - b) for a, b in zip(flat, base, strict=True)) > 1e-3  # the merge is applied


def test_echo_on_a_last_system_without_merge_from_is_refused_naming_echo():
    url, stop = start_server(SYSTEMS / "toy-latent-slerp.yaml")
    try:
        body = {"model": "toy-latent-slerp", "prompt": "Q: 1+1\nA: 2", "echo": True, "max_tokens": 1}
        r = httpx.post(f"{url}/completions", json=body | {"logprobs": 1}, timeout=60)
        ok = httpx.post(
            f"{url}/completions", json=body | {"logprobs": 1, "latent_merge": {"merge_from": 8}}, timeout=60
        )
    finally:
        stop()
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo"
    assert "merge_from" in r.json()["error"]["message"] and "base" in r.json()["error"]["message"]
    assert ok.status_code == 200
    lp = ok.json()["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert len(lp["tokens"]) == ok.json()["usage"]["prompt_tokens"] + 1
