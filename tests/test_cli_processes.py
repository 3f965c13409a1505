"""`lmn serve`, `lmn judge` and `lmn respond` as real processes on the toy pair (loopback only, bounded):
streaming through the `openai` SDK, load with malformed requests and disconnects, SIGKILL and resume."""

import json
import signal
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest
from judgebench_files import CLAUDE_FILE, DATA, vanilla_copy
from loopback_server import LoopbackServer, completion
from serve_load import QUESTION, env, free_port, greedy, lmn, rss_kib, run_load, start_serve

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = ROOT / "examples" / "systems"
MODEL = "toy-latent-slerp"


def one_line_error(out: subprocess.CompletedProcess, command: str) -> str:
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr[-2000:]
    assert lines and lines[-1].startswith(f"lmn {command}: error: "), out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    return lines[-1]


# --------------------------------------------------------------------------------------- lmn serve


@pytest.fixture(scope="module")
def served():
    with start_serve(SYSTEMS / f"{MODEL}.yaml", "--max-tokens-limit", "48") as (proc, url):
        yield proc, url


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)


def test_served_process_streams_and_completes_through_the_openai_sdk(served):
    proc, url = served
    c = client(url)
    plain = greedy(url, MODEL)
    stream = c.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=16, temperature=0, stream=True
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == plain != ""
    text = c.completions.create(model=MODEL, prompt="<|user|>What is 2+3?", max_tokens=8, temperature=0)
    assert text.object == "text_completion" and text.usage.completion_tokens >= 1
    streamed = c.completions.create(
        model=MODEL, prompt="<|user|>What is 2+3?", max_tokens=8, temperature=0, stream=True
    )
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == text.choices[0].text


def test_served_process_max_tokens_limit_refuses_more(served):
    proc, url = served
    with pytest.raises(openai.BadRequestError) as exc:
        client(url).chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=49)
    assert exc.value.body["param"] == "max_tokens" and "48" in exc.value.body["message"]
    reply = client(url).chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=48)
    assert reply.choices[0].finish_reason == "eos" and reply.usage.completion_tokens < 48  # ended by EOS


@pytest.fixture(scope="module")
def served_openai_words():
    with start_serve(SYSTEMS / f"{MODEL}.yaml", "--openai-finish-reasons") as (proc, url):
        yield proc, url


def finish(c: openai.OpenAI, api: str, stream: bool, **params) -> tuple[str, str, int]:
    """(finish_reason, text, completion tokens) of one greedy request through the SDK."""
    params = {"model": MODEL, "temperature": 0, **params}
    if api == "chat":
        make, params = c.chat.completions.create, {"messages": QUESTION, **params}
    else:
        make, params = c.completions.create, {"prompt": "<|user|>What is 2+3?<|assistant|>", **params}
    if not stream:
        r = make(**params)
        choice = r.choices[0]
        return (
            choice.finish_reason,
            choice.message.content if api == "chat" else choice.text,
            r.usage.completion_tokens,
        )
    chunks = list(make(**params, stream=True, stream_options={"include_usage": True}))
    choices = [ch.choices[0] for ch in chunks if ch.choices]
    assert all(ch.finish_reason is None for ch in choices[:-1])
    text = "".join((ch.delta.content or "") if api == "chat" else ch.text for ch in choices)
    return choices[-1].finish_reason, text, chunks[-1].usage.completion_tokens


@pytest.mark.parametrize("openai_words", [False, True], ids=["default", "openai-finish-reasons"])
@pytest.mark.parametrize(
    ("api", "stream"), [("chat", False), ("chat", True), ("text", False), ("text", True)]
)
def test_served_finish_reasons_are_eos_stop_length_or_openai_words(request, openai_words, api, stream):
    proc, url = request.getfixturevalue("served_openai_words" if openai_words else "served")
    c = client(url)
    reason, text, n = finish(c, api, stream, max_tokens=32)
    assert n < 32 and text.startswith("Answer: ")  # no stop string, under budget: the model's EOS ended it
    assert reason == ("stop" if openai_words else "eos")
    reason, cut, _ = finish(c, api, stream, max_tokens=32, stop=[":"])
    assert (reason, cut) == ("stop", text[: text.index(":")])  # the stop string ends it, left out
    reason, short, n = finish(c, api, stream, max_tokens=3)
    assert (reason, n) == ("length", 3) and text.startswith(short)


