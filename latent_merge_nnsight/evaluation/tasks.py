"""Synthetic chat tasks with exact-match answers, for the shipped toy model pair and its demos.

Four categories, named like JudgeBench's, each a seeded generator of `Example`s:

- ``knowledge``: recall from a fixed table of made-up facts (country -> capital, element -> colour).
  The table is the same for every seed (``FACT_SEED``); a seed only picks which questions are asked.
- ``reasoning``: a 2-3 step word problem ("Mia has 47 coins, gets 18, loses 9. How many now?").
  The reference response writes a short scratchpad (``47+18=65, 65-9=56.``) before the answer.
- ``math``: addition or subtraction of two 2-digit numbers, answered directly.
- ``coding``: string manipulation (reverse, sort the letters, uppercase, repeat twice).

Every response ends with a line ``Answer: <answer>``; `extract_answer` takes what follows the last
``Answer:`` and `score` compares it with the reference. This module holds the data and the scoring
only: `analysis.TaskAccuracy` generates the answers (with `lmn.generate`) and scores them here.

**What "held-out" means.** For reasoning, math and coding a problem (its numbers and operations, or its
operation and word, whatever the wording) is in the eval split when a SHA-256 hash of it falls in one
bucket of five, so an eval problem never appears in training under any phrasing. Recall cannot be
tested on facts never taught, so for knowledge the split is by (fact, phrasing): each fact has eight
question templates, one of them (chosen by hashing the fact) is held out for that fact and the other
seven are trained. Every fact and every template is seen in training, but never that fact asked that
way: the eval checks that the fact was learnt rather than one question string memorised. All eight
phrasings end with the subject: with two of eight putting it mid-sentence ("X has which capital?",
"Which colour does X have?"), an earlier toy base recalled 0.85 of held-out facts, and nearly every
miss was in those word orders.
"""

import hashlib
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from latent_merge_nnsight.errors import LatentMergeError

CATEGORIES: tuple[str, ...] = ("knowledge", "reasoning", "math", "coding")
SPLITS: tuple[str, ...] = ("train", "eval")
Split = Literal["train", "eval"]

ANSWER_PREFIX = "Answer:"
FACT_SEED = 20240607
"""Seed of the fact table; fixed so that every seed of every generator asks about the same facts."""

EVAL_BUCKETS = 5
"""One problem in `EVAL_BUCKETS` (by hash) belongs to the eval split."""

MAX_NEW_TOKENS: dict[str, int] = {"knowledge": 24, "reasoning": 64, "math": 16, "coding": 24}
"""Generation budget per category, comfortably above the longest reference response."""


@dataclass(frozen=True)
class Example:
    """One task instance: the user prompt, the reference answer and the full reference response."""

    category: str
    prompt: str
    answer: str
    target: str


def direct_target(answer: str) -> str:
    """The response that states only the final answer (no scratchpad)."""
    return f"{ANSWER_PREFIX} {answer}"


def chat_messages(prompt: str) -> list[dict[str, str]]:
    """The chat the toy models are trained on: one user turn, no system prompt."""
    return [{"role": "user", "content": prompt}]


def check_category(category: str) -> str:
    """Return `category` if it is known, else raise `LatentMergeError` listing the valid names."""
    if category not in CATEGORIES:
        raise LatentMergeError(
            f"category={category!r} is not a task category; expected one of: {', '.join(CATEGORIES)}"
        )
    return category


