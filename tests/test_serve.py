"""`lmn serve`: OpenAI-compatible HTTP on 127.0.0.1, error bodies, batching, streaming, real models."""

import json
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.serve import start_server
from latent_merge_nnsight.systems.batching import Completion

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "systems"


class ReverseSystem:
    """A stand-in system: answers with the last user message reversed, cut to `max_new_tokens` characters.

    A prompt's token count is its characters plus 2 per message; a message containing FAIL makes the whole
    batch raise, one containing LOSE makes it return nothing. Every `complete` call is recorded.
    """

    name = "reverser"

    def __init__(self, context_length: int = 200) -> None:
        self.context_length = context_length
        self.calls: list[tuple[list, dict]] = []
        self.threads: set[str] = set()

    def count_prompt_tokens(self, chat):
        if isinstance(chat, str):
            return len(chat)
        return sum(len(m["content"]) + 2 for m in chat)

    def complete(self, prompts, **params):
        self.calls.append((list(prompts), dict(params)))
        self.threads.add(threading.current_thread().name)
        texts = [p if isinstance(p, str) else "".join(m["content"] for m in p) for p in prompts]
        if any("FAIL" in t for t in texts):
            raise RuntimeError("the model fell over")
        if any("LOSE" in t for t in texts):
            return []  # a broken system: no completion for the batch
        limit = params.get("max_new_tokens", 16)
        out = []
        for chat in prompts:
            full = (chat if isinstance(chat, str) else chat[-1]["content"])[::-1]
            text = full[:limit]
            reason = "length" if len(full) > limit else "stop"
            out.append(Completion(text, reason, self.count_prompt_tokens(chat), len(text)))
        return out


def expected(text: str, limit: int = 16) -> str:
    return "".join(reversed(text))[:limit]


@pytest.fixture(autouse=True)
def _no_server_key_from_the_environment(monkeypatch):
    monkeypatch.delenv("LMN_API_KEY", raising=False)


@pytest.fixture(scope="module")
def served():
    system = ReverseSystem()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("LMN_API_KEY", raising=False)
        url, stop = start_server(system, max_batch_size=4, max_wait_ms=20)
    yield system, url
    stop()


@pytest.fixture
def fake(served):
    """One server for the module; each test starts with an empty call record."""
    served[0].calls.clear()
    return served


def post(url: str, body, *, timeout: float = 30, headers: dict | None = None) -> httpx.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} | (headers or {})
    return httpx.post(f"{url}/chat/completions", content=data, headers=headers, timeout=timeout)


def good(content: str = "hello") -> dict:
    return {"model": "reverser", "messages": [{"role": "user", "content": content}]}


# --------------------------------------------------------------------------------------- basics


def test_start_server_binds_loopback_and_lists_the_model(fake):
    system, url = fake
    assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["reverser"]
    assert client.models.retrieve("reverser").id == "reverser"


def test_chat_completion_through_openai_sdk_returns_answer_and_usage(fake):
    system, url = fake
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "latent merging"}]
    reply = client.chat.completions.create(model="reverser", messages=messages)
    assert reply.choices[0].message.content == expected("latent merging")
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "stop"
    prompt_tokens = len("be brief") + 2 + len("latent merging") + 2
    assert reply.usage.prompt_tokens == prompt_tokens
    assert reply.usage.completion_tokens == len("latent merging")
    assert reply.usage.total_tokens == prompt_tokens + len("latent merging")
    assert reply.model == "reverser" and reply.object == "chat.completion"
    assert system.calls[-1][0] == [messages]  # the messages reach the system unchanged


def test_request_parameters_become_sampling_overrides(fake):
    system, url = fake
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    r = client.chat.completions.create(
        model="reverser",
        messages=[{"role": "user", "content": "abcdefgh"}],
        max_tokens=3,
        temperature=0.7,
        top_p=0.9,
        seed=5,
        stop=["zz"],
    )
    assert r.choices[0].message.content == "hgf" and r.choices[0].finish_reason == "length"
    assert system.calls[-1][1] == {
        "max_new_tokens": 3,
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.9,
        "seed": 5,
        "stop": ["zz"],
    }
    client.chat.completions.create(
        model="reverser", messages=[{"role": "user", "content": "x"}], temperature=0, max_completion_tokens=7
    )
    assert system.calls[-1][1] == {"max_new_tokens": 7, "do_sample": False}
    client.chat.completions.create(model="reverser", messages=[{"role": "user", "content": "x"}])
    assert system.calls[-1][1] == {}  # nothing given: the system's own settings
    # content given as text parts, and a developer message, arrive as plain chat messages
    parts = [{"type": "text", "text": "ab"}, {"type": "text", "text": "cd"}]
    r = post(
        url,
        {
            "model": "reverser",
            "messages": [{"role": "developer", "content": "d"}, {"role": "user", "content": parts}],
        },
    )
    assert r.status_code == 200
    assert system.calls[-1][0] == [[{"role": "system", "content": "d"}, {"role": "user", "content": "abcd"}]]


