"""Pairwise judge: the real `openai` SDK against a scripted loopback server, cache/resume, summaries."""

import asyncio
import json
import math
import re
import socket
import threading
import time
from pathlib import Path

import pytest
from judgebench_files import GPT_FILE
from loopback_server import LoopbackServer, completion, error, user_text

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.evaluation.judge import (
    Comparison,
    JudgeRequestError,
    Judgment,
    JudgmentCache,
    judge_pairs,
    judge_pairs_sync,
    judgebench_accuracy_openai,
    judgebench_accuracy_sync,
    load_comparisons,
    load_judgments,
)
from latent_merge_nnsight.evaluation.judge_summary import markdown_table, summarize, write_report
from latent_merge_nnsight.evaluation.judgebench.data import JudgePair, load_judgebench
from latent_merge_nnsight.evaluation.judgebench.official import official_accuracy
from latent_merge_nnsight.evaluation.judgebench.templates import Template, load_template

SECRET = "sk-test-DO-NOT-LEAK-4f1c9e"
TEMPLATE = load_template("pairwise_abc")
FAST = {"base_delay": 0.001, "max_delay": 0.01, "progress": False}

# Pair i: what the scripted judge thinks, and the category. "alpha" is system A's answer, "beta" B's.
PLAN = [
    ("alpha", "knowledge"),
    ("alpha", "reasoning"),
    ("beta", "math"),
    ("tie", "coding"),
    ("first", "knowledge"),  # position bias: always the answer shown first
    ("invalid", "reasoning"),
]


def make_comparisons(n: int = len(PLAN)) -> list[Comparison]:
    return [
        Comparison(
            f"p{i}", f"Question {i}?", f"alpha-{i}", f"beta-{i}", "latent", "base", PLAN[i % len(PLAN)][1]
        )
        for i in range(n)
    ]


def shown(request) -> tuple[int, str]:
    """(pair index, order) of a request, read back from the rendered prompt."""
    text = user_text(request)
    first = re.search(r"\[Answer A\]\n(alpha|beta)-(\d+)", text)
    return int(first.group(2)), "AB" if first.group(1) == "alpha" else "BA"


def scripted_reply(request) -> str:
    """The judge of `PLAN`, answering in varied but valid spellings."""
    i, order = shown(request)
    want = PLAN[i % len(PLAN)][0]
    if want == "invalid":
        return "A or B"
    if want == "tie":
        return "Answer: C"
    if want == "first":
        return " a "
    first_is_alpha = order == "AB"
    return "**A**" if (want == "alpha") == first_is_alpha else "B."


def good_script(request, index):
    return 200, completion(scripted_reply(request))


def cache_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)


# ----------------------------------------------------------------------------------- win rates


def test_judge_pairs_counts_and_win_rates_match_hand_computation(tmp_path):
    cache = tmp_path / "cache.jsonl"
    with LoopbackServer(good_script) as server:
        judgments = judge_pairs_sync(
            make_comparisons(), "judge-m", server.base_url, TEMPLATE, cache, concurrency=3, **FAST
        )
    assert len(server.requests) == 12  # 6 pairs x 2 orders, nothing retried
    assert server.requests[0].headers["authorization"] == f"Bearer {SECRET}"
    assert server.requests[0].body["model"] == "judge-m" and server.requests[0].body["temperature"] == 0.0
    by = {(j.pair_id, j.order): j.verdict for j in judgments}
    assert by == {
        ("p0", "AB"): "A", ("p0", "BA"): "A",
        ("p1", "AB"): "A", ("p1", "BA"): "A",
        ("p2", "AB"): "B", ("p2", "BA"): "B",
        ("p3", "AB"): "tie", ("p3", "BA"): "tie",
        ("p4", "AB"): "A", ("p4", "BA"): "B",
        ("p5", "AB"): None, ("p5", "BA"): None,
    }  # fmt: skip
    s = summarize(judgments, n_boot=200)
    overall = s["results"]["overall"]
    # A = 2+2+1, B = 2+1, tie = 2, invalid = 2; consistent pairs p0..p3 of 6.
    assert (overall["a_wins"], overall["b_wins"], overall["ties"], overall["invalid"]) == (5, 3, 2, 2)
    assert overall["win_rate_no_ties"] == pytest.approx(5 / 8)
    assert overall["win_rate_ties_half"] == pytest.approx(6 / 10)
    assert overall["order_consistency"] == pytest.approx(4 / 6)
    res = s["results"]
    assert list(res) == ["knowledge", "reasoning", "math", "coding", "overall"]
    assert (res["knowledge"]["win_rate_no_ties"], res["knowledge"]["order_consistency"]) == (0.75, 0.5)
    assert (res["reasoning"]["win_rate_no_ties"], res["reasoning"]["invalid"]) == (1.0, 2)
    assert res["math"]["win_rate_no_ties"] == 0.0
    assert (res["coding"]["win_rate_no_ties"], res["coding"]["win_rate_ties_half"]) == (None, 0.5)
    assert (s["system_a"], s["system_b"]) == ("latent", "base")
    assert SECRET not in cache.read_text()
    assert len(cache_lines(cache)) == 12


