"""`lmn serve` speaks vLLM's per-request protocol: `latent_merge` in `vllm_xargs` (JSON text or an
object) or in the body sets a request's own alphas (and op); requests with different recipes share a
batch (one row each) and answer as each would alone; bad forms are 400s naming the field. The served
system is the toy pair slerped at layer 3 (`examples/systems/toy-latent-slerp.yaml`), run as a real
`lmn serve` process whose decode steps are logged (`serve_steps.py`: rows per step)."""

import asyncio
import json
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest
import torch
from serve_load import start_serve

import latent_merge_nnsight as lmn
from latent_merge_nnsight.models import hf_module
from latent_merge_nnsight.systems.batching import Batcher, Completion

SYSTEMS = Path(__file__).resolve().parents[1] / "examples" / "systems"
STEPS = Path(__file__).resolve().parent / "serve_steps.py"
MODEL = "toy-latent-slerp"
PROMPTS = ["Compute 76+34.", "The list: a, b, c,"]  # raw completions prompts whose answers move with alpha
N_NEW = 24
# (the request's latent_merge, the recipe it must run: the system's site and positions, its op and alphas)
SETUPS = [
    ({"alpha": 0.0}, lmn.Recipe(op="slerp", layers={3: 0.0})),
    ({"alpha": 0.5}, lmn.Recipe(op="slerp", layers={3: 0.5})),
    ({"layers": {"3": 0.75}}, lmn.Recipe(op="slerp", layers={3: 0.75})),
    ({"alpha": 1.0}, lmn.Recipe(op="slerp", layers={3: 1.0})),
    ({"alpha": 0.7, "op": "lerp"}, lmn.Recipe(op="lerp", layers={3: 0.7})),
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    log = tmp_path_factory.mktemp("steps") / "steps.log"
    launcher = [sys.executable, str(STEPS), str(log), "0"]
    flags = ("--max-batch-size", "16", "--max-wait-ms", "1500")
    with start_serve(SYSTEMS / f"{MODEL}.yaml", *flags, launcher=launcher, timeout=600) as (proc, url):
        yield url, log


@pytest.fixture(scope="module")
def toy():
    return lmn.load("toy-base"), lmn.load("toy-reasoner", up_to_layer=3)


def complete(url: str, prompt: str, **extra) -> httpx.Response:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": N_NEW, "temperature": 0} | extra
    return httpx.post(f"{url}/completions", json=body, timeout=120)


def text(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_per_request_alpha_zero_equals_the_base_systems_answer(served, toy):
    url, _ = served
    base, _ = toy
    alone = lmn.generate(base, None, PROMPTS, max_new_tokens=N_NEW, chat=False).texts  # the base system
    merged = [text(complete(url, p)) for p in PROMPTS]
    assert merged != alone  # the system's own merge changes these answers
    as_text = [text(complete(url, p, vllm_xargs={"latent_merge": '{"alpha": 0}'})) for p in PROMPTS]
    as_object = [text(complete(url, p, latent_merge={"alpha": 0})) for p in PROMPTS]
    assert as_text == as_object == alone
    # chat, through the openai SDK's extra_body, as a vLLM client sends it
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": PROMPTS[0]}]
    reply = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=N_NEW,
        temperature=0,
        extra_body={"vllm_xargs": {"latent_merge": json.dumps({"layers": {"3": 0}})}},
    )
    assert (
        reply.choices[0].message.content
        == lmn.generate(base, None, [messages], max_new_tokens=N_NEW).texts[0]
    )


def test_concurrent_requests_with_different_recipes_share_a_batch_and_equal_their_sequential_answers(
    served, toy
):
    url, log = served
    base, ft = toy
    jobs = [(p, lm, recipe) for p in PROMPTS for lm, recipe in SETUPS]
    sequential = [text(complete(url, p, latent_merge=lm)) for p, lm, _ in jobs]
    # the recipe each request names, run alone in this process (independent of the server's batching)
    direct = [
        lmn.generate(base, ft, [p], recipe, max_new_tokens=N_NEW, chat=False).texts[0]
        for p, _, recipe in jobs
    ]
    assert sequential == direct
    assert len(set(sequential)) >= 6  # the recipes do change the answers
    log.write_text("")
    concurrent: list[str | None] = [None] * len(jobs)

    def send(i: int) -> None:
        p, lm, _ = jobs[i]
        concurrent[i] = text(complete(url, p, vllm_xargs={"latent_merge": json.dumps(lm)}))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert concurrent == sequential
    rows_per_step = [int(line.split()[1]) for line in log.read_text().splitlines()]
    assert max(rows_per_step) == len(jobs)  # every request a row of one batch (its first step)


@pytest.mark.parametrize(
    "latent_merge, says",
    [
        (
            {"layers": {"5": 0.5}},
            "latent_merge.layers [5] are not merged by this system; this system merges layers [3]",
        ),
        ({"alpha": 1.5}, "latent_merge.layers[3]=1.5"),
        ({"alpha": -0.5, "allow_extrapolation": "yes"}, "latent_merge.allow_extrapolation"),
        ({"alpha": 0.5, "op": "delta"}, "latent_merge.op='delta' cannot run on this live-source system"),
        ({"alpha": 0.5, "op": "no-such-op"}, "no-such-op"),
        ({"alpha": "x"}, "latent_merge.alpha='x' must be a finite number"),
        ({"alpha": 0.5, "layers": {"3": 0.5}}, "not both"),
        ({"op": "lerp"}, "give alpha"),
        ({"beta": 0.5}, "unknown keys ['beta']"),
        ('{"alpha": 0.5', "not valid JSON"),
        ({"alpha": 0.5, "merge_from": 2}, "needs echo=true"),
    ],
)
def test_bad_per_request_recipes_are_400s_naming_the_field(served, latent_merge, says):
    url, _ = served
    for where in ("body", "vllm_xargs"):
        value = latent_merge if where == "body" else {"latent_merge": latent_merge}
        r = complete(
            url, PROMPTS[0], max_tokens=2, **{"latent_merge" if where == "body" else "vllm_xargs": value}
        )
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "latent_merge" and says in error["message"], error


def test_an_alpha_outside_the_range_runs_with_allow_extrapolation(served, toy):
    url, _ = served
    base, ft = toy
    r = complete(url, PROMPTS[1], latent_merge={"alpha": 1.25, "allow_extrapolation": True})
    recipe = lmn.Recipe(op="slerp", layers={3: 1.25}, allow_extrapolation=True)
    assert text(r) == lmn.generate(base, ft, [PROMPTS[1]], recipe, max_new_tokens=N_NEW, chat=False).texts[0]


class _Recorder:
    """A stand-in system that records each `complete` call's prompts and recipes."""

    name = "recorder"

    def __init__(self) -> None:
        self.calls: list[tuple[list, list | None]] = []

    def complete(self, prompts, recipes=None, **params):
        self.calls.append((list(prompts), recipes))
        return [Completion(str(p), "length", 1, 1) for p in prompts]


def test_the_batcher_runs_requests_with_different_recipes_as_one_call_with_a_recipe_per_row():
    system = _Recorder()
    recipes = [lmn.Recipe(op="slerp", layers={3: 0.2}), None, lmn.Recipe(op="lerp", layers={3: 0.9})]

    async def main():
        batcher = Batcher(system, max_batch_size=8, max_wait_ms=200)
        batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(f"p{i}", {}, r) for i, r in enumerate(recipes)))
        finally:
            await batcher.close()

    out = asyncio.run(main())
    assert [c.text for c in out] == ["p0", "p1", "p2"]
    assert system.calls == [(["p0", "p1", "p2"], recipes)]