# --------------------------------------------------------------------------------------- errors


def with_(**fields) -> dict:
    return good() | fields


BAD_REQUESTS = [
    ("malformed_json", b'{"model": "reverser", "messages": [', 400, None, "invalid_json"),
    ("not_an_object", b"[1, 2]", 400, None, "invalid_json"),
    ("unknown_model", with_(model="gpt-17"), 404, "model", "model_not_found"),
    ("n_above_one", with_(n=2), 400, "n", "invalid_value"),
    ("negative_max_tokens", with_(max_tokens=-1), 400, "max_tokens", "invalid_value"),
    (
        "zero_max_completion_tokens",
        with_(max_completion_tokens=0),
        400,
        "max_completion_tokens",
        "invalid_value",
    ),
    ("negative_temperature", with_(temperature=-0.5), 400, "temperature", "invalid_value"),
    ("temperature_as_string", with_(temperature="hot"), 400, "temperature", "invalid_value"),
    ("max_tokens_as_string", with_(max_tokens="10"), 400, "max_tokens", "invalid_value"),
    ("max_tokens_as_bool", with_(max_tokens=True), 400, "max_tokens", "invalid_value"),
    ("top_p_zero", with_(top_p=0.0), 400, "top_p", "invalid_value"),
    ("stream_as_string", with_(stream="yes"), 400, "stream", "invalid_value"),
    ("five_stop_strings", with_(stop=["a", "b", "c", "d", "e"]), 400, "stop", "invalid_value"),
    ("stop_as_number", with_(stop=5), 400, "stop", "invalid_value"),
    (
        "content_as_number",
        with_(messages=[{"role": "user", "content": 5}]),
        400,
        "messages.0.content",
        "invalid_value",
    ),
    (
        "image_content_part",
        with_(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        400,
        "messages.0.content",
        "invalid_value",
    ),
    ("messages_as_string", with_(messages="hi"), 400, "messages", "invalid_value"),
    (
        "role_missing",
        with_(messages=[{"content": "hi"}]),
        400,
        "messages.0.role",
        "missing_required_parameter",
    ),
    ("temperature_above_two", with_(temperature=2.5), 400, "temperature", "invalid_value"),
    ("logprobs", with_(logprobs=True), 400, "logprobs", "unsupported_parameter"),
    ("missing_messages", {"model": "reverser"}, 400, "messages", "missing_required_parameter"),
    (
        "missing_model",
        {"messages": [{"role": "user", "content": "x"}]},
        400,
        "model",
        "missing_required_parameter",
    ),
    ("empty_messages", with_(messages=[]), 400, "messages", "invalid_value"),
    (
        "tool_role",
        with_(messages=[{"role": "tool", "content": "x"}]),
        400,
        "messages.0.role",
        "invalid_value",
    ),
    ("oversized_prompt", good("x" * 199), 400, "messages", "context_length_exceeded"),
]


@pytest.mark.parametrize(
    ("case", "body", "status", "param", "code"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS]
)
def test_bad_request_gets_openai_error_body_and_server_keeps_serving(fake, case, body, status, param, code):
    system, url = fake
    r = post(url, body)
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param and error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    assert system.calls == []  # nothing reached the model
    ok = post(url, good("still here"))
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == expected("still here")


def test_prompt_one_token_under_the_context_is_accepted_and_a_full_context_refused(fake):
    system, url = fake
    # 197 characters + 2 = 199 tokens: one token of the fixture's context of 200 is left
    r = post(url, good("x" * 197))
    assert r.status_code == 200
    r = post(url, good("x" * 198))  # 200 tokens: nothing left to generate into
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_openai_sdk_raises_its_own_error_types_for_4xx(fake):
    system, url = fake
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert exc.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="reverser", messages=[{"role": "user", "content": "x"}], n=3)
    assert exc.value.body["param"] == "n"


