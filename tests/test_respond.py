"""`respond`: one answer per JudgeBench question, appended as JSONL with a provenance sidecar; resumable."""

import functools
import json
from pathlib import Path

import pytest
from judgebench_files import CLAUDE_FILE, MISSING
from test_systems import save_tiny_pair, write_system

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.evaluation.judge import load_comparisons, load_responses
from latent_merge_nnsight.evaluation.judgebench.data import category_of
from latent_merge_nnsight.evaluation.respond import meta_path, read_responses
from latent_merge_nnsight.evaluation.respond import respond as _respond
from latent_merge_nnsight.sampling import FINISH_REASONS
from latent_merge_nnsight.systems.loaded import LoadedSystem, load_system
from latent_merge_nnsight.systems.spec import System

# JudgeBench questions run to thousands of characters; the tiny models' context is 256 (one token a
# character). These tests are about resuming and records, so they feed the questions whole, explicitly.
respond = functools.partial(_respond, truncate="none")


def test_the_shared_judgebench_copies_are_present():
    """Every test here reads them; a missing copy fails the run instead of skipping it."""
    assert CLAUDE_FILE.is_file(), MISSING


FIELDS = {
    "pair_id",
    "original_id",
    "source",
    "category",
    "question",
    "response",
    "system",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
}


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


DATASET = rows(CLAUDE_FILE) if CLAUDE_FILE.is_file() else []


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = save_tiny_pair(tmp_path_factory.mktemp("respond-models"))
    write_system(root, "tiny-base", kind="single", sampling={"max_new_tokens": 3})
    write_system(root, "tiny-other", kind="single", sampling={"max_new_tokens": 2})
    return root


@pytest.fixture(scope="module")
def loaded(models) -> LoadedSystem:
    return load_system(models / "tiny-base.yaml")


class Spy:
    """Wraps `LoadedSystem.complete`: records the questions of each call; can fail on call number k."""

    def __init__(self, system: LoadedSystem, fail_on_call: int | None = None) -> None:
        self.system, self.fail_on_call = system, fail_on_call
        self.inner = functools.partial(LoadedSystem.complete, system)  # the real method, never another spy
        self.calls: list[list[str]] = []

    def __call__(self, prompts, **overrides):
        if self.fail_on_call is not None and len(self.calls) + 1 == self.fail_on_call:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C during this batch
        self.calls.append([chat[-1]["content"] for chat in prompts])
        assert all(len(chat) == 1 and chat[0]["role"] == "user" for chat in prompts)
        return self.inner(prompts, **overrides)

    @property
    def questions(self) -> list[str]:
        return [q for call in self.calls for q in call]


@pytest.fixture
def spy(loaded, monkeypatch):
    spy = Spy(loaded)
    monkeypatch.setattr(loaded, "complete", spy)
    return spy


# --------------------------------------------------------------------------------------- tests


def test_respond_writes_one_line_per_pair_and_a_provenance_sidecar(loaded, spy, tmp_path):
    out = tmp_path / "responses.jsonl"
    result = respond(loaded, split="claude", out=out, data=CLAUDE_FILE, limit=3, batch_size=2, progress=False)
    lines = rows(out)
    assert [r["pair_id"] for r in lines] != []
    assert sorted(r["pair_id"] for r in lines) == sorted(r["pair_id"] for r in DATASET[:3])
    assert (result.total, result.answered, result.skipped) == (3, 3, 0)
    by_id = {r["pair_id"]: r for r in DATASET}
    for line in lines:
        assert set(line) == FIELDS
        raw = by_id[line["pair_id"]]
        assert (line["question"], line["source"], line["original_id"]) == (
            raw["question"],
            raw["source"],
            raw["original_id"],
        )
        assert line["category"] == category_of(raw["source"]) and line["system"] == "tiny-base"
        assert line["finish_reason"] in FINISH_REASONS and 1 <= line["completion_tokens"] <= 3
        assert line["prompt_tokens"] == loaded.count_prompt_tokens(
            [{"role": "user", "content": raw["question"]}]
        )
    # batched answers equal answering each question alone (the chat template applied either way)
    assert [len(c) for c in spy.calls] == [2, 1]  # batch_size=2, longest questions first
    assert len(spy.calls[0][0]) >= len(spy.calls[0][1]) >= len(spy.calls[1][0])
    padded = spy.calls[0][1]  # the shorter question of the first batch was padded
    alone = spy.inner([[{"role": "user", "content": padded}]])[0].text
    assert [line["response"] for line in lines if line["question"] == padded] == [alone]
    meta = json.loads(meta_path(out).read_text())
    assert meta_path(out).name == "responses.jsonl.meta.json"
    assert meta["split"] == "claude" and meta["data"] == str(CLAUDE_FILE)
    assert (
        meta["provenance"]["system"]
        == System.from_file(Path(loaded.config._base_dir) / "tiny-base.yaml").to_dict()
    )
    assert meta["provenance"]["sampling"]["max_new_tokens"] == 3
    assert {"torch", "transformers", "nnsight", "latent_merge_nnsight"} <= set(meta["provenance"]["versions"])
    # the judge reads the file as one system's responses
    responses = load_responses(out)
    assert set(responses) == {r["pair_id"] for r in DATASET[:3]}


