"""Pairwise LLM judging: compare two systems' answers (win rates) or score a judge on JudgeBench.

Every judgment is one chat request for one (pair, order). Order ``"AB"`` shows system A's answer
first; ``"BA"`` shows it second, and the verdict is mapped back to the original sides, so position
bias shows up as order inconsistency instead of as a win. Each raw judgment is appended (flushed) to a
JSONL cache keyed by (pair_id, order, judge_model, template_id): an interrupted run resumes without
losing or repeating a judgment. Retries (429, 5xx, timeouts, connection errors) are ours, with
exponential backoff and jitter; the SDK's own retries are off. The API key is read from the
environment and never logged or written.
"""

import asyncio
import ipaddress
import json
import logging
import os
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.evaluation.judgebench import (
    CATEGORIES,
    JudgePair,
    Template,
    category_of,
    read_jsonl,
    verdict_to_decision,
)
from latent_merge_nnsight.jsonl import read_resumable

logger = logging.getLogger(__name__)

ORDERS: tuple[str, ...] = ("AB", "BA")
UNCATEGORIZED = "uncategorized"
Messages = list[dict[str, str]]
CompleteFn = Callable[[Messages], Awaitable[str]]
"""An async callable: chat messages -> the judge's reply text (an OpenAI endpoint or a local model)."""
SleepFn = Callable[[float], Awaitable[Any]]
_RETRY_STATUS = frozenset({408, 409, 429})
_SWAP = {"A": "B", "B": "A", "tie": "tie", None: None}


class JudgeRequestError(RuntimeError):
    """A judge request failed for good: a non-retryable status, or retries exhausted."""


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
# OpenAI-compatible client with our own retries
# ---------------------------------------------------------------------------------------------------


def _is_loopback(base_url: str | None) -> bool:
    host = urlparse(base_url or "").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _api_key(api_key_env: str, base_url: str | None) -> str:
    key = os.environ.get(api_key_env)
    if key:
        return key
    if _is_loopback(base_url):
        return "unused-local-key"  # local servers usually ignore the key, but the SDK wants one
    raise LatentMergeError(
        f"api_key_env={api_key_env!r}: the environment variable {api_key_env} is not set; export your "
        f"API key there (a local server without auth accepts any value, e.g. {api_key_env}=dummy)"
    )


def _retry_after(exc: Exception) -> float | None:
    response = getattr(exc, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class OpenAIChat:
    """Async `CompleteFn` over an OpenAI-compatible ``/chat/completions`` endpoint.

    Retries 408/409/429/5xx, timeouts and connection errors up to ``max_retries`` times, waiting
    ``min(max_delay, base_delay * 2**attempt)`` scaled by a random factor in [0.5, 1] (or the server's
    ``Retry-After`` when longer). Other errors raise `JudgeRequestError` at once. ``sleep`` is
    injectable so tests need not wait.
    """

    def __init__(
        self,
        judge_model: str,
        base_url: str | None = None,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        max_retries: int = 6,
        base_delay: float = 1.0,
        max_delay: float = 60.0,
        timeout: float = 120.0,
        temperature: float | None = 0.0,
        max_tokens: int | None = None,
        sleep: SleepFn = asyncio.sleep,
        seed: int | None = None,
    ) -> None:
        if max_retries < 0:
            raise LatentMergeError(f"max_retries={max_retries} must be >= 0")
        if base_delay < 0 or max_delay < 0:
            raise LatentMergeError(f"base_delay={base_delay}, max_delay={max_delay} must be >= 0")
        import openai

        self._openai = openai
        self.judge_model = judge_model
        self.base_url = base_url
        self.max_retries, self.base_delay, self.max_delay = max_retries, base_delay, max_delay
        self.temperature, self.max_tokens = temperature, max_tokens
        self._sleep = sleep
        self._rng = random.Random(seed)
        self.requests_sent = 0
        self._client = openai.AsyncOpenAI(
            base_url=base_url, api_key=_api_key(api_key_env, base_url), max_retries=0, timeout=timeout
        )

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIChat(judge_model={self.judge_model!r}, base_url={self.base_url!r})"

    def _retryable(self, exc: Exception) -> bool:
        if isinstance(exc, self._openai.APIConnectionError):  # includes APITimeoutError
            return True
        return isinstance(exc, self._openai.APIStatusError) and (
            exc.status_code in _RETRY_STATUS or exc.status_code >= 500
        )

    def backoff(self, attempt: int, exc: Exception | None = None) -> float:
        """Seconds to wait before retry number ``attempt + 1`` (0-based ``attempt``)."""
        delay = min(self.max_delay, self.base_delay * 2.0**attempt) * (0.5 + 0.5 * self._rng.random())
        hint = _retry_after(exc) if exc is not None else None
        return min(self.max_delay, max(delay, hint)) if hint is not None else delay

    async def __call__(self, messages: Messages) -> str:
        kwargs: dict[str, Any] = {"model": self.judge_model, "messages": messages}
        if self.temperature is not None:
            kwargs["temperature"] = self.temperature
        if self.max_tokens is not None:
            kwargs["max_tokens"] = self.max_tokens
        for attempt in range(self.max_retries + 1):
            self.requests_sent += 1
            try:
                response = await self._client.chat.completions.create(**kwargs)
            except self._openai.OpenAIError as exc:
                status = getattr(exc, "status_code", None)
                if not self._retryable(exc) or attempt == self.max_retries:
                    tried = f"after {attempt + 1} attempt{'s' if attempt else ''}"
                    detail = str(exc).replace(self._client.api_key, "***")[:300]  # a server may echo the key
                    raise JudgeRequestError(
                        f"judge request to {self.base_url or 'api.openai.com'} (model {self.judge_model!r}) "
                        f"failed {tried}: {type(exc).__name__} (status {status}): {detail}"
                    ) from None  # the SDK exception may hold an echoed key; its text is scrubbed above
                delay = self.backoff(attempt, exc)
                logger.info(
                    "judge request failed (%s, status %s); retry %d in %.2fs",
                    type(exc).__name__,
                    status,
                    attempt + 1,
                    delay,
                )
                await self._sleep(delay)
                continue
            if not response.choices:
                return ""
            return response.choices[0].message.content or ""
        raise AssertionError("unreachable")  # pragma: no cover

    async def aclose(self) -> None:
        """Close the underlying HTTP client."""
        await self._client.close()

    async def __aenter__(self) -> "OpenAIChat":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


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

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.pair_id, self.order, self.judge_model, self.template_id)

    @classmethod
    def from_dict(cls, row: Mapping[str, Any], where: str = "judgment") -> "Judgment":
        fields = cls.__dataclass_fields__
        missing = [f for f in fields if f not in row]
        if missing:
            raise LatentMergeError(f"{where}: fields {missing} are missing from a cached judgment")
        if row["order"] not in ORDERS or row["verdict"] not in _SWAP or row["verdict_shown"] not in _SWAP:
            raise LatentMergeError(
                f"{where}: order={row['order']!r}, verdict={row['verdict']!r}: expected order in {ORDERS} "
                "and verdict in 'A', 'B', 'tie', null"
            )
        return cls(**{f: row[f] for f in fields})