def test_unknown_route_and_wrong_method_get_error_bodies(fake):
    system, url = fake
    r = httpx.get(f"{url}/nothing-here")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(f"{url}/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    assert httpx.get(f"{url}/models/other").status_code == 404


def test_generation_failure_returns_500_and_next_request_works(fake):
    system, url = fake
    r = post(url, good("please FAIL"))
    assert r.status_code == 500
    error = r.json()["error"]
    assert error["type"] == "server_error" and "the model fell over" in error["message"]
    assert post(url, good("again")).json()["choices"][0]["message"]["content"] == expected("again")
    r = post(url, good("LOSE it"))
    assert r.status_code == 500 and "returned 0 completions for 1 prompts" in r.json()["error"]["message"]
    assert post(url, good("and again")).status_code == 200


# --------------------------------------------------------------------------------------- batching


def _fire(url: str, bodies: list[dict]) -> list[httpx.Response]:
    results: list = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def send(i: int) -> None:
        barrier.wait()
        results[i] = post(url, bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_requests_are_served_in_one_batch():
    system = ReverseSystem()
    url, stop = start_server(system, max_batch_size=4, max_wait_ms=3000)
    try:
        words = ["alpha", "beta", "gamma", "delta"]
        responses = _fire(url, [good(w) for w in words])
    finally:
        stop()
    assert [r.json()["choices"][0]["message"]["content"] for r in responses] == [expected(w) for w in words]
    assert len(system.calls) == 1  # the batch filled up: one generate call, no 3 s wait
    assert sorted(p[-1]["content"] for p in system.calls[0][0]) == sorted(words)
    assert len(system.threads) == 1 and not system.threads & {threading.current_thread().name}


def test_requests_with_different_sampling_run_as_separate_batches():
    system = ReverseSystem()
    url, stop = start_server(system, max_batch_size=4, max_wait_ms=3000)
    try:
        bodies = [with_(max_tokens=2), with_(max_tokens=3), with_(max_tokens=2), with_(max_tokens=3)]
        responses = _fire(url, bodies)
    finally:
        stop()
    assert [r.json()["choices"][0]["message"]["content"] for r in responses] == ["ol", "oll", "ol", "oll"]
    assert sorted((len(p), k["max_new_tokens"]) for p, k in system.calls) == [(2, 2), (2, 3)]


# --------------------------------------------------------------------------------------- streaming


def _events(response: httpx.Response) -> list[str]:
    lines = [line for line in response.iter_lines()]
    events = [line for line in lines if line]
    assert all(e.startswith("data: ") for e in events), events
    return [e[len("data: ") :] for e in events]


def test_streaming_returns_well_formed_sse_ending_with_done(fake):
    system, url = fake
    body = with_(
        stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "stream me"}],
    )
    with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = _events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    assert choices[0]["delta"]["role"] == "assistant"
    assert "".join(ch["delta"].get("content") or "" for ch in choices) == expected("stream me")
    assert [ch["finish_reason"] for ch in choices][-1] == "stop"
    assert all(ch["finish_reason"] is None for ch in choices[:-1])
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == []
    assert usage == {"prompt_tokens": 11, "completion_tokens": 9, "total_tokens": 20}


def test_streaming_through_openai_sdk_matches_non_streaming(fake):
    system, url = fake
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "the quick brown fox jumps"}]
    plain = client.chat.completions.create(model="reverser", messages=messages, max_tokens=10)
    stream = client.chat.completions.create(model="reverser", messages=messages, max_tokens=10, stream=True)
    parts, reasons = [], []
    for chunk in stream:
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
    assert "".join(parts) == plain.choices[0].message.content == expected(messages[0]["content"], 10)
    assert reasons[-1] == "length"


def test_stream_that_fails_ends_with_an_error_event_and_the_client_goes_on(fake):
    system, url = fake
    body = with_(stream=True, messages=[{"role": "user", "content": "FAIL"}])
    with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=30) as r:
        events = _events(r)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "the model fell over" in error["message"]
    # the same SDK client (one keep-alive connection) after a failed stream
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    for _ in range(2):
        with pytest.raises(openai.APIError, match="the model fell over"):
            for _chunk in client.chat.completions.create(
                model="reverser", messages=[{"role": "user", "content": "FAIL"}], stream=True
            ):
                pass
        reply = client.chat.completions.create(model="reverser", messages=[{"role": "user", "content": "ok"}])
        assert reply.choices[0].message.content == "ko"


