"""Answer every JudgeBench question with one system, for pairwise judging later.

`respond` writes one JSON line per JudgeBench pair::

    {"pair_id", "original_id", "source", "category", "question", "response", "system",
     "finish_reason", "prompt_tokens", "completion_tokens"}

(the fields `judge.load_responses` reads, plus bookkeeping) and a sidecar ``<out>.meta.json`` with the
system's provenance. The question is sent as the single user message, so the model's chat template
applies. A question shared by several pairs (the ``claude`` split has one) is generated once and
written for each of its pairs. Lines are appended and flushed as each batch finishes: a rerun skips
the pairs already answered, so an interrupted run resumes with nothing lost or repeated. Nothing is
pickled.
"""

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.evaluation.judgebench.data import HF_DATASET, JudgePair, load_judgebench
from latent_merge_nnsight.jsonl import read_resumable
from latent_merge_nnsight.systems.batching import Completion
from latent_merge_nnsight.systems.fit import check_truncate, fit_chats
from latent_merge_nnsight.systems.loaded import LoadedSystem, load_system
from latent_merge_nnsight.systems.spec import System

if TYPE_CHECKING:
    from tqdm import tqdm

__all__ = ["RespondResult", "meta_path", "read_responses", "respond"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RespondResult:
    """What a `respond` run did: the files, the pairs asked for, newly answered and already answered."""

    out: Path
    meta: Path
    total: int
    answered: int
    skipped: int


def meta_path(out: str | Path) -> Path:
    """The provenance sidecar of a responses file: ``responses.jsonl`` -> ``responses.jsonl.meta.json``."""
    out = Path(out)
    return out.with_name(out.name + ".meta.json")


def read_responses(path: str | Path, *, repair: bool = False) -> dict[str, dict[str, Any]]:
    """Read a responses JSONL into ``{pair_id: row}`` (file order).

    A half-written last line (the process died mid-write) is dropped with a warning, and with
    ``repair=True`` cut from the file so later appends stay valid JSONL. Any other bad line, a line
    without ``pair_id``/``response``/``system``, or a repeated pair_id is an error naming the line.
    """
    path = Path(path)
    rows: dict[str, dict[str, Any]] = {}
    for lineno, row in read_resumable(path, repair=repair):
        if not isinstance(row, Mapping) or not all(k in row for k in ("pair_id", "response", "system")):
            raise LatentMergeError(
                f"{path}: line {lineno} is not a response line (needs pair_id, response, system)"
            )
        if row["pair_id"] in rows:
            raise LatentMergeError(f"{path}: line {lineno} repeats pair_id {row['pair_id']!r}")
        rows[row["pair_id"]] = dict(row)
    return rows


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _check_meta(meta: Path, system: System, split: str) -> dict[str, Any] | None:
    """The existing sidecar, after checking it describes the same system and split."""
    if not meta.is_file():
        return None
    try:
        old = json.loads(meta.read_text(encoding="utf-8"))
        old_system, old_split = old["provenance"]["system"], old["split"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise LatentMergeError(
            f"{meta} is not a responses sidecar ({exc}); move it away to start over"
        ) from None
    if old_split != split:
        raise LatentMergeError(
            f"split={split!r} but {meta} records split {old_split!r}; use another --out to answer a new split"
        )
    new_system = system.to_dict()
    if old_system != new_system:
        changed = sorted(
            k for k in set(old_system) | set(new_system) if old_system.get(k) != new_system.get(k)
        )
        raise LatentMergeError(
            f"the system differs from the one that wrote {meta.parent / meta.name[: -len('.meta.json')]} "
            f"(fields {changed}); answers of two systems must not mix: use another --out"
        )
    return old


def _row(pair: JudgePair, system: str, response: str, completion: Completion | None) -> dict[str, Any]:
    return {
        "pair_id": pair.pair_id,
        "original_id": pair.original_id,
        "source": pair.source,
        "category": pair.category,
        "question": pair.question,
        "response": response,
        "system": system,
        "finish_reason": getattr(completion, "finish_reason", None),
        "prompt_tokens": getattr(completion, "prompt_tokens", None),
        "completion_tokens": getattr(completion, "completion_tokens", None),
    }


def _fit_to_context(
    loaded: LoadedSystem, questions: list[str], config: System, truncate: str
) -> dict[str, tuple[str, int]]:
    """``{question: (the text to ask, tokens cut from its start)}``; refuses (``truncate="error"``) or
    cuts (``"left"``) questions whose prompt leaves less than ``max_new_tokens`` of the context."""
    chats = [[{"role": "user", "content": q}] for q in questions]
    fitted = fit_chats(loaded, chats, config.sampling.max_new_tokens, truncate, "questions")
    return {q: (chat[-1]["content"], cut) for q, (chat, cut) in zip(questions, fitted, strict=True)}


def respond(
    system: str | Path | System | LoadedSystem,
    split: str = "gpt",
    out: str | Path = "responses.jsonl",
    data: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    truncate: str = "error",
) -> RespondResult:
    """Generate one answer per JudgeBench question with ``system`` and append them to ``out``.

    Arguments:
        system: a system YAML path, a `System`, or a `LoadedSystem` (models are loaded only when
            something is left to answer).
        split: ``"gpt"`` or ``"claude"``.
        out: the responses JSONL; pairs already in it are skipped (resume).
        data: a local JudgeBench JSONL/Parquet (default: the hub dataset).
        limit: answer only the first ``limit`` pairs of the split.
        batch_size: questions per `generate` call (the longest questions go first, so a batch too
            big for memory fails early).
        truncate: what to do with a question whose prompt does not fit the model's context with
            ``max_new_tokens`` after it: ``"error"`` (default) refuses the run before anything is
            generated; ``"left"`` cuts the question's start to fit (each row records
            ``truncated_tokens``; the row's ``question`` stays the original); ``"none"`` feeds it whole,
            past the context. The sidecar records the choice.
    Returns a `RespondResult` with the paths and counts.
    """
    _check_arguments(limit, batch_size, truncate)
    config = _system_config(system)
    pairs = load_judgebench(split, path=data)
    if limit is not None:
        pairs = pairs[:limit]
    out, meta = Path(out), meta_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    old_meta, done = _resume_state(out, meta, config, split, truncate)
    todo = [p for p in pairs if p.pair_id not in done]
    answered_by_question = {row.get("question"): row for row in done.values()}
    skipped = len(pairs) - len(todo)
    if not todo:
        return RespondResult(out, meta, len(pairs), 0, skipped)

    loaded = load_system(system if isinstance(system, LoadedSystem) else config)
    # Questions still to answer, each with its pairs; a question already answered for a sibling pair
    # reuses that answer instead of generating a second one.
    by_question: dict[str, list[JudgePair]] = {}
    for pair in todo:
        by_question.setdefault(pair.question, []).append(pair)
    fitted = _fit_to_context(
        loaded, [q for q in by_question if q not in answered_by_question], config, truncate
    )
    _write_json(meta, _sidecar(loaded, split, data, truncate, old_meta))
    from tqdm.auto import tqdm

    bar = tqdm(total=len(pairs), initial=skipped, desc=f"respond {config.name}", disable=not progress)
    try:
        with out.open("a", encoding="utf-8") as fh:
            write = _Writer(fh, config.name, bar)
            _write_reused(write, by_question, answered_by_question)
            _write_generated(write, loaded, by_question, fitted, batch_size, truncate)
    finally:
        bar.close()
    return RespondResult(out, meta, len(pairs), write.answered, skipped)


def _check_arguments(limit: object, batch_size: object, truncate: object) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise LatentMergeError(
            f"limit={limit!r}; expected a positive int or None (all pairs)", param="limit", value=limit
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise LatentMergeError(
            f"batch_size={batch_size!r}; expected an int >= 1", param="batch_size", value=batch_size
        )
    check_truncate(truncate)


def _system_config(system: str | Path | System | LoadedSystem) -> System:
    """The `System` that `respond`'s `system` argument names."""
    if isinstance(system, LoadedSystem):
        return system.config
    if isinstance(system, System):
        return system
    if isinstance(system, str | Path):
        return System.from_file(system)
    raise LatentMergeError(
        f"system has type {type(system).__name__}; expected a YAML path, a System or a LoadedSystem"
    )


def _resume_state(
    out: Path, meta: Path, config: System, split: str, truncate: str
) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
    """The existing sidecar and the answers already in `out`, after checking both belong to this run."""
    old_meta = _check_meta(meta, config, split)
    if old_meta is not None and old_meta.get("truncate", truncate) != truncate:
        raise LatentMergeError(
            f"truncate={truncate!r} but {meta} records truncate={old_meta['truncate']!r}; answers cut "
            "two ways must not mix: use the same --truncate or another --out"
        )
    done = read_responses(out, repair=True) if out.exists() else {}
    others = sorted({row["system"] for row in done.values()} - {config.name})
    if others:
        raise LatentMergeError(
            f"{out} holds answers of system {others[0]!r}, not {config.name!r}; one responses file per system"
        )
    return old_meta, done


def _sidecar(
    loaded: LoadedSystem, split: str, data: str | Path | None, truncate: str, old_meta: dict[str, Any] | None
) -> dict[str, Any]:
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return {
        "provenance": loaded.provenance(),
        "split": split,
        "data": str(data) if data is not None else f"hub:{HF_DATASET}",
        "truncate": truncate,
        "context_length": getattr(loaded, "context_length", None),
        "created": old_meta.get("created", now) if old_meta else now,
        "updated": now,
    }


class _Writer:
    """Appends response lines to the open responses file, counting them on the progress bar."""

    def __init__(self, fh: TextIO, system: str, bar: "tqdm") -> None:
        self.fh, self.system, self.bar = fh, system, bar
        self.answered = 0

    def __call__(self, line: dict[str, Any]) -> None:
        self.fh.write(json.dumps(line, ensure_ascii=False) + "\n")
        self.answered += 1
        self.bar.update(1)


def _write_reused(
    write: _Writer, by_question: dict[str, list[JudgePair]], answered_by_question: dict[Any, dict[str, Any]]
) -> None:
    """Lines for the pairs whose question a sibling pair already answered (taken out of `by_question`)."""
    reused = [q for q in by_question if q in answered_by_question]
    for question in reused:
        row = answered_by_question[question]
        for pair in by_question.pop(question):
            write(
                _row(pair, write.system, row["response"], None)
                | {k: row.get(k) for k in ("finish_reason", "prompt_tokens", "completion_tokens")}
            )
    write.fh.flush()


def _write_generated(
    write: _Writer,
    loaded: LoadedSystem,
    by_question: dict[str, list[JudgePair]],
    fitted: dict[str, tuple[str, int]],
    batch_size: int,
    truncate: str,
) -> None:
    """Answer the questions left, longest first, `batch_size` at a time; each batch flushed to disk."""
    questions = sorted(by_question, key=len, reverse=True)
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        completions = loaded.complete([[{"role": "user", "content": fitted[q][0]}] for q in chunk])
        for question, completion in zip(chunk, completions, strict=True):
            for pair in by_question[question]:
                row = _row(pair, write.system, completion.text, completion)
                if truncate == "left":
                    row["truncated_tokens"] = fitted[question][1]
                write(row)
        write.fh.flush()
        os.fsync(write.fh.fileno())