def test_served_process_under_load_with_malformed_requests_and_a_disconnect(served):
    proc, url = served
    before = greedy(url, MODEL)
    with httpx.Client(timeout=60) as http:
        for i in range(50):  # warm-up: 50 requests, then the reference RSS
            content = f"Compute {i}+1."
            body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4}
            assert http.post(f"{url}/chat/completions", json=body).status_code == 200
    rss_warm = rss_kib(proc.pid)
    failures = run_load(url, MODEL, clients=16, per_client=30)  # 10% malformed, 10% streams, 1 hang-up
    assert failures == [], failures[:5]
    rss_after = rss_kib(proc.pid)
    assert greedy(url, MODEL) == before  # the same greedy answer after 530 requests
    assert abs(rss_after - rss_warm) <= 0.05 * rss_warm, (rss_warm, rss_after)
    assert httpx.get(url.removesuffix("/v1") + "/health").status_code == 200


def in_process(capsys, argv: list[str]) -> subprocess.CompletedProcess:
    """`lmn ARGV` through `cli.main` in this process (for errors raised before any model loads)."""
    from latent_merge_nnsight.cli import main

    code = main(argv)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, captured.out, captured.err)


def test_serve_with_a_bad_port_is_a_one_line_error(capsys):
    out = in_process(capsys, ["serve", str(SYSTEMS / f"{MODEL}.yaml"), "--port", "99999"])
    line = one_line_error(out, "serve")
    assert "--port" in line and "99999" in line and "1..65535" in line, line


# --------------------------------------------------------------------------------------- lmn judge