# --------------------------------------------------------------------------------------- hostile clients

OVERFLOWS = [
    ("max_tokens", 2**70),
    ("max_tokens", 10**9),
    ("max_completion_tokens", 2**64),
    ("seed", 2**70),
    ("seed", -1),
    ("top_k", 2**63),
    ("max_tokens", 1_000_000),
]


@pytest.mark.parametrize(("param", "value"), OVERFLOWS, ids=[f"{p}={v}" for p, v in OVERFLOWS])
def test_huge_or_negative_integers_are_a_400_naming_the_parameter_at_once(fake, param, value):
    system, url = fake
    r = post(url, with_(**{param: value}), timeout=5)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert system.calls == []


def test_max_tokens_beyond_what_the_context_leaves_is_refused(fake):
    system, url = fake
    prompt = "x" * 98  # 100 tokens of the fixture's 200
    r = post(url, with_(messages=[{"role": "user", "content": prompt}], max_tokens=101))
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "max_tokens" and "100" in r.json()["error"]["message"]
    assert post(url, with_(messages=[{"role": "user", "content": prompt}], max_tokens=100)).status_code == 200


def test_max_tokens_limit_refuses_more_than_the_servers_cap():
    system = ReverseSystem()
    url, stop = start_server(system, max_tokens_limit=8)
    try:
        r = post(url, with_(max_tokens=9))
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        assert post(url, with_(max_tokens=8)).status_code == 200
    finally:
        stop()


def test_system_side_sampling_errors_name_the_request_parameter():
    class Strict(ReverseSystem):
        def sampling(self, **overrides):
            if overrides.get("top_k", 0) > 50:
                raise LatentMergeError("top_k=... is more than this system's vocabulary", param="top_k")

    url, stop = start_server(Strict())
    try:
        r = post(url, with_(top_k=51, temperature=0.5))
        assert r.status_code == 400 and r.json()["error"]["param"] == "top_k"
    finally:
        stop()


class SlowCounter(ReverseSystem):
    """Counting tokens takes as long as a real tokenizer takes over megabytes of text."""

    def count_prompt_tokens(self, chat):
        if sum(len(m["content"]) for m in chat) > 100_000:
            time.sleep(2.0)
        return super().count_prompt_tokens(chat)


def test_health_answers_while_a_huge_prompt_is_tokenised():
    url, stop = start_server(SlowCounter(), max_body_bytes=16 * 2**20)
    try:
        big = threading.Thread(target=post, args=(url, good("y" * 4_000_000)))
        big.start()
        time.sleep(0.3)  # the big request is being tokenised now
        t0 = time.monotonic()
        assert httpx.get(url.removesuffix("/v1") + "/health", timeout=5).status_code == 200
        waited = time.monotonic() - t0
        big.join()
    finally:
        stop()
    assert waited < 1.0, f"/health waited {waited:.2f} s behind the tokeniser"


def test_oversized_body_is_a_413(fake):
    system, url = fake
    r = post(url, good("z" * (9 * 2**20)))
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit still holds while reading
        for _ in range(10):
            yield b"z" * 2**20

    r = httpx.post(f"{url}/chat/completions", content=chunks(), timeout=30)
    assert r.status_code == 413
    assert post(url, good("fine")).status_code == 200


def test_api_key_is_required_when_set_and_compared_exactly():
    system = ReverseSystem()
    url, stop = start_server(system, api_key="s3cret-key")
    try:
        assert post(url, good()).status_code == 401
        r = post(url, good(), headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert "s3cret" not in r.text
        assert httpx.get(f"{url}/models").status_code == 401
        assert httpx.get(url.removesuffix("/v1") + "/health").status_code == 200
        client = openai.OpenAI(base_url=url, api_key="s3cret-key", max_retries=0)
        assert client.chat.completions.create(model="reverser", messages=[{"role": "user", "content": "ab"}])
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="nope", max_retries=0).models.list()
    finally:
        stop()