def test_single_order_and_progress_postfix(tmp_path, capsys):
    with LoopbackServer(good_script) as server:
        judgments = judge_pairs_sync(
            make_comparisons(),
            "m",
            server.base_url,
            TEMPLATE,
            None,
            both_orders=False,
            base_delay=0.001,
            progress=True,
        )
    assert [j.order for j in judgments] == ["AB"] * 6 and len(server.requests) == 6
    err = capsys.readouterr().err
    assert "A=3" in err and "B=1" in err and "tie=1" in err and "invalid=1" in err


# ----------------------------------------------------------------------------------------- retries


def test_retries_on_429_and_500_with_exponential_backoff():
    statuses = [429, 429, 500, 503]

    def script(request, index):
        if index < len(statuses):
            return (*error(statuses[index]), {"retry-after": "0"})
        return good_script(request, index)

    delays: list[float] = []

    async def record_sleep(seconds: float) -> None:
        delays.append(seconds)

    with LoopbackServer(script) as server:
        judgments = asyncio.run(
            judge_pairs(make_comparisons(1), "m", server.base_url, TEMPLATE, None, both_orders=False,
                        concurrency=1, sleep=record_sleep, base_delay=0.5, max_delay=100, progress=False)
        )  # fmt: skip
    assert len(server.requests) == 5  # four failures, then the answer
    assert judgments[0].verdict == "A"
    assert len(delays) == 4
    for attempt, delay in enumerate(delays):  # base * 2**attempt, jittered into [half, full]
        assert 0.5 * 0.5 * 2**attempt <= delay <= 0.5 * 2**attempt


def test_retries_exhausted_raise_and_non_retryable_fails_at_once():
    with LoopbackServer(lambda r, i: error(500)) as server:
        with pytest.raises(JudgeRequestError, match=r"after 3 attempts.*status 500"):
            judge_pairs_sync(
                make_comparisons(1),
                "m",
                server.base_url,
                TEMPLATE,
                None,
                both_orders=False,
                max_retries=2,
                **FAST,
            )
    assert len(server.requests) == 3
    with LoopbackServer(lambda r, i: error(401, "no such key")) as server:
        with pytest.raises(JudgeRequestError, match=r"after 1 attempt: .*status 401"):
            judge_pairs_sync(
                make_comparisons(1),
                "m",
                server.base_url,
                TEMPLATE,
                None,
                both_orders=False,
                max_retries=5,
                **FAST,
            )
    assert len(server.requests) == 1


def test_error_message_never_shows_the_key():
    echo = {"error": {"message": f"Incorrect API key provided: {SECRET}", "type": "invalid_request_error"}}
    with LoopbackServer(lambda r, i: (401, echo)) as server:
        with pytest.raises(JudgeRequestError, match=r"status 401.*Incorrect API key") as info:
            judge_pairs_sync(
                make_comparisons(1), "m", server.base_url, TEMPLATE, None, both_orders=False, **FAST
            )
    assert SECRET not in str(info.value) and len(server.requests) == 1


def test_retries_on_timeout():
    release = threading.Event()

    def script(request, index):
        if index == 0:
            release.wait(timeout=2)  # longer than the client timeout
        return good_script(request, index)

    with LoopbackServer(script) as server:
        judgments = judge_pairs_sync(
            make_comparisons(1), "m", server.base_url, TEMPLATE, None, both_orders=False, timeout=0.3, **FAST
        )
        release.set()
    assert len(server.requests) == 2 and judgments[0].verdict == "A"


def test_retries_on_connection_error():
    with socket.socket() as sock:  # a loopback port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    delays: list[float] = []

    async def record_sleep(seconds: float) -> None:
        delays.append(seconds)

    with pytest.raises(JudgeRequestError, match=r"after 3 attempts: APIConnectionError"):
        asyncio.run(
            judge_pairs(make_comparisons(1), "m", f"http://127.0.0.1:{port}/v1", TEMPLATE, None,
                        both_orders=False, max_retries=2, sleep=record_sleep, progress=False)
        )  # fmt: skip
    assert len(delays) == 2