def kill_after(command: list[str], environ: dict, path: Path, lines: int, timeout: float = 180) -> int:
    """Run ``command``, SIGKILL it once ``path`` holds ``lines`` lines; returns the lines written by then."""
    proc = subprocess.Popen(command, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not (path.exists() and len(path.read_text().splitlines()) >= lines):
        assert proc.poll() is None and time.monotonic() < deadline, f"{command[3]} ended before it was killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return len(path.read_text().splitlines())


def write_responses(tmp: Path, n: int) -> tuple[Path, Path]:
    paths = []
    for system in ("latent", "base"):
        path = tmp / f"{system}.jsonl"
        rows = [
            {"pair_id": f"p{i}", "question": f"Question {i}?", "response": f"{system}-{i}", "system": system,
             "category": ["knowledge", "reasoning", "math", "coding"][i % 4]}
            for i in range(n)
        ]  # fmt: skip
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(path)
    return paths[0], paths[1]


def judge_reply(request: dict, index: int, delay: float = 0.0) -> tuple[int, dict]:
    time.sleep(delay)
    text = request["messages"][-1]["content"]
    first = text.split("[Answer A]\n", 1)[1].split("-", 1)[0]
    i = int(text.split("Question ", 1)[1].split("?", 1)[0])
    if i % 5 == 4:
        return 200, completion("I cannot decide")  # invalid
    return 200, completion("A" if first == "latent" or i % 3 == 0 else "B")


def judge_cmd(a: Path, b: Path, url: str, out: Path, *extra: str) -> list[str]:
    return lmn("judge", str(a), str(b), "--judge-model", "m", "--base-url", url, "--out", str(out), *extra)


def test_judge_single_order_judges_one_order(tmp_path):
    a, b = write_responses(tmp_path, 4)
    with LoopbackServer(judge_reply) as server:
        out = subprocess.run(
            judge_cmd(a, b, server.base_url, tmp_path / "out", "--single-order"),
            env=env(OPENAI_API_KEY="dummy"),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(server.requests) == 4
    cached = [json.loads(line) for line in (tmp_path / "out" / "judgments.jsonl").read_text().splitlines()]
    assert sorted((r["pair_id"], r["order"]) for r in cached) == [(f"p{i}", "AB") for i in range(4)]
    assert "| latent vs base |" in out.stdout and "Invalid" in out.stdout


def test_judge_http_failure_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "dummy")
    a, b = write_responses(tmp_path, 2)
    closed = f"http://127.0.0.1:{free_port()}/v1"
    out = in_process(capsys, judge_cmd(a, b, closed, tmp_path / "out", "--max-retries", "0")[3:])
    assert "--base-url" in one_line_error(out, "judge")


def test_judge_killed_mid_run_resumes_to_the_uninterrupted_summary(tmp_path):
    from latent_merge_nnsight.evaluation.judge import judge_pairs_sync, load_comparisons
    from latent_merge_nnsight.evaluation.judge_summary import summarize
    from latent_merge_nnsight.evaluation.judgebench.templates import load_template

    a, b = write_responses(tmp_path, 12)
    with LoopbackServer(judge_reply) as server:  # the uninterrupted run, in this process
        judged = judge_pairs_sync(
            load_comparisons(a, b), "m", server.base_url, load_template("pairwise_abc"), None, progress=False
        )
    reference = {"latent vs base": [summarize(judged)]}
    with LoopbackServer(lambda r, i: judge_reply(r, i, delay=0.1)) as server:
        cache = tmp_path / "run" / "judgments.jsonl"
        command = judge_cmd(a, b, server.base_url, tmp_path / "run", "--concurrency", "2")
        assert 6 <= kill_after(command, env(OPENAI_API_KEY="dummy"), cache, 6) < 24
        with cache.open("a") as fh:  # the write the kill interrupted
            fh.write('{"pair_id": "p11", "order": "BA", "judge_mo')
        rerun = subprocess.run(
            judge_cmd(a, b, server.base_url, tmp_path / "run"),
            env=env(OPENAI_API_KEY="dummy"),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    records = [json.loads(line) for line in cache.read_text().splitlines()]
    keys = [(r["pair_id"], r["order"]) for r in records]
    assert len(keys) == len(set(keys)) == 24  # exactly one record per (pair, order)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary == json.loads(json.dumps(reference))


# --------------------------------------------------------------------------------------- lmn respond


@pytest.mark.skipif(not CLAUDE_FILE.is_file(), reason=f"JudgeBench copies not found in {DATA}")
def test_respond_killed_mid_run_resumes_to_the_uninterrupted_file(tmp_path):
    from latent_merge_nnsight.evaluation.respond import respond

    system = tmp_path / "toy.yaml"
    system.write_text(
        "name: toy\nkind: single\nbase: toy-base\ndtype: float32\nsampling: {max_new_tokens: 4}\n"
    )
    data = tmp_path / "short.jsonl"  # real JudgeBench rows, questions cut short so the toy answers fast
    rows = [json.loads(line) for line in CLAUDE_FILE.read_text().splitlines()[:6]]
    data.write_text("".join(json.dumps(r | {"question": r["question"][:60]}) + "\n" for r in rows))

    def cmd(out: Path) -> list[str]:
        return lmn("respond", str(system), "--data", str(data), "--out", str(out), "--batch-size", "1",
                   "--no-progress")  # fmt: skip

    respond(system, out=tmp_path / "ref.jsonl", data=data, batch_size=1, progress=False)  # uninterrupted
    out = tmp_path / "run.jsonl"
    assert kill_after(cmd(out), env(), out, 2) < 6
    with out.open("a") as fh:
        fh.write('{"pair_id": "torn", "resp')
    rerun = subprocess.run(cmd(out), env=env(), capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    got = [json.loads(line) for line in out.read_text().splitlines()]
    want = [json.loads(line) for line in (tmp_path / "ref.jsonl").read_text().splitlines()]
    assert len({r["pair_id"] for r in got}) == len(got) == 6  # exactly one record per question
    assert sorted(got, key=lambda r: r["pair_id"]) == sorted(want, key=lambda r: r["pair_id"])


def test_respond_without_network_is_a_one_line_error(tmp_path):
    out = subprocess.run(
        lmn("respond", str(SYSTEMS / "toy-base.yaml"), "--out", str(tmp_path / "r.jsonl")),
        env=env(HF_DATASETS_OFFLINE="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "--data" in one_line_error(out, "respond")


@pytest.mark.skipif(not CLAUDE_FILE.is_file(), reason=f"JudgeBench copies not found in {DATA}")
def test_judgebench_accuracy_with_the_vanilla_prompt_from_a_local_copy(tmp_path):
    def vanilla_judge(request, index):
        assert request["messages"][0]["content"].startswith("You are a helpful assistant in evaluating")
        return 200, completion("Output (a)")

    with LoopbackServer(vanilla_judge) as server:
        out = subprocess.run(
            lmn("judgebench-accuracy", "--split", "claude", "--data", str(CLAUDE_FILE),
                "--template", "vanilla", "--judge-model", "m", "--base-url", server.base_url,
                "--limit", "3", "--out", str(tmp_path / "o.jsonl")),
            env=env(OPENAI_API_KEY="dummy", LMN_JUDGEBENCH_PROMPT=str(vanilla_copy())),
            capture_output=True,
            text=True,
            timeout=120,
        )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(server.requests) == 6  # 3 pairs, both games
    assert json.loads(out.stdout)["overall"]["n"] == 3
