"""`lmn serve` streams token by token: the generation loop's step hook hands each row's new tokens to the
batcher, which sends them as SSE chunks as they are decoded (stop strings held back while they could
still match), for chat and text completions; a client that hangs up frees its row at the next step.

The server is a real `lmn serve` process (`serve_steps.py`: each decode step sleeps 50 ms and is logged
with its time and rows) over a tiny random latent pair whose answers run to the token budget."""

import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from serve_load import start_serve

STEPS = Path(__file__).resolve().parent / "serve_steps.py"
MODEL = "tiny-latent"
N_NEW = 32
PROMPT = "hello"
CHAT = [{"role": "user", "content": "Tell me a story"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from test_systems import save_tiny_pair, write_system

    root = save_tiny_pair(tmp_path_factory.mktemp("stream-models"))
    system = write_system(
        root, MODEL, kind="latent", sources=["ft"], recipe={"op": "slerp", "layers": {1: 0.5}}
    )
    log = root / "steps.log"
    launcher = [sys.executable, str(STEPS), str(log), "0.05"]
    with start_serve(system, "--max-wait-ms", "400", launcher=launcher, timeout=600) as (proc, url):
        yield url, log


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)


def steps(log: Path) -> list[tuple[float, int]]:
    """(when, rows) of each decode step the server ran since the log was last cleared."""
    return [(float(t), int(n)) for t, n in (line.split() for line in log.read_text().splitlines())]


def settled_steps(log: Path, n: int, wait: float = 20.0) -> list[tuple[float, int]]:
    """`steps(log)` once it holds `n` steps (or after `wait` s): the server logs a step after its hook has
    sent the step's chunks, so a client can hold the last chunk before the last line is written."""
    deadline = time.time() + wait
    while len(ran := steps(log)) < n and time.time() < deadline:
        time.sleep(0.05)
    return ran


def streamed(url: str, api: str, **params) -> tuple[list[str], list[float], str | None]:
    """(each chunk's text, when it arrived, the finish reason) of one streamed request."""
    c = client(url)
    if api == "chat":
        stream = c.chat.completions.create(model=MODEL, messages=CHAT, stream=True, **params)
    else:
        stream = c.completions.create(model=MODEL, prompt=PROMPT, stream=True, **params)
    texts, times, reason = [], [], None
    for chunk in stream:
        for choice in chunk.choices:
            piece = choice.delta.content if api == "chat" else choice.text
            if piece:
                texts.append(piece)
                times.append(time.time())
            reason = choice.finish_reason or reason
    return texts, times, reason


def answered(url: str, api: str, **params) -> tuple[str, str, int]:
    """(text, finish reason, completion tokens) of the same request not streamed."""
    c = client(url)
    if api == "chat":
        r = c.chat.completions.create(model=MODEL, messages=CHAT, **params)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens
    r = c.completions.create(model=MODEL, prompt=PROMPT, **params)
    return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens


@pytest.mark.parametrize("api", ["chat", "text"])
def test_a_32_token_answer_arrives_in_chunks_as_its_tokens_are_chosen(served, api):
    url, log = served
    whole, reason, n = answered(url, api, max_tokens=N_NEW, temperature=0)
    assert (reason, n) == ("length", N_NEW)
    log.write_text("")
    texts, times, streamed_reason = streamed(url, api, max_tokens=N_NEW, temperature=0)
    ran = settled_steps(log, N_NEW)
    assert len(ran) == N_NEW and all(rows == 1 for _, rows in ran)  # one step per token, this row alone
    assert "".join(texts) == whole and streamed_reason == "length"
    assert len(texts) > 8
    assert times[0] < ran[-1][0]  # the first chunk was out before the last token was chosen


@pytest.mark.parametrize("api", ["chat", "text"])
def test_a_stop_string_never_leaks_partially(served, api):
    url, _ = served
    whole, _, _ = answered(url, api, max_tokens=N_NEW, temperature=0)
    # a stop string of three characters (three tokens) inside the answer: the reply ends before it
    at = next(i for i in range(4, len(whole) - 3) if whole.find(whole[i : i + 3]) == i)
    stop = whole[at : at + 3]
    texts, _, reason = streamed(url, api, max_tokens=N_NEW, temperature=0, stop=[stop])
    assert "".join(texts) == whole[:at] == answered(url, api, max_tokens=N_NEW, temperature=0, stop=[stop])[0]
    assert reason == "stop"
    # the start of a stop string that never completes is held back, then sent: nothing is lost
    missing = next(whole[i : i + 2] + "\x7f" for i in range(4, len(whole) - 2))
    assert missing not in whole
    texts, _, reason = streamed(url, api, max_tokens=N_NEW, temperature=0, stop=[missing, stop + "\x7f"])
    assert "".join(texts) == whole and reason == "length" and len(texts) > 8


def test_a_client_that_hangs_up_frees_its_row_at_the_next_step(served):
    url, log = served
    whole, _, _ = answered(url, "text", max_tokens=N_NEW, temperature=0)
    log.write_text("")
    kept: dict[str, str] = {}

    def keep_listening() -> None:
        texts, _, _ = streamed(url, "text", max_tokens=N_NEW, temperature=0)
        kept["text"] = "".join(texts)

    listener = threading.Thread(target=keep_listening)
    listener.start()
    body = {"model": MODEL, "messages": CHAT, "max_tokens": N_NEW, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=120) as r:
        chunks = 0
        for line in r.iter_lines():
            chunks += '"content"' in line
            if chunks == 4:  # the role chunk, then three pieces of text
                break
    hung_up = time.time()
    listener.join(timeout=120)
    assert kept["text"] == whole  # the other row went on to its end
    ran = settled_steps(log, N_NEW)
    assert max(rows for _, rows in ran) == 2  # both requests were rows of one batch
    both_after = [t for t, rows in ran if rows == 2 and t > hung_up]
    assert len(both_after) <= 2, both_after  # the hung-up row ran at most the step in flight and one more
    assert len(ran) == N_NEW  # the batch ran as long as the row that stayed


# The streams that could only come whole: refused, never buffered into one chunk at the end.
ECHO_FROM = {"latent_merge": {"merge_from": 0}}  # echo with a 'last'-positions recipe: merged from token 0
WHOLE_ONLY = [
    ("chat", {"logprobs": True}, "logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": 2}, "logprobs"),
    ("text", {"logprobs": 0}, "logprobs"),
    ("text", {"logprobs": 3}, "logprobs"),
    ("text", {"echo": True, "max_tokens": 0, "logprobs": 1, "extra_body": ECHO_FROM}, "logprobs"),
    ("text", {"echo": True, "max_tokens": 0, "extra_body": ECHO_FROM}, "echo"),
]