def test_api_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("LMN_API_KEY", "env-key-123")
    url, stop = start_server(ReverseSystem())
    try:
        assert post(url, good()).status_code == 401
        assert post(url, good(), headers={"Authorization": "Bearer env-key-123"}).status_code == 200
    finally:
        stop()


@pytest.mark.parametrize(
    ("host", "key", "warns"),
    [("0.0.0.0", None, True), ("::", None, True), ("10.1.2.3", None, True), ("::1", None, False),
     ("127.0.0.1", None, False), ("localhost", None, False), ("::", "k", False), ("0.0.0.0", "k", False)],
)  # fmt: skip
def test_public_address_without_a_key_warns(caplog, host, key, warns):
    from latent_merge_nnsight.serve.run import _warn_if_public

    with caplog.at_level("WARNING", logger="latent_merge_nnsight.serve.run"):
        _warn_if_public(host, key)
    assert ("without authentication" in caplog.text) == warns


@pytest.mark.parametrize("port", [99999, -1])
def test_bad_port_is_an_error_naming_it(port):
    with pytest.raises(LatentMergeError, match=f"port={port}"):
        start_server(ReverseSystem(), port=port)


# --------------------------------------------------------------------------------------- /v1/completions


def test_text_completion_through_openai_sdk(fake):
    system, url = fake
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    reply = client.completions.create(model="reverser", prompt="plain text", max_tokens=5)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 5
    assert system.calls[-1] == (["plain text"], {"max_new_tokens": 5})  # a string prompt, used as is
    streamed = client.completions.create(model="reverser", prompt=["plain text"], max_tokens=5, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == reply.choices[0].text
    two = client.completions.create(model="reverser", prompt=["ab", "cde"], max_tokens=5)
    assert [(c.index, c.text) for c in two.choices] == [(0, "ba"), (1, "edc")]  # one choice per prompt
    assert two.usage.prompt_tokens == 5 and two.usage.completion_tokens == 5
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="reverser", prompt="a", echo=True, max_tokens=1)
    assert exc.value.body["param"] == "echo"  # a system that cannot score its prompts says so


# --------------------------------------------------------------------------------------- real models


@pytest.fixture(scope="module")
def tiny_latent(tmp_path_factory):
    from test_systems import save_tiny_pair, write_system

    from latent_merge_nnsight.systems.loaded import load_system

    root = save_tiny_pair(tmp_path_factory.mktemp("serve-models"))
    path = write_system(
        root, "tiny-latent", kind="latent", sources=["ft"], recipe={"op": "slerp", "layers": {1: 0.5}}
    )
    return load_system(path)


def test_judge_client_against_served_tiny_latent_system(tiny_latent, tmp_path):
    from latent_merge_nnsight.evaluation.judge import Comparison, judge_pairs_sync
    from latent_merge_nnsight.evaluation.judgebench.templates import load_template

    template = load_template("pairwise_abc")
    comparisons = [
        Comparison(f"p{i}", f"What is {i}+{i}?", f"{2 * i}", f"{2 * i + 1}", "latent", "base", "math")
        for i in range(3)
    ]
    calls_before = tiny_latent.generate_calls
    url, stop = start_server(tiny_latent, max_batch_size=6, max_wait_ms=1000, max_prompt_tokens=4096)
    try:
        judgments = judge_pairs_sync(
            comparisons, "tiny-latent", url, template, tmp_path / "cache.jsonl", concurrency=6, progress=False
        )
    finally:
        stop()
    served_calls = tiny_latent.generate_calls - calls_before
    assert sorted((j.pair_id, j.order) for j in judgments) == [
        (f"p{i}", o) for i in range(3) for o in ("AB", "BA")
    ]
    assert served_calls < len(judgments)  # concurrent judge requests shared generate calls
    for j in judgments:
        c = comparisons[int(j.pair_id[1:])]
        first, second = (c.response_a, c.response_b) if j.order == "AB" else (c.response_b, c.response_a)
        direct = tiny_latent.generate([template.messages(c.question, first, second)], do_sample=False)[0]
        assert j.reply == direct  # the HTTP round trip changes nothing
        assert j.verdict_shown == template.parse(j.reply)


