"""JudgeBench's official protocol: the two-game accuracy of a judge on labelled pairs, and its output files.

A judge is run twice per pair, once as (A, B) and once with the responses swapped; JudgeBench stores the
second game's decision as the judge said it (in the swapped frame), so it is flipped before it is compared
with the label. Each game then scores +1 when it agrees with the label, -1 when it says the opposite and 0
for a tie or no decision; a pair is correct when the sum is positive. Ties therefore never make a pair
correct on their own, and a judge that flips with the order gets the pair wrong.
"""

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.evaluation.judgebench.data import CATEGORIES, LABELS, category_of, read_jsonl

DECISIONS: tuple[str, ...] = ("A>B", "B>A", "A=B")


def flip_decision(decision: str | None) -> str | None:
    """Swap ``A>B`` and ``B>A``; a tie (``A=B``) or ``None`` is unchanged."""
    return {"A>B": "B>A", "B>A": "A>B"}.get(decision, decision) if decision is not None else None


def verdict_to_decision(verdict: str | None) -> str | None:
    """``"A"`` -> ``"A>B"``, ``"B"`` -> ``"B>A"``, ``"tie"`` -> ``"A=B"``, ``None`` -> ``None``."""
    return {"A": "A>B", "B": "B>A", "tie": "A=B", None: None}[verdict]


def _check_official_record(record: object, where: str) -> tuple[str, str, list[str | None]]:
    """Return (category, label, decisions as stored) of one official output record, or raise."""
    if not isinstance(record, Mapping):
        raise LatentMergeError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for field in ("label", "source", "judgments"):
        if field not in record:
            raise LatentMergeError(
                f"{where}: field {field!r} is missing; an official output needs label, source, judgments"
            )
    label = record["label"]
    if label not in LABELS:
        raise LatentMergeError(f"{where}: field 'label' = {label!r} is invalid; expected one of {LABELS}")
    if not isinstance(record["source"], str):
        raise LatentMergeError(f"{where}: field 'source' must be a string, got {record['source']!r:.60}")
    try:
        category = category_of(record["source"])
    except LatentMergeError as exc:
        raise LatentMergeError(f"{where}: field 'source': {exc}") from None
    judgments = record["judgments"]
    if not isinstance(judgments, list) or not 1 <= len(judgments) <= 2:
        raise LatentMergeError(
            f"{where}: field 'judgments' must be a list of 1 or 2 games, got {type(judgments).__name__} "
            f"of length {len(judgments) if isinstance(judgments, list) else '-'}"
        )
    decisions: list[str | None] = []
    for game, judgment in enumerate(judgments):
        if judgment is None:  # JudgeBench stores a failed game as null
            decisions.append(None)
            continue
        if not isinstance(judgment, Mapping) or "decision" not in judgment:
            raise LatentMergeError(
                f"{where}: judgments[{game}] must be null or an object with a 'decision' field"
            )
        decision = judgment["decision"]
        if decision is not None and decision not in DECISIONS:
            raise LatentMergeError(
                f"{where}: judgments[{game}].decision = {decision!r} is invalid; "
                f"expected one of {DECISIONS} or null"
            )
        decisions.append(decision)
    return category, label, decisions


def load_official_outputs(path: str | Path) -> list[dict[str, Any]]:
    """Read a JudgeBench judge output file (JSONL: dataset row + ``judge_name`` + ``judgments``)."""
    records = []
    for lineno, record in read_jsonl(path):
        _check_official_record(record, f"{path}: line {lineno}")
        records.append(record)
    if not records:
        raise LatentMergeError(f"path={str(path)!r} holds no records")
    return records


def write_official_outputs(records: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write records in JudgeBench's output format, one JSON object a line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def official_accuracy(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Score judge outputs the JudgeBench way; accuracy is a fraction in [0, 1] over *all* pairs.

    (JudgeBench's own script prints percent; ours is its value / 100, like every accuracy here.)

    Game 1 is compared with the label as stored; game 2 (responses swapped) is flipped first. Each game
    scores +1 (agrees), -1 (opposite) or 0 (tie / null); a pair is correct iff the sum is > 0, incorrect
    iff < 0, else tied. Returns ``{category: {...}, ..., "overall": {...}}`` with ``accuracy``, ``n``,
    ``correct``, ``incorrect``, ``tied`` for each category present (in `CATEGORIES` order).
    """
    if not records:
        raise LatentMergeError("records is empty; official_accuracy needs at least one judged pair")
    tallies: dict[str, dict[str, int]] = {}
    for i, record in enumerate(records):
        where = (
            f"record {i} (pair_id={record.get('pair_id')!r})"
            if isinstance(record, Mapping)
            else f"record {i}"
        )
        category, label, decisions = _check_official_record(record, where)
        in_label_frame = [decisions[0]] + [flip_decision(d) for d in decisions[1:]]
        total = sum(1 if d == label else -1 if d == flip_decision(label) else 0 for d in in_label_frame)
        outcome = "correct" if total > 0 else "incorrect" if total < 0 else "tied"
        for key in (category, "overall"):
            tally = tallies.setdefault(key, {"n": 0, "correct": 0, "incorrect": 0, "tied": 0})
            tally["n"] += 1
            tally[outcome] += 1
    order = [c for c in CATEGORIES if c in tallies] + ["overall"]
    return {key: {"accuracy": tallies[key]["correct"] / tallies[key]["n"], **tallies[key]} for key in order}