def _bucket(key: str, buckets: int) -> int:
    """A stable hash of `key` into `range(buckets)` (SHA-256, independent of PYTHONHASHSEED)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % buckets


def problem_split(category: str, key: str) -> Split:
    """Which split a problem belongs to, from its canonical key (see the module docstring)."""
    return "eval" if _bucket(f"{category}|{key}", EVAL_BUCKETS) == 0 else "train"


# ---------------------------------------------------------------------------------------------------
# The fact table (knowledge)

_COUNTRY_TEMPLATES = (
    "What is the capital of {x}?",
    "Name the capital city of {x}.",
    "Which city is the capital of {x}?",
    "Tell me the capital of {x}.",
    "Capital of {x}?",
    "I need the capital of {x}.",
    "Give the capital city of {x}.",
    "Which town is the capital of {x}?",
)
_ELEMENT_TEMPLATES = (
    "What colour is {x}?",
    "Name the colour of {x}.",
    "Which colour is {x}?",
    "Tell me the colour of {x}.",
    "What is the colour of {x}?",
    "Colour of {x}?",
    "I need the colour of {x}.",
    "Give the colour of {x}.",
)
_COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "grey", "pink")
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "tr", "st", "kr")
_VOWELS = ("a", "e", "i", "o", "u")
_N_FACTS_PER_RELATION = 48


@dataclass(frozen=True)
class Fact:
    """One fact of the table: `relation` is "capital" or "colour"."""

    relation: str
    subject: str
    answer: str

    @property
    def templates(self) -> tuple[str, ...]:
        return _COUNTRY_TEMPLATES if self.relation == "capital" else _ELEMENT_TEMPLATES

    @property
    def eval_template(self) -> int:
        """Index of the template held out for this fact."""
        return _bucket(f"knowledge|{self.relation}|{self.subject}", len(self.templates))


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))


def _build_fact_table() -> tuple[Fact, ...]:
    rng = random.Random(FACT_SEED)
    used: set[str] = set()

    def fresh(make: Callable[[], str]) -> str:
        while True:
            w = make()
            if w not in used:
                used.add(w)
                return w

    facts = []
    for _ in range(_N_FACTS_PER_RELATION):
        country = fresh(lambda: _word(rng, 2).capitalize() + rng.choice(("ia", "land", "or", "an")))
        capital = fresh(lambda: _word(rng, rng.choice((2, 3))).capitalize())
        facts.append(Fact("capital", country, capital))
    for _ in range(_N_FACTS_PER_RELATION):
        element = fresh(lambda: _word(rng, 2)[:-1] + "ium")
        facts.append(Fact("colour", element, rng.choice(_COLOURS)))
    return tuple(facts)


FACTS: tuple[Fact, ...] = _build_fact_table()
"""The fixed synthetic fact table (48 made-up countries with capitals, 48 elements with colours)."""


def _knowledge(rng: random.Random, split: Split) -> tuple[str, str, str]:
    fact = rng.choice(FACTS)
    held_out = fact.eval_template
    if split == "eval":
        t = held_out
    else:
        t = rng.choice([i for i in range(len(fact.templates)) if i != held_out])
    return fact.templates[t].format(x=fact.subject), fact.answer, direct_target(fact.answer)


# ---------------------------------------------------------------------------------------------------
# Problem generators: each returns (key, prompt, answer, target)

_NAMES = ("Mia", "Tom", "Ana", "Leo", "Ivy", "Max", "Zoe", "Sam", "Eli", "Kai")
_ITEMS = ("coins", "apples", "pens", "cards", "shells", "stamps", "beads", "books")


def _reasoning(rng: random.Random) -> tuple[str, str, str, str]:
    value = rng.randint(10, 99)
    start, steps, clauses, pad, ops = value, rng.choice((2, 3)), [], [], []
    for _ in range(steps):
        amount = rng.randint(2, 49)
        sign = "-" if rng.random() < 0.5 and value - amount >= 0 else "+"
        new = value - amount if sign == "-" else value + amount
        clauses.append(f"{'loses' if sign == '-' else 'gets'} {amount}")
        pad.append(f"{value}{sign}{amount}={new}")
        ops.append(f"{sign}{amount}")
        value = new
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    prompt = f"{name} has {start} {item}, {', '.join(clauses)}. How many now?"
    answer = str(value)
    return f"{start}{''.join(ops)}", prompt, answer, f"{', '.join(pad)}.\n{direct_target(answer)}"


_MATH_TEMPLATES = ("Compute {e}.", "What is {e}?", "Calculate {e}.")


def _math(rng: random.Random) -> tuple[str, str, str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        expr, value = f"{a}+{b}", a + b
    else:
        a, b = max(a, b), min(a, b)
        expr, value = f"{a}-{b}", a - b
    prompt = rng.choice(_MATH_TEMPLATES).format(e=expr)
    return expr, prompt, str(value), direct_target(str(value))


_CODING_OPS: dict[str, tuple[tuple[str, ...], Callable[[str], str]]] = {
    "reverse": (("Reverse the string '{w}'.", "Write '{w}' backwards."), lambda w: w[::-1]),
    "sort": (
        ("Sort the letters of '{w}'.", "Put the letters of '{w}' in order."),
        lambda w: "".join(sorted(w)),
    ),
    "upper": (("Uppercase the string '{w}'.", "Write '{w}' in capitals."), str.upper),
    "repeat": (("Repeat '{w}' twice.", "Write '{w}' two times in a row."), lambda w: w + w),
}


def _coding(rng: random.Random) -> tuple[str, str, str, str]:
    op = rng.choice(sorted(_CODING_OPS))
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6)))
    templates, fn = _CODING_OPS[op]
    answer = fn(word)
    return f"{op}:{word}", rng.choice(templates).format(w=word), answer, direct_target(answer)


_PROBLEMS: dict[str, Callable[[random.Random], tuple[str, str, str, str]]] = {
    "reasoning": _reasoning,
    "math": _math,
    "coding": _coding,
}


def sample_example(category: str, rng: random.Random, split: Split) -> Example:
    """Draw one example of `category` from `split`, using (and advancing) `rng`."""
    check_category(category)
    if split not in SPLITS:
        raise LatentMergeError(
            f"split={split!r} is not a split; expected one of: {', '.join(SPLITS)}",
            param="split",
            value=split,
        )
    if category == "knowledge":
        prompt, answer, target = _knowledge(rng, split)
        return Example(category, prompt, answer, target)
    while True:
        key, prompt, answer, target = _PROBLEMS[category](rng)
        if problem_split(category, key) == split:
            return Example(category, prompt, answer, target)


def knowledge_pool_size(split: Split) -> int:
    """How many distinct knowledge questions `split` holds (one per fact for eval, seven for train)."""
    if split == "eval":
        return len(FACTS)
    return sum(len(f.templates) - 1 for f in FACTS)


def make_examples(category: str, n: int, seed: int, split: Split) -> list[Example]:
    """`n` distinct examples (distinct prompts) of `category` from `split`, reproducible from `seed`.

    Raises `LatentMergeError` if `n` is negative or exceeds the distinct questions the split holds
    (only possible for knowledge: see `knowledge_pool_size`).
    """
    check_category(category)
    if split not in SPLITS:
        raise LatentMergeError(
            f"split={split!r} is not a split; expected one of: {', '.join(SPLITS)}",
            param="split",
            value=split,
        )
    if not isinstance(n, int) or n < 0:
        raise LatentMergeError(f"n={n!r} must be an integer >= 0", param="n", value=n)
    if category == "knowledge" and n > knowledge_pool_size(split):
        raise LatentMergeError(
            f"n={n} exceeds the {knowledge_pool_size(split)} distinct knowledge questions of "
            f"split={split!r}; expected 0 <= n <= {knowledge_pool_size(split)}"
        )
    rng = random.Random(f"{category}:{split}:{seed}")
    seen: set[str] = set()
    out: list[Example] = []
    while len(out) < n:
        ex = sample_example(category, rng, split)
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            out.append(ex)
    return out


def make_eval_set(category: str, n: int, seed: int = 0) -> list[Example]:
    """`n` held-out examples of `category` (never seen in training by the zoo models)."""
    return make_examples(category, n, seed, "eval")


def make_train_set(category: str, n: int, seed: int = 0) -> list[Example]:
    """`n` training examples of `category`."""
    return make_examples(category, n, seed, "train")


# ---------------------------------------------------------------------------------------------------
# Scoring

_ANSWER_RE = re.compile(re.escape(ANSWER_PREFIX), re.IGNORECASE)
_INT_RE = re.compile(r"[-+]?\d+")
_QUOTES = ("'", '"', "`")


def extract_answer(text: str) -> str | None:
    """The final answer in `text`: the first non-blank line after the last "Answer:" (any case).

    Surrounding whitespace, one trailing period and one pair of matching quotes are removed.
    Returns None when there is no "Answer:" or nothing follows it.
    """
    matches = list(_ANSWER_RE.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end() :].strip()
    if not rest:
        return None
    line = rest.split("\n", 1)[0].strip()
    if line.endswith("."):
        line = line[:-1].rstrip()
    if len(line) >= 2 and line[0] == line[-1] and line[0] in _QUOTES:
        line = line[1:-1].strip()
    return line or None


def score(category: str, output: str, answer: str) -> bool:
    """Whether `output` (a model response) gives `answer` for a task of `category`.

    math and reasoning compare the first integer of the extracted answer ("56 coins" counts as 56);
    knowledge compares case-insensitively; coding compares exactly (uppercasing is one of its tasks).
    A missing answer is wrong.
    """
    check_category(category)
    got = extract_answer(output)
    if got is None:
        return False
    if category in ("math", "reasoning"):
        m = _INT_RE.match(got)
        return m is not None and int(m.group()) == int(answer)
    if category == "knowledge":
        return got.casefold() == answer.strip().casefold()
    return got == answer


def accuracy(examples: Sequence[Example], outputs: Sequence[str]) -> dict[str, float]:
    """Exact-match accuracy per category of `outputs` against `examples` (same order), each in [0, 1]."""
    if len(examples) != len(outputs):
        raise LatentMergeError(
            f"outputs has {len(outputs)} entries but examples has {len(examples)}; expected the same length"
        )
    hits: dict[str, list[bool]] = {}
    for ex, out in zip(examples, outputs, strict=True):
        hits.setdefault(ex.category, []).append(score(ex.category, out, ex.answer))
    return {c: sum(h) / len(h) for c, h in hits.items()}