def test_server_default_prompt_limit_is_the_models_context(tiny_latent):
    url, stop = start_server(tiny_latent)
    try:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        limit = tiny_latent.context_length
        assert limit == 256  # tests/tiny.py: max_position_embeddings
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(
                model="tiny-latent", messages=[{"role": "user", "content": "x" * 300}]
            )
        assert exc.value.body["code"] == "context_length_exceeded" and str(limit) in exc.value.body["message"]
        reply = client.chat.completions.create(
            model="tiny-latent", messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0
        )
        direct = tiny_latent.complete([[{"role": "user", "content": "hi"}]], max_new_tokens=3)[0]
        assert reply.choices[0].message.content == direct.text
        assert reply.choices[0].finish_reason == direct.finish_reason
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (
            direct.prompt_tokens,
            direct.completion_tokens,
        )
    finally:
        stop()


def test_toy_pair_latent_system_served_through_openai_sdk():
    from latent_merge_nnsight.systems.loaded import load_system

    system = load_system(EXAMPLES / "toy-latent-slerp.yaml")
    messages = [{"role": "user", "content": "What is 2+3?"}]
    url, stop = start_server(system)
    try:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["toy-latent-slerp"]
        reply = client.chat.completions.create(model="toy-latent-slerp", messages=messages, max_tokens=24)
        streamed = client.chat.completions.create(
            model="toy-latent-slerp", messages=messages, max_tokens=24, stream=True
        )
        streamed_text = "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices)
    finally:
        stop()
    direct = system.generate([messages], max_new_tokens=24)[0]
    assert reply.choices[0].message.content == direct == streamed_text
    assert reply.usage.prompt_tokens == system.count_prompt_tokens(messages)


def test_stop_sequence_ends_the_reply_and_is_left_out_like_openai(tiny_latent):
    messages = [{"role": "user", "content": "hi"}]
    full = tiny_latent.generate([messages], max_new_tokens=8)[0]
    stop_at = next((i for i in range(1, len(full)) if full[i] not in full[:i]), None)
    if stop_at is None:
        pytest.skip(f"the tiny model's reply {full!r} has no character that appears first after position 0")
    url, stop = start_server(tiny_latent)
    try:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="tiny-latent", messages=messages, max_tokens=8, temperature=0, stop=[full[stop_at]]
        )
    finally:
        stop()
    assert reply.choices[0].message.content == full[:stop_at]
    assert reply.choices[0].finish_reason == "stop"


# --------------------------------------------------------------------------------------- logprobs


def test_logprobs_of_the_chosen_tokens_in_openai_shapes(tiny_latent):
    url, stop = start_server(tiny_latent)
    try:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "hi there"}]
        reply = client.chat.completions.create(
            model="tiny-latent", messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
        )
        text = client.completions.create(
            model="tiny-latent", prompt="<|user|>hi there", max_tokens=5, temperature=0, logprobs=2
        )
    finally:
        stop()
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert "".join(t.token for t in content).startswith(reply.choices[0].message.content)
    for t in content:  # greedy: the chosen token is the scored distribution's most likely one
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-4)
        assert t.bytes == list(t.token.encode())
    lp = text.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == text.usage.completion_tokens
    assert lp.text_offset[0] == 0 and all(len(alts) == 2 for alts in lp.top_logprobs)
    for token, value, alts in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert value == pytest.approx(max(alts.values()), abs=1e-4) and token in alts


def test_logprobs_are_those_of_the_merged_model(tiny_latent):
    from latent_merge_nnsight.generation import generate
    from latent_merge_nnsight.systems.logprobs import token_logprobs

    chat = [[{"role": "user", "content": "merge me"}]]
    merged = tiny_latent.complete(chat, max_new_tokens=5, logprobs=0)[0].logprobs
    result = generate(
        tiny_latent.base, tiny_latent.sources[0], chat, tiny_latent.config.recipe, max_new_tokens=5
    )
    assert [t.token for t in merged] == [tiny_latent.tokenizer.decode([i]) for i in result.tokens[0]]

    class BaseAlone:  # the same tokens scored without the merge
        config = tiny_latent.config.model_copy(update={"kind": "single", "recipe": None, "sources": []})
        base, tokenizer, name = tiny_latent.base, tiny_latent.tokenizer, "base"

    plain = token_logprobs(BaseAlone, result, 0)[0]
    assert [t.logprob for t in plain] != pytest.approx([t.logprob for t in merged], abs=1e-6)