def test_question_shared_by_two_pairs_is_generated_once_and_written_for_both(loaded, spy, tmp_path):
    seen: dict[str, list[dict]] = {}
    for r in DATASET:
        seen.setdefault(r["question"], []).append(r)
    twins = next(group for group in seen.values() if len(group) == 2)
    others = [r for r in DATASET if r["question"] != twins[0]["question"]][:2]
    data = tmp_path / "subset.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [others[0], twins[0], others[1], twins[1]]))
    out = tmp_path / "out.jsonl"
    respond(loaded, split="claude", out=out, data=data, batch_size=8, progress=False)
    assert sorted(spy.questions) == sorted(
        [others[0]["question"], others[1]["question"], twins[0]["question"]]
    )
    lines = {r["pair_id"]: r for r in rows(out)}
    assert len(lines) == 4
    assert lines[twins[0]["pair_id"]]["response"] == lines[twins[1]["pair_id"]]["response"]


def test_rerun_with_a_larger_limit_answers_only_the_new_pairs(loaded, spy, tmp_path):
    out = tmp_path / "r.jsonl"
    respond(loaded, split="claude", out=out, data=CLAUDE_FILE, limit=3, batch_size=3, progress=False)
    before = out.read_bytes()
    spy.calls.clear()
    result = respond(loaded, split="claude", out=out, data=CLAUDE_FILE, limit=6, batch_size=3, progress=False)
    assert (result.answered, result.skipped) == (3, 3)
    # pair 5 repeats pair 1's question (the claude split's one shared question): its answer is reused
    new_questions = {r["question"] for r in DATASET[3:6]} - {r["question"] for r in DATASET[:3]}
    assert len(new_questions) == 2 and sorted(spy.questions) == sorted(new_questions)
    assert out.read_bytes().startswith(before)  # earlier answers untouched
    ids = [r["pair_id"] for r in rows(out)]
    assert len(ids) == len(set(ids)) == 6 and set(ids) == {r["pair_id"] for r in DATASET[:6]}


def test_interrupted_run_resumes_with_nothing_lost_or_repeated(loaded, monkeypatch, tmp_path):
    out = tmp_path / "i.jsonl"
    failing = Spy(loaded, fail_on_call=2)
    monkeypatch.setattr(loaded, "complete", failing)
    with pytest.raises(KeyboardInterrupt):
        respond(loaded, split="claude", out=out, data=CLAUDE_FILE, limit=4, batch_size=2, progress=False)
    first = rows(out)
    assert [r["question"] for r in first] == failing.calls[0]  # the finished batch is on disk
    resumed = Spy(loaded)
    monkeypatch.setattr(loaded, "complete", resumed)
    respond(loaded, split="claude", out=out, data=CLAUDE_FILE, limit=4, batch_size=2, progress=False)
    left = {r["question"] for r in DATASET[:4]} - {r["question"] for r in first}
    assert sorted(resumed.questions) == sorted(left)
    ids = [r["pair_id"] for r in rows(out)]
    assert len(ids) == len(set(ids)) == 4 and set(ids) == {r["pair_id"] for r in DATASET[:4]}


