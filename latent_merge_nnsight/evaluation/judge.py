"""Pairwise LLM judging: compare two systems' answers (win rates) or score a judge on JudgeBench.

Every judgment is one chat request for one (pair, order). Order ``"AB"`` shows system A's answer
first; ``"BA"`` shows it second, and the verdict is mapped back to the original sides, so position
bias shows up as order inconsistency instead of as a win. Each raw judgment is appended (flushed) to a
JSONL cache keyed by (pair_id, order, judge_model, template_id): an interrupted run resumes without
losing or repeating a judgment. Retries (429, 5xx, timeouts, connection errors) are ours, with
exponential backoff and jitter; the SDK's own retries are off (`evaluation.openai_chat`). The API key
is read from the environment and never logged or written.
"""

import asyncio
import functools
import json
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.evaluation.judgebench.data import CATEGORIES, JudgePair, category_of, read_jsonl
from latent_merge_nnsight.evaluation.judgebench.official import verdict_to_decision
from latent_merge_nnsight.evaluation.judgebench.templates import Template
from latent_merge_nnsight.evaluation.openai_chat import JudgeRequestError, Messages, OpenAIChat, SleepFn
from latent_merge_nnsight.jsonl import read_resumable

logger = logging.getLogger(__name__)

__all__ = [
    "ORDERS",
    "UNCATEGORIZED",
    "CompleteFn",
    "Comparison",
    "JudgeRequestError",
    "Judgment",
    "JudgmentCache",
    "OpenAIChat",
    "judge_pairs",
    "judge_pairs_sync",
    "judgebench_accuracy",
    "judgebench_accuracy_openai",
    "judgebench_accuracy_sync",
    "load_comparisons",
    "load_judgments",
    "load_responses",
]

ORDERS: tuple[str, ...] = ("AB", "BA")
UNCATEGORIZED = "uncategorized"
CompleteFn = Callable[[Messages], Awaitable[str]]
"""An async callable: chat messages -> the judge's reply text (an OpenAI endpoint or a local model)."""
_SWAP = {"A": "B", "B": "A", "tie": "tie", None: None}


# ---------------------------------------------------------------------------------------------------
# Inputs: two systems' responses joined on pair_id
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """One question answered by two systems; ``response_a`` belongs to ``system_a``."""

    pair_id: str
    question: str
    response_a: str
    response_b: str
    system_a: str
    system_b: str
    category: str = UNCATEGORIZED


def _line_category(row: Mapping[str, Any], where: str) -> str | None:
    if row.get("category") is not None:
        if row["category"] not in CATEGORIES:
            raise LatentMergeError(
                f"{where}: field 'category' = {row['category']!r}; expected one of {CATEGORIES}"
            )
        return row["category"]
    if row.get("source") is not None:
        try:
            return category_of(row["source"])
        except LatentMergeError as exc:
            raise LatentMergeError(f"{where}: field 'source': {exc}") from None
    return None