class JudgmentCache:
    """Append-only JSONL of `Judgment`s; the first record of a key wins. ``path=None`` keeps it in memory.

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
            judgment = Judgment.from_dict(row, f"{path}: line {lineno}")
            self._records.setdefault(judgment.key, judgment)

    def get(self, key: tuple[str, str, str, str]) -> Judgment | None:
        """The cached judgment for (pair_id, order, judge_model, template_id), if any."""
        return self._records.get(key)

    def add(self, judgment: Judgment) -> None:
        """Record a judgment and append it to the file at once (one line, flushed)."""
        self._records.setdefault(judgment.key, judgment)
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
    return {"A": counts["A"], "B": counts["B"], "tie": counts["tie"], "invalid": counts[None]}


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
) -> list[Judgment]:
    """Judge every (comparison, order) not in the cache; return all of them in input order."""
    from tqdm.auto import tqdm

    if concurrency < 1:
        raise LatentMergeError(f"concurrency={concurrency} must be >= 1")
    ids = [c.pair_id for c in comparisons]
    if len(set(ids)) != len(ids):
        dupes = sorted(k for k, n in Counter(ids).items() if n > 1)
        raise LatentMergeError(f"pair_ids repeat in the input: {dupes[:5]}")
    cache = JudgmentCache(cache_path)
    tid = template.template_id
    keys = [(c, o) for c in comparisons for o in orders]
    cached = [cache.get((c.pair_id, o, judge_model, tid)) for c, o in keys]
    todo = [key for key, j in zip(keys, cached, strict=True) if j is None]
    counts: Counter = Counter(j.verdict for j in cached if j is not None)
    bar = tqdm(
        total=len(keys), initial=len(keys) - len(todo), desc=desc, disable=not progress, dynamic_ncols=True
    )
    bar.set_postfix(_postfix(counts))
    semaphore = asyncio.Semaphore(concurrency)

    async def judge_one(c: Comparison, order: str) -> None:
        first, second = (c.response_a, c.response_b) if order == "AB" else (c.response_b, c.response_a)
        async with semaphore:
            reply = await complete_fn(template.messages(c.question, first, second))
        reply = reply if isinstance(reply, str) else ""
        shown = template.parse(reply)
        verdict = shown if order == "AB" else _SWAP[shown]
        cache.add(
            Judgment(
                c.pair_id, order, judge_model, tid, c.category, c.system_a, c.system_b, reply, shown, verdict
            )
        )
        counts[verdict] += 1
        bar.update(1)
        bar.set_postfix(_postfix(counts), refresh=False)

    tasks = [asyncio.ensure_future(judge_one(c, o)) for c, o in todo]
    try:
        if tasks:
            await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
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
) -> list[Judgment]:
    """Judge system A against system B on every comparison through an OpenAI-compatible endpoint.

    Both orders by default (``"AB"`` then ``"BA"``, verdicts mapped back to A/B). Judgments already in
    ``cache_path`` for this judge model and template are reused without a request; new ones are
    appended as they arrive. Returns one `Judgment` per (pair, order), in input order. A request that
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
            pairs, orders, chat, template, judge_model, cache_path, concurrency, progress, "judging"
        )
    finally:
        await chat.aclose()


def judge_pairs_sync(*args: Any, **kwargs: Any) -> list[Judgment]:
    """`judge_pairs` for synchronous callers such as the CLI (runs its own event loop)."""
    return asyncio.run(judge_pairs(*args, **kwargs))


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
                    },
                    "decision": verdict_to_decision(j.verdict_shown),
                }
            )
        records.append({**pair.to_dict(), "judge_name": judge_name or template.name, "judgments": games})
    return records


def judgebench_accuracy_sync(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
    """`judgebench_accuracy` for synchronous callers with their own ``complete_fn``."""
    return asyncio.run(judgebench_accuracy(*args, **kwargs))


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
    **client_kwargs: Any,
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
            )

    return asyncio.run(run())
