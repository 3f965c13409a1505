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
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.evaluation.judgebench import (
    CATEGORIES,
    JudgePair,
    Template,
    category_of,
    read_jsonl,
    verdict_to_decision,
)

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
        raw = path.read_bytes()
        cut = raw.rfind(b"\n") + 1
        body, tail = raw[:cut], raw[cut:]
        if tail.strip():
            try:
                json.loads(tail)
                body = raw  # a complete last record that lacks only its newline
                if repair:
                    with path.open("ab") as fh:
                        fh.write(b"\n")
            except json.JSONDecodeError:
                logger.warning("%s: dropping a truncated last line (%d bytes)", path, len(tail))
                if repair:
                    with path.open("r+b") as fh:
                        fh.truncate(cut)
        # Split on "\n" only: str.splitlines would also split on U+2028 inside a JSON string.
        for lineno, line in enumerate(body.decode("utf-8").split("\n"), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LatentMergeError(
                    f"{path}: line {lineno} is not valid JSON ({exc.msg}); only a damaged last line is "
                    "repaired automatically, fix or remove this one"
                ) from None
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


# ---------------------------------------------------------------------------------------------------
# Summary: win rates, order consistency, bootstrap CIs; JSON, markdown table, bar chart
# ---------------------------------------------------------------------------------------------------


def _as_judgment(j: Judgment | Mapping[str, Any], i: int) -> Judgment:
    return j if isinstance(j, Judgment) else Judgment.from_dict(j, f"judgments[{i}]")


def _bootstrap(
    wins_a: np.ndarray, wins_b: np.ndarray, ties: np.ndarray, n_boot: int, seed: int, confidence: float
) -> dict[str, list[float] | None]:
    """Percentile CIs of both win rates, resampling pairs with replacement."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(wins_a), size=(n_boot, len(wins_a)))
    a, b, t = wins_a[idx].sum(1), wins_b[idx].sum(1), ties[idx].sum(1)
    q = [50 * (1 - confidence), 50 * (1 + confidence)]
    out: dict[str, list[float] | None] = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for name, num, den in (("no_ties", a, a + b), ("ties_half", a + 0.5 * t, a + b + t)):
            rate = 100.0 * num / den
            out[name] = [float(x) for x in np.nanpercentile(rate, q)] if np.isfinite(rate).any() else None
    return out


def summarize(
    judgments: Iterable[Judgment | Mapping[str, Any]],
    *,
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Win rates of system A over system B per category and overall, in percent.

    Counts are per judgment (each order is one vote): ``a_wins``, ``b_wins``, ``ties``, ``invalid``.
    ``win_rate_no_ties`` = A/(A+B); ``win_rate_ties_half`` = (A + tie/2)/(A+B+tie); invalid judgments
    count in neither. ``order_consistency`` is the fraction of pairs judged in both orders whose two
    (mapped-back, valid) verdicts agree. CIs resample pairs (``n_boot`` times, numpy seeded by ``seed``).
    """
    if not 0 < confidence < 1:
        raise LatentMergeError(f"confidence={confidence} must be in (0, 1)")
    if n_boot < 1:
        raise LatentMergeError(f"n_boot={n_boot} must be >= 1")
    items = [_as_judgment(j, i) for i, j in enumerate(judgments)]
    if not items:
        raise LatentMergeError("judgments is empty; nothing to summarize")
    for field in ("system_a", "system_b", "judge_model", "template_id"):
        values = sorted({getattr(j, field) for j in items})
        if len(values) > 1:
            raise LatentMergeError(
                f"judgments mix several {field} values {values}; summarize one comparison at a time"
            )
    pairs: dict[str, dict[str, Any]] = {}
    for j in items:
        entry = pairs.setdefault(j.pair_id, {"category": j.category, "verdicts": {}})
        if j.order in entry["verdicts"]:
            raise LatentMergeError(f"pair_id {j.pair_id!r} has two judgments for order {j.order!r}")
        entry["verdicts"][j.order] = j.verdict
    present = {e["category"] for e in pairs.values()}
    groups = [c for c in CATEGORIES if c in present] + sorted(present - set(CATEGORIES)) + ["overall"]
    results: dict[str, dict[str, Any]] = {}
    for group in groups:
        members = [e for e in pairs.values() if group == "overall" or e["category"] == group]
        per_pair = np.array(
            [[sum(v == k for v in e["verdicts"].values()) for k in ("A", "B", "tie", None)] for e in members]
        )
        a, b, t, inv = (int(x) for x in per_pair.sum(0))
        both = [e["verdicts"] for e in members if set(ORDERS) <= e["verdicts"].keys()]
        agree = sum(1 for v in both if v["AB"] is not None and v["AB"] == v["BA"])
        ci = _bootstrap(per_pair[:, 0], per_pair[:, 1], per_pair[:, 2], n_boot, seed, confidence)
        results[group] = {
            "n_pairs": len(members),
            "n_judgments": a + b + t + inv,
            "a_wins": a,
            "b_wins": b,
            "ties": t,
            "invalid": inv,
            "order_consistency": agree / len(both) if both else None,
            "win_rate_no_ties": 100.0 * a / (a + b) if a + b else None,
            "win_rate_no_ties_ci": ci["no_ties"],
            "win_rate_ties_half": 100.0 * (a + 0.5 * t) / (a + b + t) if a + b + t else None,
            "win_rate_ties_half_ci": ci["ties_half"],
        }
    first = items[0]
    return {
        "system_a": first.system_a,
        "system_b": first.system_b,
        "judge_model": first.judge_model,
        "template_id": first.template_id,
        "n_boot": n_boot,
        "seed": seed,
        "confidence": confidence,
        "results": results,
    }


SummaryRows = Mapping[str, Mapping[str, Any] | Sequence[Mapping[str, Any]]]
"""Row label -> one summary, or several (e.g. latent and weight merge vs the same opponent)."""


def _rows(rows: SummaryRows) -> dict[str, list[Mapping[str, Any]]]:
    out = {label: [s] if isinstance(s, Mapping) else list(s) for label, s in rows.items()}
    for label, summaries in out.items():
        if not summaries or any("results" not in s for s in summaries):
            raise LatentMergeError(f"rows[{label!r}] must be a summarize() result or a list of them")
    return out


def _columns(rows: dict[str, list[Mapping[str, Any]]]) -> list[str]:
    present = {g for ss in rows.values() for s in ss for g in s["results"]} - {"overall"}
    return [c for c in CATEGORIES if c in present] + sorted(present - set(CATEGORIES)) + ["overall"]


def markdown_table(rows: SummaryRows, metric: str = "win_rate_no_ties", *, decimals: int = 1) -> str:
    """The paper's table: one column per category (+ overall), one row per label.

    A row with several summaries gets cells like ``62.5 / 55.0`` (e.g. latent / weight merge), in the
    order given; a missing value is ``-``.
    """
    table = _rows(rows)
    columns = _columns(table)
    lines = [
        "| System | " + " | ".join(c.capitalize() for c in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for label, summaries in table.items():
        cells = []
        for column in columns:
            values = [s["results"].get(column, {}).get(metric) for s in summaries]
            cells.append(" / ".join("-" if v is None else f"{v:.{decimals}f}" for v in values))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_win_rates(
    rows: SummaryRows,
    path: str | Path,
    metric: str = "win_rate_no_ties",
    *,
    series_names: Sequence[str] | None = None,
) -> Path:
    """Grouped bar chart (PNG) of ``metric`` per category, one bar per (row, series), with CI whiskers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    table = _rows(rows)
    columns = _columns(table)
    series = [(label, k) for label, ss in table.items() for k in range(len(ss))]
    fig = Figure(figsize=(max(6.0, 1.6 * len(columns)), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    for n, (label, k) in enumerate(series):
        summary = table[label][k]
        heights, errs = [], [[], []]
        for column in columns:
            res = summary["results"].get(column, {})
            value, ci = res.get(metric), res.get(f"{metric}_ci")
            heights.append(np.nan if value is None else value)
            errs[0].append(0.0 if value is None or ci is None else max(0.0, value - ci[0]))
            errs[1].append(0.0 if value is None or ci is None else max(0.0, ci[1] - value))
        name = label if len(table[label]) == 1 else f"{label} ({series_names[k] if series_names else k + 1})"
        xs = np.arange(len(columns)) + (n - (len(series) - 1) / 2) * width
        ax.bar(xs, heights, width, yerr=errs, capsize=3, label=name)
    ax.axhline(50, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks(np.arange(len(columns)), [c.capitalize() for c in columns])
    ax.set_ylabel(f"{metric} (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
    return path


def write_report(
    rows: SummaryRows,
    out_dir: str | Path,
    metric: str = "win_rate_no_ties",
    *,
    series_names: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Write ``summary.json``, ``summary.md`` (markdown table) and ``win_rates.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = _rows(rows)
    paths = {"json": out / "summary.json", "markdown": out / "summary.md", "png": out / "win_rates.png"}
    paths["json"].write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    note = f"Metric: {metric} (%)" + (f"; cells: {' / '.join(series_names)}" if series_names else "") + "\n\n"
    paths["markdown"].write_text(note + markdown_table(table, metric), encoding="utf-8")
    plot_win_rates(table, paths["png"], metric, series_names=series_names)
    return paths