# ----------------------------------------------------------------------------------- cache/resume


def test_resume_after_server_fails_forever(tmp_path):
    cache = tmp_path / "cache.jsonl"
    k, comparisons = 4, make_comparisons(5)  # 10 (pair, order) judgments

    def failing(request, index):
        return good_script(request, index) if index < k else error(500)

    with LoopbackServer(failing) as server:
        with pytest.raises(JudgeRequestError):
            judge_pairs_sync(
                comparisons, "m", server.base_url, TEMPLATE, cache, concurrency=1, max_retries=1, **FAST
            )
    first = cache_lines(cache)
    assert len(first) == k
    cached = {(row["pair_id"], row["order"]) for row in first}

    with LoopbackServer(good_script) as server:
        judgments = judge_pairs_sync(
            comparisons, "m", server.base_url, TEMPLATE, cache, concurrency=4, **FAST
        )
    asked = {(f"p{i}", order) for i, order in (shown(r.body) for r in server.requests)}
    assert len(server.requests) == 10 - k and not asked & cached
    rows = cache_lines(cache)
    keys = [(r["pair_id"], r["order"]) for r in rows]
    assert len(keys) == len(set(keys)) == 10
    assert {(j.pair_id, j.order) for j in judgments} == set(keys)
    assert SECRET not in cache.read_text()

    with LoopbackServer(good_script) as server:  # a third run is served entirely from the cache
        again = judge_pairs_sync(comparisons, "m", server.base_url, TEMPLATE, cache, **FAST)
    assert len(server.requests) == 0 and again == judgments


def test_resume_after_cancellation(tmp_path):
    cache = tmp_path / "cache.jsonl"
    k, comparisons = 3, make_comparisons(4)
    hold = threading.Event()

    def stalling(request, index):
        if index >= k:
            hold.wait(timeout=5)
        return good_script(request, index)

    async def interrupted(base_url: str) -> None:
        task = asyncio.ensure_future(
            judge_pairs(comparisons, "m", base_url, TEMPLATE, cache, concurrency=2, **FAST)
        )
        deadline = time.monotonic() + 5
        while len(cache_lines(cache)) < k and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with LoopbackServer(stalling) as server:
        asyncio.run(interrupted(server.base_url))
        hold.set()
    assert len(cache_lines(cache)) == k
    with LoopbackServer(good_script) as server:
        judge_pairs_sync(comparisons, "m", server.base_url, TEMPLATE, cache, **FAST)
    assert len(server.requests) == 8 - k
    keys = [(r["pair_id"], r["order"]) for r in cache_lines(cache)]
    assert len(keys) == len(set(keys)) == 8


def test_cache_drops_truncated_last_line_and_keys_on_model_and_template(tmp_path):
    cache = tmp_path / "cache.jsonl"
    with LoopbackServer(good_script) as server:
        judge_pairs_sync(make_comparisons(2), "m", server.base_url, TEMPLATE, cache, **FAST)
    text = cache.read_text()
    cache.write_text(text + text.splitlines()[0][:25])  # an interrupted write
    assert len(JudgmentCache(cache)) == 4
    assert cache.read_text() == text  # the half line is gone
    with LoopbackServer(good_script) as server:
        judge_pairs_sync(make_comparisons(2), "m", server.base_url, TEMPLATE, cache, **FAST)
        assert len(server.requests) == 0
        judge_pairs_sync(make_comparisons(2), "other-judge", server.base_url, TEMPLATE, cache, **FAST)
        assert len(server.requests) == 4  # another judge model is another key
    assert len(load_judgments(cache, judge_model="m")) == 4 and len(load_judgments(cache)) == 8


def test_load_judgments_is_read_only_and_damaged_middle_line_is_an_error(tmp_path):
    cache = tmp_path / "cache.jsonl"
    rows = [
        {"pair_id": f"p{i}", "order": "AB", "judge_model": "m", "template_id": "t", "category": "math",
         "system_a": "x", "system_b": "y", "reply": "A\u2028", "verdict_shown": "A", "verdict": "A"}
        for i in range(3)
    ]  # fmt: skip
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    cache.write_text(text + '{"pair_id": "p9", "ord', encoding="utf-8")
    assert [j.pair_id for j in load_judgments(cache)] == ["p0", "p1", "p2"]
    assert cache.read_text(encoding="utf-8").endswith('"ord')  # a reader leaves the file alone
    lines = text.split("\n")  # not splitlines(): the replies hold U+2028
    cache.write_text("\n".join([lines[0], "not json", lines[1]]) + "\n", encoding="utf-8")
    with pytest.raises(LatentMergeError, match=r"line 2 is not valid JSON"):
        JudgmentCache(cache)


