"""Tests of the synthetic toy tasks: answer extraction, scoring, seeding and held-out splits."""

import re

import pytest

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.evaluation import tasks
from latent_merge_nnsight.evaluation.tasks import (
    CATEGORIES,
    Example,
    accuracy,
    extract_answer,
    make_eval_set,
    make_examples,
    make_train_set,
    score,
)

# ------------------------------------------------------------------------------------------------
# extract_answer / score on hand-written outputs


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Answer: 42", "42"),
        ("Let me think: 40+2=42.\nAnswer: 42", "42"),
        ("Answer: 41\nWait, I made an error.\nAnswer: 42\n", "42"),  # the last one counts
        ("   answer:    Velmora.   ", "Velmora"),  # any case, stray whitespace, trailing period
        ("ANSWER:\n\n  tzmqk  \nthat is all", "tzmqk"),  # first non-blank line after the marker
        ("Answer: 'kmqtz'", "kmqtz"),  # one pair of quotes removed
        ("Answer: `abc`.", "abc"),
        ("Answer: 56 coins", "56 coins"),  # extra text kept; score() reads the number
        ("The answer is 42", None),  # no marker
        ("Answer:   \n  ", None),  # marker with nothing after it
        ("Answer: 7\nAnswer:", None),  # the last marker is empty
        ("", None),
    ],
)
def test_extract_answer_handles_tricky_outputs(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("category", "output", "answer", "expected"),
    [
        ("math", "Answer: 56", "56", True),
        ("math", "Answer: 56 coins.", "56", True),
        ("math", "Answer: 560", "56", False),
        ("math", "Answer: 5", "56", False),
        ("math", "56", "56", False),  # no "Answer:" means no answer
        ("math", "Answer: -3", "-3", True),
        ("reasoning", "47+18=65, 65-9=56.\nAnswer: 56", "56", True),
        ("reasoning", "47+18=65, 65-9=56.\nAnswer: 65-9", "56", False),
        ("reasoning", "Answer: 56\nhmm\nAnswer: 57", "56", False),
        ("knowledge", "Answer: velmora", "Velmora", True),  # recall is case-insensitive
        ("knowledge", "Answer: Velmoran", "Velmora", False),
        ("coding", "Answer: KQMZT", "KQMZT", True),
        ("coding", "Answer: kqmzt", "KQMZT", False),  # case matters for string tasks
        ("coding", "Answer: 'tzmqk'.", "tzmqk", True),
        ("coding", "Answer:", "tzmqk", False),
    ],
)
def test_score_compares_the_extracted_answer(category: str, output: str, answer: str, expected: bool) -> None:
    assert score(category, output, answer) is expected


def test_score_rejects_unknown_category_listing_the_valid_ones() -> None:
    with pytest.raises(LatentMergeError, match=r"category='maths'.*knowledge, reasoning, math, coding"):
        score("maths", "Answer: 1", "1")


def test_accuracy_per_category_counts_hits() -> None:
    examples = [
        Example("math", "What is 1+1?", "2", "Answer: 2"),
        Example("math", "What is 2+2?", "4", "Answer: 4"),
        Example("coding", "Reverse the string 'ab'.", "ba", "Answer: ba"),
    ]
    assert accuracy(examples, ["Answer: 2", "Answer: 5", "Answer: ba"]) == {"math": 0.5, "coding": 1.0}
    with pytest.raises(LatentMergeError, match="outputs has 2 entries but examples has 3"):
        accuracy(examples, ["Answer: 2", "Answer: 4"])


# ------------------------------------------------------------------------------------------------
# Generators: references recomputed independently from the prompt text


def _solve(ex: Example) -> str:
    """Recompute the answer from the prompt alone (a second implementation, by parsing)."""
    if ex.category == "math":
        a, op, b = re.search(r"(\d+)([+-])(\d+)", ex.prompt).groups()
        return str(int(a) + int(b) if op == "+" else int(a) - int(b))
    if ex.category == "coding":
        word = re.search(r"'([a-z]+)'", ex.prompt).group(1)
        if "backwards" in ex.prompt or ex.prompt.startswith("Reverse"):
            return "".join(word[i] for i in range(len(word) - 1, -1, -1))
        if "capitals" in ex.prompt or ex.prompt.startswith("Uppercase"):
            return "".join(chr(ord(c) - 32) for c in word)
        if "twice" in ex.prompt or "two times" in ex.prompt:
            return f"{word}{word}"
        assert "order" in ex.prompt or ex.prompt.startswith("Sort")
        counts = {c: word.count(c) for c in word}
        return "".join(c * counts[c] for c in "abcdefghijklmnopqrstuvwxyz" if c in counts)
    if ex.category == "reasoning":
        total = int(re.search(r"has (\d+)", ex.prompt).group(1))
        for verb, n in re.findall(r"(gets|loses) (\d+)", ex.prompt):
            total += int(n) if verb == "gets" else -int(n)
        return str(total)
    raise AssertionError(ex.category)