def test_half_written_last_line_is_cut_and_that_pair_answered_again(loaded, spy, tmp_path):
    out = tmp_path / "t.jsonl"
    respond(loaded, split="claude", out=out, data=CLAUDE_FILE, limit=3, progress=False)
    text = out.read_text(encoding="utf-8")
    keep, last = text.rstrip("\n").rsplit("\n", 1)
    out.write_text(keep + "\n" + last[: len(last) // 2], encoding="utf-8")  # died mid-write
    assert len(read_responses(out)) == 2  # reading alone drops the damaged line
    spy.calls.clear()
    respond(loaded, split="claude", out=out, data=CLAUDE_FILE, limit=3, progress=False)
    assert spy.questions == [json.loads(last)["question"]]
    ids = [r["pair_id"] for r in rows(out)]  # every line parses again
    assert sorted(ids) == sorted(r["pair_id"] for r in DATASET[:3])


def test_everything_answered_loads_no_model(models, loaded, tmp_path, monkeypatch):
    out = tmp_path / "done.jsonl"
    respond(loaded, split="claude", out=out, data=CLAUDE_FILE, limit=2, progress=False)

    def no_loading(self, config):
        raise AssertionError("a model was loaded although nothing was left to answer")

    monkeypatch.setattr(LoadedSystem, "__init__", no_loading)
    result = respond(
        models / "tiny-base.yaml", split="claude", out=out, data=CLAUDE_FILE, limit=2, progress=False
    )
    assert (result.answered, result.skipped) == (0, 2)


def test_answers_of_another_system_or_split_are_never_mixed(models, loaded, tmp_path):
    out = tmp_path / "mix.jsonl"
    respond(loaded, split="claude", out=out, data=CLAUDE_FILE, limit=1, progress=False)
    with pytest.raises(
        LatentMergeError, match=r"system differs .*fields \['name', 'sampling'\].*another --out"
    ):
        respond(
            models / "tiny-other.yaml", split="claude", out=out, data=CLAUDE_FILE, limit=2, progress=False
        )
    with pytest.raises(LatentMergeError, match=r"split='gpt' but .* records split 'claude'"):
        respond(loaded, split="gpt", out=out, data=CLAUDE_FILE, limit=2, progress=False)
    meta_path(out).unlink()  # without the sidecar the lines still name their system
    with pytest.raises(LatentMergeError, match=r"holds answers of system 'tiny-base', not 'tiny-other'"):
        respond(
            models / "tiny-other.yaml", split="claude", out=out, data=CLAUDE_FILE, limit=2, progress=False
        )
    assert len(rows(out)) == 1


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"limit": 0}, r"limit=0; expected a positive int or None"),
        ({"limit": True}, r"limit=True"),
        ({"batch_size": 0}, r"batch_size=0; expected an int >= 1"),
        ({"split": "llama"}, r"split='llama' is not a JudgeBench split"),
    ],
)
def test_bad_arguments_raise_naming_the_parameter(loaded, tmp_path, kwargs, pattern):
    args = {"split": "claude", "out": tmp_path / "x.jsonl", "data": CLAUDE_FILE, "progress": False} | kwargs
    with pytest.raises(LatentMergeError, match=pattern):
        respond(loaded, **args)
    assert not (tmp_path / "x.jsonl").exists()


def test_two_systems_responses_join_for_the_judge(models, loaded, tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    respond(loaded, split="claude", out=a, data=CLAUDE_FILE, limit=2, progress=False)
    respond(models / "tiny-other.yaml", split="claude", out=b, data=CLAUDE_FILE, limit=2, progress=False)
    comparisons = load_comparisons(a, b)
    assert [c.pair_id for c in comparisons] == [json.loads(x)["pair_id"] for x in a.read_text().splitlines()]
    assert {(c.system_a, c.system_b) for c in comparisons} == {("tiny-base", "tiny-other")}
    assert all(
        c.category == category_of(c_row["source"]) for c, c_row in zip(comparisons, rows(a), strict=True)
    )


def test_questions_over_the_context_are_refused_or_cut_by_an_explicit_recorded_choice(models, tmp_path):
    out = tmp_path / "r.jsonl"
    with pytest.raises(LatentMergeError, match="--truncate left"):
        _respond(models / "tiny-base.yaml", out=out, data=CLAUDE_FILE, limit=2, progress=False)
    assert not out.exists() or not out.read_text()  # refused before anything was generated
    _respond(models / "tiny-base.yaml", out=out, data=CLAUDE_FILE, limit=2, progress=False, truncate="left")
    lines = rows(out)
    assert [r["question"] for r in lines] == [d["question"] for d in DATASET[:2]]  # the original text
    assert all(r["truncated_tokens"] > 0 for r in lines)
    assert all(r["prompt_tokens"] <= 256 - 3 for r in lines)  # context minus max_new_tokens
    assert json.loads(meta_path(out).read_text())["truncate"] == "left"
    with pytest.raises(LatentMergeError, match="truncate"):  # a rerun cutting another way must not mix
        _respond(
            models / "tiny-base.yaml", out=out, data=CLAUDE_FILE, limit=3, progress=False, truncate="none"
        )
