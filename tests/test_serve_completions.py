"""`lmn serve`'s `/v1/completions` on the toy base: raw prompts (never chat-templated), token-id and list
prompts, echo in the legacy logprobs schema, the tokenizer routes, and parameters it does not implement."""

from pathlib import Path

import httpx
import pytest
import torch
from test_serve import ReverseSystem
from transformers import AutoModelForCausalLM

import latent_merge_nnsight as lmn
from latent_merge_nnsight.serve import start_server
from latent_merge_nnsight.systems.loaded import load_system
from latent_merge_nnsight.zoo import zoo_path

SYSTEMS = Path(__file__).resolve().parents[1] / "examples" / "systems"
TEMPLATED = "<|user|>Compute 76+34.<|end|><|assistant|>"


@pytest.fixture(scope="module")
def base():
    system = load_system(SYSTEMS / "toy-base.yaml")
    url, stop = start_server(system)
    yield system, url
    stop()


def complete(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/completions", json={"model": "toy-base", **body}, timeout=120)


def test_a_raw_prompt_runs_as_its_tokens_without_the_chat_template(base):
    system, url = base
    ids = system.tokenizer(TEMPLATED)["input_ids"]
    r = complete(url, prompt=TEMPLATED, max_tokens=12, temperature=0).json()
    direct = lmn.generate(system.base, None, input_ids=torch.tensor([ids]), max_new_tokens=12)
    assert r["choices"][0]["text"] == direct.texts[0]
    assert r["usage"]["prompt_tokens"] == len(ids)
    # the tokens the model saw: echo lists them, and they are the tokenizer's encoding of the text
    echoed = complete(url, prompt=TEMPLATED, max_tokens=0, echo=True, logprobs=0).json()
    assert echoed["choices"][0]["logprobs"]["tokens"] == [system.tokenizer.decode([i]) for i in ids]
    assert echoed["choices"][0]["text"] == TEMPLATED


def test_the_context_check_counts_the_tokens_that_run(base):
    system, url = base
    context = system.context_length
    text = "ab" * context
    fits = system.tokenizer.decode(system.tokenizer(text)["input_ids"][: context - 1])
    assert len(system.tokenizer(fits)["input_ids"]) == context - 1
    assert complete(url, prompt=fits, max_tokens=1).status_code == 200
    over = complete(url, prompt=fits, max_tokens=2)
    assert over.status_code == 400 and over.json()["error"]["param"] == "max_tokens"
    assert over.json()["error"]["code"] == "context_length_exceeded"
    full = fits + "a"
    assert complete(url, prompt=full, max_tokens=0, echo=True).status_code == 200  # scoring: no room needed
    assert complete(url, prompt=full, max_tokens=1).status_code == 400


def test_token_id_and_list_prompts_answer_as_their_text(base):
    system, url = base
    texts = ["Compute 2+3.", "Compute 76+34."]
    ids = [system.tokenizer(t)["input_ids"] for t in texts]
    by_text = [
        complete(url, prompt=t, max_tokens=8, temperature=0).json()["choices"][0]["text"] for t in texts
    ]
    assert (
        complete(url, prompt=ids[0], max_tokens=8, temperature=0).json()["choices"][0]["text"] == by_text[0]
    )
    for prompt in (texts, ids):
        r = complete(url, prompt=prompt, max_tokens=8, temperature=0).json()
        assert [c["index"] for c in r["choices"]] == [0, 1]
        assert [c["text"] for c in r["choices"]] == by_text
    echo_text = complete(url, prompt=texts, max_tokens=1, echo=True, logprobs=2).json()["choices"]
    echo_ids = complete(url, prompt=ids, max_tokens=1, echo=True, logprobs=2).json()["choices"]
    assert [c["logprobs"] for c in echo_text] == [c["logprobs"] for c in echo_ids]
    bad = complete(url, prompt=[5, 10**7], max_tokens=1)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"


def test_echo_gives_the_prompt_logprobs_in_the_legacy_schema(base):
    system, url = base
    text = "Compute 2+3."
    ids = system.tokenizer(text)["input_ids"]
    hf = AutoModelForCausalLM.from_pretrained(zoo_path("toy-base"))  # plain transformers, no package code
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    want = [None] + [float(logp[i - 1, t]) for i, t in enumerate(ids) if i > 0]
    for max_tokens in (0, 1):
        r = complete(url, prompt=text, max_tokens=max_tokens, echo=True, logprobs=3, temperature=0).json()
        lp = r["choices"][0]["logprobs"]
        n = len(ids) + max_tokens
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["token_logprobs"][1 : len(ids)] == pytest.approx(want[1:], abs=1e-4)
        assert all(len(t) == 3 for t in lp["top_logprobs"][1:])
        assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
        assert r["usage"] == {"prompt_tokens": len(ids), "completion_tokens": max_tokens,
                              "total_tokens": len(ids) + max_tokens}  # fmt: skip
        if max_tokens:  # greedy: the new token is the last position's most likely one
            new = int(logp[-1].argmax())
            assert lp["tokens"][-1] == system.tokenizer.decode([new])
            assert lp["token_logprobs"][-1] == pytest.approx(float(logp[-1, new]), abs=1e-4)
            assert r["choices"][0]["text"].startswith(text)
    many = complete(url, prompt=text, max_tokens=2, echo=True)
    assert many.status_code == 400 and many.json()["error"]["param"] == "max_tokens"
    none = complete(url, prompt=text, max_tokens=0)
    assert none.status_code == 400 and none.json()["error"]["param"] == "max_tokens"


def test_tokenizer_routes_answer_as_vllms(base):
    system, url = base
    root = url.removesuffix("/v1")
    info = httpx.get(f"{root}/tokenizer_info").json()
    assert info["eos_token"] == system.tokenizer.eos_token
    assert info["chat_template"] == system.tokenizer.chat_template
    r = httpx.post(f"{root}/tokenize", json={"prompt": TEMPLATED, "add_special_tokens": False}).json()
    assert r["tokens"] == system.tokenizer(TEMPLATED, add_special_tokens=False)["input_ids"]
    assert r["count"] == len(r["tokens"])
    assert httpx.post(f"{root}/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == TEMPLATED


def test_the_tokenizer_routes_need_the_key_too():
    system = load_system(SYSTEMS / "toy-base.yaml")
    url, stop = start_server(system, api_key="k")
    try:
        root = url.removesuffix("/v1")
        assert httpx.get(f"{root}/tokenizer_info").status_code == 401
        assert httpx.get(f"{root}/tokenizer_info", headers={"Authorization": "Bearer k"}).status_code == 200
        assert httpx.get(f"{root}/health").status_code == 200
    finally:
        stop()


@pytest.fixture(scope="module")
def fake():
    url, stop = start_server(ReverseSystem())
    yield url
    stop()


@pytest.mark.parametrize(
    "name, value",
    [
        ("response_format", {"type": "json_object"}),
        ("logit_bias", {"5": 10}),
        ("frequency_penalty", 0.5),
        ("presence_penalty", -0.5),
        ("best_of", 3),
        ("tool_choice", "auto"),
        ("guided_json", {"type": "object"}),
        ("latent_merge", {"merge_from": 1}),  # on chat: it has no prompt to score
    ],
)
@pytest.mark.parametrize("route", ["completions", "chat/completions"])
def test_parameters_the_server_does_not_implement_are_a_400_naming_them(fake, name, value, route):
    body = {"model": "reverser", name: value}
    body |= (
        {"prompt": "abc"} if route == "completions" else {"messages": [{"role": "user", "content": "abc"}]}
    )
    if route == "completions" and name == "latent_merge":
        expected = "latent_merge"  # merge_from without echo
    else:
        expected = name
    r = httpx.post(f"{fake}/{route}", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == expected and name in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "name, value",
    [
        ("frequency_penalty", 0),
        ("presence_penalty", 0.0),
        ("logit_bias", {}),
        ("response_format", {"type": "text"}),
        ("user", "someone"),
        ("logit_bias", None),
    ],
)
def test_neutral_values_of_unimplemented_parameters_are_accepted(fake, name, value):
    r = httpx.post(
        f"{fake}/completions", json={"model": "reverser", "prompt": "abc", name: value}, timeout=30
    )
    assert r.status_code == 200, r.text


def test_latent_merge_argument_forms(fake):
    """merge_from in vllm_xargs (JSON text) or the body; other keys are vllm serve's per-request recipes."""
    base = {"model": "reverser", "prompt": "abc", "max_tokens": 1}
    cases = [
        ({"vllm_xargs": {"latent_merge": '{"alpha": 0.3}'}}, "latent_merge"),
        ({"vllm_xargs": {"other": 1}}, "vllm_xargs"),
        ({"latent_merge": "{not json"}, "latent_merge"),
        ({"latent_merge": {"merge_from": -1}, "echo": True}, "latent_merge"),
        (
            {"latent_merge": {"merge_from": 1}, "vllm_xargs": {"latent_merge": "{}"}, "echo": True},
            "latent_merge",
        ),
    ]
    for extra, param in cases:
        r = httpx.post(f"{fake}/completions", json=base | extra, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (extra, r.text)


def test_a_batch_mixing_token_ids_chats_and_text_answers_as_each_alone(base):
    """The batcher may put a chat request and token-id prompts in one `complete` call."""
    system, _ = base
    chat = [{"role": "user", "content": "Compute 2+3."}]
    ids = system.tokenizer("Compute 76+34.")["input_ids"]
    together = system.complete([chat, ids, "a b c"], max_new_tokens=6)
    alone = [system.complete([p], max_new_tokens=6)[0] for p in (chat, ids, "a b c")]
    assert [c.text for c in together] == [c.text for c in alone]
    assert [c.prompt_tokens for c in together] == [
        system.count_prompt_tokens(p) for p in (chat, ids, "a b c")
    ]