def load_responses(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read one system's responses JSONL (``pair_id, question, response, system`` [``source``|``category``]).

    Returns ``{pair_id: {"question", "response", "system", "category"}}``. Every line must name the same
    system; a repeated pair_id is an error.
    """
    out: dict[str, dict[str, Any]] = {}
    system: str | None = None
    for lineno, row in read_jsonl(path):
        where = f"{path}: line {lineno}"
        if not isinstance(row, Mapping):
            raise LatentMergeError(f"{where}: expected a JSON object, got {type(row).__name__}")
        for field in ("pair_id", "question", "response", "system"):
            if field not in row:
                raise LatentMergeError(
                    f"{where}: field {field!r} is missing; "
                    "a response line needs pair_id, question, response, system"
                )
            if not isinstance(row[field], str):
                raise LatentMergeError(f"{where}: field {field!r} must be a string, got {row[field]!r:.60}")
        if system is not None and row["system"] != system:
            raise LatentMergeError(
                f"{where}: system {row['system']!r} differs from {system!r} on earlier lines; "
                "one responses file per system"
            )
        system = row["system"]
        if row["pair_id"] in out:
            raise LatentMergeError(f"{where}: pair_id {row['pair_id']!r} appears twice")
        out[row["pair_id"]] = {
            "question": row["question"],
            "response": row["response"],
            "system": row["system"],
            "category": _line_category(row, where),
        }
    if not out:
        raise LatentMergeError(f"path={str(path)!r} holds no responses")
    return out


def load_comparisons(
    path_a: str | Path, path_b: str | Path, *, on_missing: str = "error"
) -> list[Comparison]:
    """Join two responses files on pair_id into `Comparison`s (system A from ``path_a``).

    ``on_missing="error"`` (default) raises when a pair_id is in one file only; ``"drop"`` keeps the
    intersection and logs how many were dropped. The two lines of a pair must carry the same question.
    """
    if on_missing not in ("error", "drop"):
        raise LatentMergeError(f"on_missing={on_missing!r} is invalid; expected 'error' or 'drop'")
    a, b = load_responses(path_a), load_responses(path_b)
    only_a, only_b = a.keys() - b.keys(), b.keys() - a.keys()
    if only_a or only_b:
        msg = (
            f"{len(only_a)} pair_ids only in {path_a} (e.g. {sorted(only_a)[:3]}), "
            f"{len(only_b)} only in {path_b} (e.g. {sorted(only_b)[:3]})"
        )
        if on_missing == "error":
            raise LatentMergeError(msg + "; pass on_missing='drop' to compare the common pairs")
        logger.warning("dropping unmatched pairs: %s", msg)
    comparisons = []
    for pair_id, ra in a.items():
        if pair_id not in b:
            continue
        rb = b[pair_id]
        if ra["question"] != rb["question"]:
            raise LatentMergeError(f"pair_id {pair_id!r} has different questions in {path_a} and {path_b}")
        if ra["category"] and rb["category"] and ra["category"] != rb["category"]:
            raise LatentMergeError(
                f"pair_id {pair_id!r}: category {ra['category']!r} in {path_a} "
                f"but {rb['category']!r} in {path_b}"
            )
        category = ra["category"] or rb["category"] or UNCATEGORIZED
        comparisons.append(
            Comparison(
                pair_id, ra["question"], ra["response"], rb["response"], ra["system"], rb["system"], category
            )
        )
    if not comparisons:
        raise LatentMergeError(f"{path_a} and {path_b} share no pair_id")
    return comparisons


# ---------------------------------------------------------------------------------------------------
# Judgments and their cache
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Judgment:
    """One raw judgment. ``verdict_shown`` is in the shown order; ``verdict`` is mapped to system A/B."""

    pair_id: str
    order: str
    judge_model: str
    template_id: str
    category: str
    system_a: str
    system_b: str
    reply: str
    verdict_shown: str | None
    verdict: str | None
    error: str | None = None
    """Why the request failed for good (e.g. an HTTP 400 for a prompt over the judge's context); the
    judgment then has no verdict and counts as failed, not as invalid."""

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.pair_id, self.order, self.judge_model, self.template_id)

    @property
    def valid(self) -> bool:
        return self.verdict is not None

    @classmethod
    def from_dict(cls, row: Mapping[str, Any], where: str = "judgment") -> "Judgment":
        fields = cls.__dataclass_fields__
        missing = [f for f in fields if f not in row and f != "error"]  # caches from before `error`
        if missing:
            raise LatentMergeError(f"{where}: fields {missing} are missing from a cached judgment")
        if row["order"] not in ORDERS or row["verdict"] not in _SWAP or row["verdict_shown"] not in _SWAP:
            raise LatentMergeError(
                f"{where}: order={row['order']!r}, verdict={row['verdict']!r}: expected order in {ORDERS} "
                "and verdict in 'A', 'B', 'tie', null"
            )
        return cls(**{f: row[f] for f in fields if f in row})


class JudgmentCache:
    """Append-only JSONL of `Judgment`s; ``path=None`` keeps it in memory.

    The first record of a key wins, except that a later one replaces an invalid or failed record (what
    a rerun with ``retry_invalid=True`` appends).

    A half-written last line (the process died mid-write) is dropped with a warning; with
    ``repair=True`` (the default) it is also cut from the file so later appends stay valid JSONL.
    """

    def __init__(self, path: str | Path | None, *, repair: bool = True) -> None:
        self.path = Path(path) if path is not None else None
        self._records: dict[tuple[str, str, str, str], Judgment] = {}
        if self.path is not None and self.path.exists():
            self._load(self.path, repair)

    def _load(self, path: Path, repair: bool) -> None:
        for lineno, row in read_resumable(path, repair=repair):
            self._keep(Judgment.from_dict(row, f"{path}: line {lineno}"))

    def _keep(self, judgment: Judgment) -> None:
        old = self._records.get(judgment.key)
        if old is None or not old.valid:
            self._records[judgment.key] = judgment

    def get(self, key: tuple[str, str, str, str]) -> Judgment | None:
        """The cached judgment for (pair_id, order, judge_model, template_id), if any."""
        return self._records.get(key)

    def add(self, judgment: Judgment) -> None:
        """Record a judgment and append it to the file at once (one line, flushed)."""
        self._keep(judgment)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(asdict(judgment), ensure_ascii=False) + "\n")
                fh.flush()

    def values(self) -> list[Judgment]:
        """All cached judgments, in file order."""
        return list(self._records.values())

    def __len__(self) -> int:
        return len(self._records)


def load_judgments(
    path: str | Path, judge_model: str | None = None, template_id: str | None = None
) -> list[Judgment]:
    """Read a judgment cache (without modifying it), optionally keeping one judge model and/or template."""
    if not Path(path).is_file():
        raise LatentMergeError(f"path={str(path)!r} does not exist or is not a file")
    return [
        j
        for j in JudgmentCache(path, repair=False).values()
        if (judge_model is None or j.judge_model == judge_model)
        and (template_id is None or j.template_id == template_id)
    ]


def _postfix(counts: Counter) -> dict[str, int]:
    out = {"A": counts["A"], "B": counts["B"], "tie": counts["tie"], "invalid": counts[None]}
    return out | ({"failed": counts["failed"]} if counts["failed"] else {})


def _tally(j: Judgment) -> str | None:
    return "failed" if j.error is not None else j.verdict


_FAILED_STATUS = frozenset({400, 413, 422})
"""Statuses that fail one judgment (this prompt is too long or refused), not the whole run."""


def _check_judgments(comparisons: Sequence[Comparison], concurrency: int) -> None:
    if concurrency < 1:
        raise LatentMergeError(f"concurrency={concurrency} must be >= 1")
    ids = [c.pair_id for c in comparisons]
    if len(set(ids)) != len(ids):
        dupes = sorted(k for k, n in Counter(ids).items() if n > 1)
        raise LatentMergeError(f"pair_ids repeat in the input: {dupes[:5]}")


async def _ask(
    complete_fn: CompleteFn, template: Template, c: Comparison, order: str
) -> tuple[str, str | None]:
    """The judge's reply on one comparison in one order, and the error when the endpoint refused it
    (400/413/422: then the reply is empty); any other request failure raises."""
    first, second = (c.response_a, c.response_b) if order == "AB" else (c.response_b, c.response_a)
    error = None
    try:
        reply = await complete_fn(template.messages(c.question, first, second))
    except JudgeRequestError as exc:
        if exc.status not in _FAILED_STATUS:
            raise
        logger.warning("judgment of pair %r order %s failed: %s", c.pair_id, order, exc)
        reply, error = "", str(exc)
    return (reply if isinstance(reply, str) else ""), error


async def _gather_all(tasks: list[Any]) -> None:
    """Await every task; when one fails (or the wait is cancelled) cancel the rest, then raise."""
    try:
        if tasks:
            await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _run_judgments(
    comparisons: Sequence[Comparison],
    orders: Sequence[str],
    complete_fn: CompleteFn,
    template: Template,
    judge_model: str,
    cache_path: str | Path | None,
    concurrency: int,
    progress: bool,
    desc: str,
    retry_invalid: bool = False,
) -> list[Judgment]:
    """Judge every (comparison, order) not in the cache (nor, with ``retry_invalid``, cached without a
    verdict); return all of them in input order. A request the endpoint refuses with a 400/413/422 is
    recorded as a failed judgment and the run goes on; other request failures end the run."""
    from tqdm.auto import tqdm

    _check_judgments(comparisons, concurrency)
    cache = JudgmentCache(cache_path)
    tid = template.template_id
    keys = [(c, o) for c in comparisons for o in orders]
    cached = [cache.get((c.pair_id, o, judge_model, tid)) for c, o in keys]
    todo = [key for key, j in zip(keys, cached, strict=True) if j is None or (retry_invalid and not j.valid)]
    counts: Counter = Counter(_tally(j) for j in cached if j is not None and (j.valid or not retry_invalid))
    bar = tqdm(
        total=len(keys), initial=len(keys) - len(todo), desc=desc, disable=not progress, dynamic_ncols=True
    )
    bar.set_postfix(_postfix(counts))
    semaphore = asyncio.Semaphore(concurrency)

    async def judge_one(c: Comparison, order: str) -> None:
        async with semaphore:
            reply, error = await _ask(complete_fn, template, c, order)
        shown = template.parse(reply) if error is None else None
        verdict = shown if order == "AB" else _SWAP[shown]
        judgment = Judgment(
            c.pair_id,
            order,
            judge_model,
            tid,
            c.category,
            c.system_a,
            c.system_b,
            reply,
            shown,
            verdict,
            error,
        )
        cache.add(judgment)
        counts[_tally(judgment)] += 1
        bar.update(1)
        bar.set_postfix(_postfix(counts), refresh=False)

    try:
        await _gather_all([asyncio.ensure_future(judge_one(c, o)) for c, o in todo])
    finally:
        bar.close()
    return [cache.get((c.pair_id, o, judge_model, tid)) for c, o in keys]  # type: ignore[misc]


async def judge_pairs(
    pairs: Sequence[Comparison],
    judge_model: str,
    base_url: str | None,
    template: Template,
    cache_path: str | Path | None,
    *,
    both_orders: bool = True,
    concurrency: int = 8,
    max_retries: int = 6,
    api_key_env: str = "OPENAI_API_KEY",
    base_delay: float = 1.0,
    max_delay: float = 60.0,
    timeout: float = 120.0,
    temperature: float | None = 0.0,
    max_tokens: int | None = None,
    sleep: SleepFn = asyncio.sleep,
    progress: bool = True,
    retry_invalid: bool = False,
) -> list[Judgment]:
    """Judge system A against system B on every comparison through an OpenAI-compatible endpoint.

    Both orders by default (``"AB"`` then ``"BA"``, verdicts mapped back to A/B). Judgments already in
    ``cache_path`` for this judge model and template are reused without a request; new ones are
    appended as they arrive; ``retry_invalid=True`` asks again for cached ones without a verdict.
    Returns one `Judgment` per (pair, order), in input order. A request the endpoint refuses with a
    400/413/422 becomes a failed judgment (``error`` set) and the run goes on; any other request that
    fails for good raises `JudgeRequestError`; everything judged so far stays in the cache.
    """
    chat = OpenAIChat(
        judge_model,
        base_url,
        api_key_env=api_key_env,
        max_retries=max_retries,
        base_delay=base_delay,
        max_delay=max_delay,
        timeout=timeout,
        temperature=temperature,
        max_tokens=max_tokens,
        sleep=sleep,
    )
    try:
        orders = ORDERS if both_orders else ORDERS[:1]
        return await _run_judgments(
            pairs,
            orders,
            chat,
            template,
            judge_model,
            cache_path,
            concurrency,
            progress,
            "judging",
            retry_invalid,
        )
    finally:
        await chat.aclose()


_P = ParamSpec("_P")
_T = TypeVar("_T")


def _blocking(fn: Callable[_P, Coroutine[Any, Any, _T]], name: str, doc: str) -> Callable[_P, _T]:
    """`fn` for synchronous callers: each call runs it to the end in an event loop of its own (it keeps
    `fn`'s signature, for type checkers and `help`)."""

    @functools.wraps(fn)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        return asyncio.run(fn(*args, **kwargs))

    run.__name__, run.__qualname__, run.__doc__ = name, name, doc
    return run


judge_pairs_sync = _blocking(
    judge_pairs,
    "judge_pairs_sync",
    "`judge_pairs` for synchronous callers such as the CLI (runs its own event loop).",
)


# ---------------------------------------------------------------------------------------------------
# JudgeBench accuracy of a judge (records in JudgeBench's own output format)
# ---------------------------------------------------------------------------------------------------


async def judgebench_accuracy(
    pairs: Sequence[JudgePair],
    complete_fn: CompleteFn,
    template: Template,
    *,
    cache_path: str | Path | None = None,
    judge_model: str = "judge",
    judge_name: str | None = None,
    both_orders: bool = True,
    concurrency: int = 8,
    progress: bool = True,
    retry_invalid: bool = False,
) -> list[dict[str, Any]]:
    """Judge labelled JudgeBench pairs and return records in JudgeBench's output format.

    Each record is the dataset row plus ``judge_name`` and ``judgments``: game 1 shows
    (response_A, response_B), game 2 the swap, and each game's ``decision`` is stored as the judge said
    it (``"A>B"``/``"B>A"``/``"A=B"``/``None``, unflipped), so `official_accuracy` scores them.
    ``judge_model`` labels the model behind ``complete_fn`` in the cache key and the records.
    """
    comparisons = [
        Comparison(p.pair_id, p.question, p.response_A, p.response_B, "response_A", "response_B", p.category)
        for p in pairs
    ]
    orders = ORDERS if both_orders else ORDERS[:1]
    judgments = await _run_judgments(
        comparisons,
        orders,
        complete_fn,
        template,
        judge_model,
        cache_path,
        concurrency,
        progress,
        "JudgeBench",
        retry_invalid,
    )
    by_key = {(j.pair_id, j.order): j for j in judgments}
    records = []
    for pair in pairs:
        games = []
        for order in orders:
            j = by_key[(pair.pair_id, order)]
            first, second = (
                (pair.response_A, pair.response_B) if order == "AB" else (pair.response_B, pair.response_A)
            )
            games.append(
                {
                    "judgment": {
                        "judge_model": judge_model,
                        "prompt": template.render(pair.question, first, second),
                        "response": j.reply,
                    }
                    | ({"error": j.error} if j.error is not None else {}),
                    "decision": verdict_to_decision(j.verdict_shown),
                }
            )
        records.append({**pair.to_dict(), "judge_name": judge_name or template.name, "judgments": games})
    return records


judgebench_accuracy_sync = _blocking(
    judgebench_accuracy,
    "judgebench_accuracy_sync",
    "`judgebench_accuracy` for synchronous callers with their own ``complete_fn``.",
)


def judgebench_accuracy_openai(
    pairs: Sequence[JudgePair],
    judge_model: str,
    base_url: str | None,
    template: Template,
    cache_path: str | Path | None = None,
    *,
    judge_name: str | None = None,
    both_orders: bool = True,
    concurrency: int = 8,
    progress: bool = True,
    retry_invalid: bool = False,
    **client_kwargs: object,
) -> list[dict[str, Any]]:
    """Synchronous `judgebench_accuracy` with an `OpenAIChat` judge (``client_kwargs`` go to it).

    The client lives inside the event loop it is used in and is closed afterwards.
    """

    async def run() -> list[dict[str, Any]]:
        async with OpenAIChat(judge_model, base_url, **client_kwargs) as chat:
            return await judgebench_accuracy(
                pairs,
                chat,
                template,
                cache_path=cache_path,
                judge_model=judge_model,
                judge_name=judge_name,
                both_orders=both_orders,
                concurrency=concurrency,
                progress=progress,
                retry_invalid=retry_invalid,
            )

    return asyncio.run(run())
