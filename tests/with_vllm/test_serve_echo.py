"""`vllm serve` of the toy export (lerp on layers 2 and 3, positions "last") answering echo requests as
lm-eval's `local-completions` sends them (token ids, echo, logprobs 1, max_tokens 1): with `merge_from` at
the context's last token the prompt logprobs are an independent hook reference's, per-request alphas 0
and 1 differ, alpha 0 is the base; without `merge_from` the request is a 400 that says why."""

import json

import httpx
import pytest
import torch
from reference import hidden_states, merged_logits
from serve_helpers import LAYERS, served
from transformers import AutoModelForCausalLM, AutoTokenizer

from latent_merge_nnsight.zoo import zoo_path

CONTEXT, CONTINUATION = "Q: Compute 2+3.\nA:", " 5"


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    with served(tmp_path_factory.mktemp("serve-echo")) as (port, _, _):
        yield f"http://127.0.0.1:{port}/v1/completions"


@pytest.fixture(scope="module")
def pair():
    tok = AutoTokenizer.from_pretrained(zoo_path("toy-base"))
    ctx, cont = tok(CONTEXT)["input_ids"], tok(CONTINUATION)["input_ids"]
    models = [AutoModelForCausalLM.from_pretrained(zoo_path(m)) for m in ("toy-base", "toy-reasoner")]
    return ctx, cont, models


def echo(url: str, ids: list[int], latent_merge: dict | None) -> httpx.Response:
    body = {"model": "toy-merge", "prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 1}
    body |= {"temperature": 0, "seed": 1234}  # what lm-eval's local-completions sends
    if latent_merge is not None:
        body["vllm_xargs"] = {"latent_merge": json.dumps(latent_merge)}
    return httpx.post(url, json=body, timeout=300)


def reference(pair, alpha: float) -> list[float]:
    """Each prompt token's logprob (from the second on), teacher-forced, lerp-mixed by plain hooks at the
    context's last token and every continuation token."""
    ctx, cont, (base, source) = pair
    ids = torch.tensor([ctx + cont])
    mask = torch.ones_like(ids)
    merges = {
        layer: ("lerp", [hidden_states(source, ids, mask, layer, "pre")], alpha, {}) for layer in LAYERS
    }
    chosen = list(range(len(ctx) - 1, ids.shape[1]))
    logits = merged_logits(base, ids, mask, merges, "pre", positions=chosen)
    logp = torch.log_softmax(logits[0].float(), dim=-1)
    return [float(logp[i - 1, t]) for i, t in enumerate(ids[0].tolist()) if i > 0]


def test_echo_without_merge_from_on_a_last_export_is_a_400_that_says_why(url, pair):
    ctx, cont, _ = pair
    r = echo(url, ctx + cont, None)
    assert r.status_code == 400, r.text
    message = json.dumps(r.json())
    assert "merge_from" in message and "base" in message
    r = echo(url, ctx + cont, {"alpha": 1.0})  # per-request alphas alone do not say where the context ends
    assert r.status_code == 400 and "merge_from" in json.dumps(r.json())


def test_echo_with_merge_from_scores_as_generation_merges(url, pair):
    ctx, cont, _ = pair
    got = {}
    for alpha in (0.0, 0.5, 1.0):
        merge = {"merge_from": len(ctx) - 1} | ({"alpha": alpha} if alpha != 0.5 else {})
        r = echo(url, ctx + cont, merge)  # alpha 0.5: the export's own, merge_from alone
        assert r.status_code == 200, r.text
        lp = r.json()["choices"][0]["logprobs"]
        assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == len(ctx + cont) + 1
        got[alpha] = lp["token_logprobs"][1 : len(ctx + cont)]
        assert got[alpha] == pytest.approx(reference(pair, alpha), abs=1e-3)
    continuation = slice(len(ctx) - 1, None)
    assert max(abs(a - b) for a, b in zip(got[0.0][continuation], got[1.0][continuation], strict=True)) > 1e-2
    assert got[0.0][: len(ctx) - 1] == pytest.approx(got[1.0][: len(ctx) - 1], abs=1e-4)  # the context: base