@pytest.mark.parametrize("category", ["reasoning", "math", "coding"])
@pytest.mark.parametrize("split", ["train", "eval"])
def test_generated_answers_match_an_independent_solver(category: str, split: str) -> None:
    for ex in make_examples(category, 150, seed=11, split=split):
        assert ex.category == category
        assert ex.answer == _solve(ex), ex
        assert extract_answer(ex.target) == ex.answer  # the reference response scores as correct
        assert score(category, ex.target, ex.answer)


def test_reasoning_scratchpad_steps_are_correct_and_chain() -> None:
    for ex in make_eval_set("reasoning", 100, seed=2):
        pad, last_line = ex.target.rsplit("\n", 1)
        assert last_line == f"Answer: {ex.answer}"
        steps = re.findall(r"(\d+)([+-])(\d+)=(\d+)", pad)
        assert 2 <= len(steps) <= 3
        running = int(re.search(r"has (\d+)", ex.prompt).group(1))
        for a, op, b, c in steps:
            assert int(a) == running
            running = int(a) + int(b) if op == "+" else int(a) - int(b)
            assert running == int(c) >= 0
        assert str(running) == ex.answer


def test_knowledge_answers_are_consistent_across_phrasings_and_splits() -> None:
    answers: dict[str, set[str]] = {}
    subjects = {f.subject for f in tasks.FACTS}
    for ex in make_train_set("knowledge", 200, seed=0) + make_eval_set("knowledge", 96, seed=0):
        (subject,) = [s for s in subjects if re.search(rf"\b{s}\b", ex.prompt)]
        answers.setdefault(subject, set()).add(ex.answer)
        assert ex.target == f"Answer: {ex.answer}"
    assert all(len(a) == 1 for a in answers.values())
    assert len(tasks.FACTS) == len(subjects) == 96  # made-up names never collide


@pytest.mark.parametrize("category", CATEGORIES)
def test_generators_are_seeded(category: str) -> None:
    assert make_eval_set(category, 30, seed=5) == make_eval_set(category, 30, seed=5)
    assert make_train_set(category, 30, seed=5) == make_train_set(category, 30, seed=5)
    assert make_eval_set(category, 30, seed=5) != make_eval_set(category, 30, seed=6)


@pytest.mark.parametrize("category", CATEGORIES)
def test_examples_within_a_set_are_distinct(category: str) -> None:
    prompts = [e.prompt for e in make_eval_set(category, 60, seed=1)]
    assert len(set(prompts)) == 60


def _problem(ex: Example) -> str:
    """The problem behind a prompt, whatever its wording (numbers and operations, or op and word)."""
    if ex.category == "coding":
        word = re.search(r"'([a-z]+)'", ex.prompt).group(1)
        return f"{_solve(ex)}|{word}"
    return " ".join(re.findall(r"\d+|gets|loses|[+-]", ex.prompt))


@pytest.mark.parametrize("category", ["reasoning", "math", "coding"])
def test_train_and_eval_problems_are_disjoint(category: str) -> None:
    train = {_problem(e) for e in make_train_set(category, 1500, seed=3)}
    evals = {_problem(e) for e in make_eval_set(category, 400, seed=3)}
    assert train.isdisjoint(evals)


def test_knowledge_eval_holds_out_one_phrasing_per_fact() -> None:
    train = make_train_set("knowledge", tasks.knowledge_pool_size("train"), seed=0)
    evals = make_eval_set("knowledge", tasks.knowledge_pool_size("eval"), seed=0)
    assert {e.prompt for e in train}.isdisjoint({e.prompt for e in evals})
    assert (len(train), len(evals)) == (7 * 96, 96)
    for fact in tasks.FACTS:
        asked = [t.format(x=fact.subject) for t in fact.templates]
        in_train = [q for q in asked if q in {e.prompt for e in train}]
        in_eval = [q for q in asked if q in {e.prompt for e in evals}]
        assert len(in_train) == 7 and len(in_eval) == 1  # every fact is taught, one phrasing held out
    # the held-out phrasing differs between facts, so every template is also seen in training
    assert len({f.eval_template for f in tasks.FACTS}) == 8


def test_eval_split_is_about_one_fifth_of_problems() -> None:
    keys = [f"{a}+{b}" for a in range(10, 50) for b in range(10, 60)]
    share = sum(tasks.problem_split("math", k) == "eval" for k in keys) / len(keys)
    assert 0.17 < share < 0.23  # 2,000 hashed keys: binomial sd is 0.009


def test_make_examples_rejects_bad_arguments() -> None:
    with pytest.raises(LatentMergeError, match=r"n=97 exceeds the 96 distinct knowledge questions"):
        make_eval_set("knowledge", 97)
    with pytest.raises(LatentMergeError, match=r"n=-1 must be an integer >= 0"):
        make_eval_set("math", -1)
    with pytest.raises(LatentMergeError, match=r"split='test' is not a split; expected one of: train, eval"):
        make_examples("math", 3, 0, "test")
    with pytest.raises(LatentMergeError, match=r"category='poetry'"):
        make_eval_set("poetry", 3)