@pytest.mark.parametrize(("api", "params", "param"), WHOLE_ONLY)
def test_a_stream_that_could_only_arrive_whole_is_a_400_naming_its_parameter(served, api, params, param):
    url, log = served
    params = {"max_tokens": N_NEW, "temperature": 0} | params
    log.write_text("")
    with pytest.raises(openai.BadRequestError) as refused:
        streamed(url, api, **params)
    assert refused.value.param == param and "stream=false" in refused.value.message
    assert steps(log) == []  # refused before any decoding
    # the same request, not streamed, is served
    if api == "chat":
        reply = client(url).chat.completions.create(model=MODEL, messages=CHAT, **params)
        assert reply.choices[0].logprobs is not None and reply.choices[0].logprobs.content
    else:
        reply = client(url).completions.create(model=MODEL, prompt=PROMPT, **params)
        assert reply.choices[0].text


def test_a_plain_stream_of_the_same_server_still_streams_after_a_refusal(served):
    url, _ = served
    with pytest.raises(openai.BadRequestError):
        streamed(url, "chat", max_tokens=N_NEW, temperature=0, logprobs=True)
    texts, _, reason = streamed(url, "chat", max_tokens=N_NEW, temperature=0)
    assert "".join(texts) == answered(url, "chat", max_tokens=N_NEW, temperature=0)[0] and len(texts) > 8


@pytest.mark.parametrize("api", ["chat", "text"])
def test_a_backend_vllm_system_refuses_a_stream_naming_stream(tmp_path, api):
    """vLLM hands back whole answers (its engine takes no step hook): a stream would be one chunk at the
    end. The system loads here as CPU shells (no vLLM needed to refuse)."""
    from test_systems import save_tiny_pair, write_system

    from latent_merge_nnsight.serve import start_server

    root = save_tiny_pair(tmp_path)
    recipe = {"op": "slerp", "layers": {1: 0.5}}
    path = write_system(root, "tiny-vllm", kind="latent", sources=["ft"], recipe=recipe, backend="vllm")
    url, stop = start_server(str(path))
    try:
        c = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        with pytest.raises(openai.BadRequestError) as refused:
            if api == "chat":
                c.chat.completions.create(model="tiny-vllm", messages=CHAT, max_tokens=4, stream=True)
            else:
                c.completions.create(model="tiny-vllm", prompt=PROMPT, max_tokens=4, stream=True)
        assert refused.value.param == "stream" and "backend vllm" in refused.value.message
    finally:
        stop()