def test_api_key_from_environment_only(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(LatentMergeError, match=r"api_key_env='MY_KEY'.*MY_KEY is not set") as info:
        judge_pairs_sync(make_comparisons(1), "m", "https://judge.example.invalid/v1", TEMPLATE, None,
                         api_key_env="MY_KEY", **FAST)  # fmt: skip
    assert SECRET not in str(info.value)
    with LoopbackServer(good_script) as server:  # a local server needs no key
        judge_pairs_sync(make_comparisons(1), "m", server.base_url, TEMPLATE, None, **FAST)
    assert len(server.requests) == 2


# ------------------------------------------------------------------------------------ inputs


def test_load_comparisons_joins_on_pair_id(tmp_path):
    def write(name, system, rows):
        path = tmp_path / name
        path.write_text("".join(json.dumps({**r, "system": system}) + "\n" for r in rows))
        return path

    a = write("a.jsonl", "latent", [
        {"pair_id": "x", "question": "qx", "response": "ax", "source": "livebench-math"},
        {"pair_id": "y", "question": "qy", "response": "ay"},
        {"pair_id": "z", "question": "qz", "response": "az", "category": "coding"},
    ])  # fmt: skip
    b = write("b.jsonl", "base", [
        {"pair_id": "y", "question": "qy", "response": "by", "category": "knowledge"},
        {"pair_id": "x", "question": "qx", "response": "bx"},
    ])  # fmt: skip
    with pytest.raises(LatentMergeError, match=r"1 pair_ids only in .*a.jsonl \(e.g. \['z'\]\)"):
        load_comparisons(a, b)
    comparisons = load_comparisons(a, b, on_missing="drop")
    assert comparisons == [
        Comparison("x", "qx", "ax", "bx", "latent", "base", "math"),
        Comparison("y", "qy", "ay", "by", "latent", "base", "knowledge"),
    ]
    bad = write("bad.jsonl", "base", [{"pair_id": "x", "question": "other", "response": "bx"}])
    with pytest.raises(LatentMergeError, match=r"pair_id 'x' has different questions"):
        load_comparisons(a, bad, on_missing="drop")
    noresp = write("noresp.jsonl", "base", [{"pair_id": "x", "question": "qx"}])
    with pytest.raises(LatentMergeError, match=r"noresp.jsonl: line 1: field 'response' is missing"):
        load_comparisons(a, noresp)


# --------------------------------------------------------------------------------------- summary


def _judgments(verdicts, order="AB", category="math", system_a="latent", system_b="base"):
    return [
        Judgment(f"{category}{i}", order, "m", "t", category, system_a, system_b, "", v, v)
        for i, v in enumerate(verdicts)
    ]


def test_bootstrap_ci_matches_normal_approximation():
    n, p = 400, 0.7
    s = summarize(_judgments(["A"] * int(n * p) + ["B"] * int(n * (1 - p))), n_boot=4000, seed=1)
    lo, hi = s["results"]["overall"]["win_rate_no_ties_ci"]
    half = 1.96 * math.sqrt(p * (1 - p) / n)  # Wald interval, independent of the bootstrap
    assert lo == pytest.approx(0.7 - half, abs=0.008) and hi == pytest.approx(0.7 + half, abs=0.008)
    assert s == summarize(_judgments(["A"] * 280 + ["B"] * 120), n_boot=4000, seed=1)  # seeded
    degenerate = summarize(_judgments(["A"] * 10), n_boot=100)["results"]["overall"]
    assert degenerate["win_rate_no_ties_ci"] == [1.0, 1.0]
    assert degenerate["order_consistency"] is None  # no pair was judged in both orders


def test_summarize_rejects_mixed_systems():
    mixed = _judgments(["A"]) + [Judgment("q", "AB", "m", "t", "math", "weight", "base", "", "A", "A")]
    with pytest.raises(LatentMergeError, match=r"mix several system_a values \['latent', 'weight'\]"):
        summarize(mixed)


def test_markdown_table_and_report_files(tmp_path):
    latent = summarize(
        _judgments(["A", "A", "A", "B"]) + _judgments(["B", "B"], category="coding"), n_boot=50
    )
    weight = summarize(
        _judgments(["A", "B"], system_a="weight") + _judgments(["tie"], category="coding", system_a="weight"),
        n_boot=50,
    )
    table = markdown_table({"vs base": [latent, weight]})
    lines = table.strip().splitlines()
    assert lines[0] == "| System | Math | Coding | Overall |"
    # math 3/4 vs 1/2; coding 0/2 vs no decisive vote; overall 3/6 vs 1/2
    assert lines[2] == "| vs base | 0.750 / 0.500 | 0.000 / - | 0.500 / 0.500 |"  # fractions, no %
    paths = write_report(
        {"vs base": [latent, weight]}, tmp_path / "report", series_names=["latent", "weight"]
    )
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(paths["json"].read_text())["vs base"][0]["results"]["math"]["a_wins"] == 3
    assert "latent / weight" in paths["markdown"].read_text()
    assert "%" not in paths["markdown"].read_text()


# ------------------------------------------------------------------------- JudgeBench accuracy runner


def _oracle_and_biased(pairs: list[JudgePair]):
    """complete_fns knowing each pair's correct response (oracle) or always answering 'A' (biased)."""
    correct = {p.question: (p.response_A if p.label == "A>B" else p.response_B) for p in pairs}

    async def oracle(messages):
        text = messages[-1]["content"]
        question = next(q for q in correct if q in text)
        first = text.index("[Answer A]")
        return "A" if text.find(correct[question], first) < text.index("[Answer B]") else "B"

    async def biased(messages):
        return "A"

    async def tie(messages):
        return "C"

    return oracle, biased, tie


def _small_pairs() -> list[JudgePair]:
    if GPT_FILE.is_file():
        real = load_judgebench("gpt", path=GPT_FILE)
        return [p for p in real if p.category == "math"][:3] + [p for p in real if p.category == "coding"][:3]
    return [
        JudgePair(f"id{i}", None, "livebench-math", f"question {i}", "m", f"resp-A-{i}", f"resp-B-{i}", lab)
        for i, lab in enumerate(["A>B", "B>A", "B>A", "A>B"])
    ]


def test_judgebench_accuracy_records_score_with_official_protocol(tmp_path):
    pairs = _small_pairs()
    oracle, biased, tie = _oracle_and_biased(pairs)
    records = judgebench_accuracy_sync(
        pairs, oracle, TEMPLATE, judge_model="oracle", cache_path=tmp_path / "c.jsonl", progress=False
    )
    assert official_accuracy(records)["overall"]["accuracy"] == 1.0
    for pair, record in zip(pairs, records, strict=True):
        assert {k: record[k] for k in pair.to_dict()} == pair.to_dict()
        # JudgeBench stores game 2 unflipped: the oracle's swapped-game decision is the flipped label.
        assert [g["decision"] for g in record["judgments"]] == [
            pair.label,
            "B>A" if pair.label == "A>B" else "A>B",
        ]
        assert record["judgments"][1]["judgment"]["prompt"].index(pair.response_B) < record["judgments"][1][
            "judgment"
        ]["prompt"].index("[Answer B]")
    assert (
        official_accuracy(
            judgebench_accuracy_sync(pairs, biased, TEMPLATE, judge_model="biased", progress=False)
        )["overall"]["accuracy"]
        == 0.0
    )
    assert (
        official_accuracy(judgebench_accuracy_sync(pairs, tie, TEMPLATE, judge_model="tie", progress=False))[
            "overall"
        ]["accuracy"]
        == 0.0
    )

    async def must_not_run(messages):
        raise AssertionError("cached judgments must not be requested again")

    again = judgebench_accuracy_sync(
        pairs, must_not_run, TEMPLATE, judge_model="oracle", cache_path=tmp_path / "c.jsonl", progress=False
    )
    assert again == records


def test_judgebench_accuracy_through_openai_endpoint_with_output_ab_format(tmp_path):
    template = Template(
        "mine",
        "{question}\n(a) {answer_a}\n(b) {answer_b}\nSay Output (a) or Output (b).",
        parser="output_ab",
    )
    pairs = _small_pairs()
    with LoopbackServer(lambda r, i: (200, completion("**Output (a)**"))) as server:
        records = judgebench_accuracy_openai(
            pairs, "m", server.base_url, template, tmp_path / "c.jsonl", progress=False
        )
    assert len(server.requests) == 2 * len(pairs)
    assert all([g["decision"] for g in r["judgments"]] == ["A>B", "A>B"] for r in records)
    assert official_accuracy(records)["overall"]["accuracy"] == 0.0  # pure position bias
    assert SECRET not in (tmp_path / "c.jsonl").read_text()