def _base_logprobs(base, ids: list[int]) -> list[float]:
    """log p(token i | tokens before it) under the base alone, a plain forward (i >= 1)."""
    with torch.no_grad():
        logits = hf_module(base)(torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist()


def test_echo_and_logprobs_score_under_the_requests_own_alphas(served, toy):
    url, _ = served
    base, _ = toy
    prompt = PROMPTS[1]
    ids = base.tokenizer(prompt)["input_ids"]
    reference = _base_logprobs(base, ids)
    scored = {}
    for name, lm in (("alpha 0", {"alpha": 0, "merge_from": 2}), ("system", {"merge_from": 2})):
        r = complete(url, prompt, max_tokens=0, echo=True, logprobs=0, latent_merge=lm)
        assert r.status_code == 200, r.text
        scored[name] = r.json()["choices"][0]["logprobs"]["token_logprobs"]
        assert scored[name][0] is None and len(scored[name]) == len(ids)
    assert max(abs(a - b) for a, b in zip(scored["alpha 0"][1:], reference, strict=True)) < 1e-4
    assert max(abs(a - b) for a, b in zip(scored["system"][1:], reference, strict=True)) > 1e-3
    # the logprobs of generated tokens, scored under the request's recipe (alpha 0: the base's)
    r = complete(url, prompt, logprobs=0, latent_merge={"alpha": 0}).json()["choices"][0]
    new = lmn.generate(base, None, [prompt], max_new_tokens=N_NEW, chat=False).tokens[0]
    assert r["text"] == base.tokenizer.decode(new, skip_special_tokens=True)
    expected = _base_logprobs(base, ids + new)[len(ids) - 1 :]
    assert max(abs(a - b) for a, b in zip(r["logprobs"]["token_logprobs"], expected, strict=True)) < 1e-4
