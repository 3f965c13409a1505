"""Batching: requests that arrive together (HTTP clients, a concurrent judge) become one `complete` call.

`Batcher` lives in one event loop: after the first waiting request it gathers more for up to
``max_wait_ms`` (or until ``max_batch_size``), groups them by sampling parameters (one `generate`
call takes one set; requests with their own recipes share a group: the call gets one recipe per row)
and runs each group in the system's single generation thread, so an nnsight model is never traced from
two threads. A streamed request (`Batcher.stream`) gets its text as the generation loop's step hook
decodes it (`_StreamHook`, for a system with ``streams_tokens``), held back while it could still grow
into a stop string; its row ends at the next step once its client stops listening.
`SystemCompleteFn` wraps a loaded system as the async ``messages -> text`` callable a judge takes;
`Completion` is what one request gets back.
"""

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.nouns import Chat

if TYPE_CHECKING:
    from latent_merge_nnsight.generation.loop import Run
    from latent_merge_nnsight.recipe import Recipe

__all__ = ["BatchStats", "Batcher", "Completion", "SystemCompleteFn", "TokenLogprob", "without_stop"]


Prompt: TypeAlias = str | Chat | Sequence[int]
"""One request's prompt: a string, a chat, or token ids."""


@dataclass(frozen=True)
class TokenLogprob:
    """One token, its log-probability and (when asked for) the most likely alternatives (an echoed
    prompt's first token has neither: ``logprob`` None)."""

    token: str
    logprob: float | None
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Completion:
    """One generated answer: its text, why it ended (``"eos"``, ``"stop"`` or ``"length"``, the one
    vocabulary `sampling.FINISH_REASONS`), token counts, and ``logprobs`` (one per generated token)
    when they were asked for."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] | None = None


class CompletingSystem(Protocol):
    """What the batcher runs: a loaded system's batched `complete` (`systems.loaded.LoadedSystem`)."""

    def complete(self, prompts: Sequence[Prompt], **kwargs: object) -> list[Completion]: ...


def without_stop(text: str, finish_reason: str, stops: Sequence[str]) -> str:
    """The text OpenAI sends: without the stop string that ended it (as `lmn.generate` gives it)."""
    if finish_reason == "stop":
        for stop in stops:
            if stop and text.endswith(stop):
                return text[: -len(stop)]
    return text


def settled(text: str, stops: Sequence[str]) -> int:
    """How much of a running row's text can be sent: all but a trailing unfinished character (U+FFFD
    while its bytes are split across tokens) and any tail that could still grow into a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    cut = end
    for stop in stops:
        at = text.find(stop, 0, end)
        if at != -1:
            cut = min(cut, at)
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text.endswith(stop[:k], 0, end):
                cut = min(cut, end - k)
                break
    return cut


@dataclass
class _Request:
    prompt: Prompt
    params: dict[str, Any]
    future: "asyncio.Future[Completion]"
    recipe: "Recipe | None" = None  # the request's own recipe (None: the system's)
    deltas: "asyncio.Queue[Any] | None" = None  # streamed: text pieces, then its Completion (or an error)
    gone: bool = False  # a streamed request whose client stopped listening: its row ends at the next step
    answered: bool = False  # a streamed request whose Completion went out at the step its row finished

    def wanted(self) -> bool:
        return not self.gone if self.deltas is not None else not self.future.done()

    def fail(self, exc: Exception) -> None:
        if self.deltas is not None:
            self.deltas.put_nowait(exc)
        elif not self.future.done():
            self.future.set_exception(exc)

    def answer(self, completion: Completion) -> None:
        if self.deltas is not None:
            if not self.answered:
                self.deltas.put_nowait(completion)
        elif not self.future.done():
            self.future.set_result(completion)


class _StreamHook:
    """The generation loop's step hook (`generation.loop.Run.on_step`) for a batch with streamed rows, in
    the generation thread: each streamed row's new text as it is decoded (`settled`), its `Completion`
    at the step it finishes; returns the rows whose clients went away (they end now)."""

    def __init__(self, group: list[_Request], loop: asyncio.AbstractEventLoop) -> None:
        self.group, self.loop = group, loop
        self.sent = [0] * len(group)

    def __call__(self, run: "Run", rows: list[int], tokens: list[int]) -> list[int]:
        tracker = run.tracker
        for row in rows:
            request = self.group[row]
            if request.deltas is None or request.gone:
                continue
            reason = tracker.reasons[row]
            if reason is not None:
                prompt_tokens = int(run.batch.attention_mask[row].sum())
                completion = Completion(tracker.text(row), reason, prompt_tokens, len(tracker.tokens[row]))
                request.answered = True
                self.loop.call_soon_threadsafe(request.deltas.put_nowait, completion)
                continue
            text = tracker.tokenizer.decode(tracker.tokens[row], skip_special_tokens=True)
            end = settled(text, tracker.stop)
            if end > self.sent[row]:
                self.loop.call_soon_threadsafe(request.deltas.put_nowait, text[self.sent[row] : end])
                self.sent[row] = end
        return [i for i, r in enumerate(self.group) if r.gone and tracker.reasons[i] is None]


@dataclass
class BatchStats:
    """What a `Batcher` did: how many `complete` calls, and the batch size of each."""

    batch_sizes: list[int] = field(default_factory=list)

    @property
    def calls(self) -> int:
        return len(self.batch_sizes)


class Batcher:
    """Collects requests that arrive together into batched `complete` calls on one loaded system.

    After the first waiting request it gathers more for up to ``max_wait_ms`` (or until
    ``max_batch_size``), groups them by sampling parameters and runs each group as one call in the
    system's generation thread. Must be started inside the event loop that submits to it.
    """

    def __init__(
        self, system: CompletingSystem, *, max_batch_size: int = 8, max_wait_ms: float = 5.0
    ) -> None:
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise LatentMergeError(
                f"max_batch_size={max_batch_size!r}; expected an int >= 1",
                param="max_batch_size",
                value=max_batch_size,
            )
        if not (isinstance(max_wait_ms, int | float) and 0 <= max_wait_ms < 60_000):
            raise LatentMergeError(
                f"max_wait_ms={max_wait_ms!r}; expected 0 <= max_wait_ms < 60000",
                param="max_wait_ms",
                value=max_wait_ms,
            )
        self.system = system
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Request] | None = None
        self._task: asyncio.Task[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        # A system without its own generation thread gets one from the batcher.
        self._own_executor = (
            None
            if hasattr(system, "run_in_worker")
            else ThreadPoolExecutor(1, thread_name_prefix="lmn-batch")
        )

    def _in_worker(self, fn: Callable[[], Any]) -> "asyncio.Future[Any]":
        if self._own_executor is None:
            return self.system.run_in_worker(fn)
        return asyncio.get_running_loop().run_in_executor(self._own_executor, fn)

    def start(self) -> None:
        """Start the collecting task in the running event loop."""
        self.loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        self._task = self.loop.create_task(self._work())

    def _request(
        self, prompt: Prompt, params: Mapping[str, Any] | None, recipe: "Recipe | None", stream: bool
    ) -> _Request:
        if self._queue is None or self.loop is not asyncio.get_running_loop():
            raise LatentMergeError("Batcher.submit called before start() in this event loop")
        deltas: asyncio.Queue[Any] | None = asyncio.Queue() if stream else None
        return _Request(prompt, dict(params or {}), self.loop.create_future(), recipe, deltas)

    async def submit(
        self, prompt: Prompt, params: Mapping[str, Any] | None = None, recipe: "Recipe | None" = None
    ) -> Completion:
        """Queue one prompt with its sampling overrides (and its own recipe: None for the system's); wait
        for its `Completion`."""
        request = self._request(prompt, params, recipe, stream=False)
        assert self._queue is not None
        await self._queue.put(request)
        return await request.future

    async def stream(
        self, prompt: Prompt, params: Mapping[str, Any] | None = None, recipe: "Recipe | None" = None
    ) -> AsyncIterator[str | Completion]:
        """Like `submit`, yielding the answer's text in pieces as they are decoded (never a piece of a
        stop string; all of it at the end for a system without ``streams_tokens``), then its
        `Completion` (whose text holds the whole answer). Leaving early ends the row at the next step."""
        request = self._request(prompt, params, recipe, stream=True)
        assert self._queue is not None and request.deltas is not None
        await self._queue.put(request)
        try:
            while True:
                item = await request.deltas.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if isinstance(item, Completion):
                    return
        finally:
            request.gone = True

    async def close(self) -> None:
        """Stop collecting; requests still queued fail with `LatentMergeError`."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        while self._queue is not None and not self._queue.empty():
            self._queue.get_nowait().fail(LatentMergeError("the batcher was closed"))
        if self._own_executor is not None:
            self._own_executor.shutdown(wait=False)

    async def _collect(self) -> list[_Request]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch_size:
            while len(batch) < self.max_batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            remaining = deadline - time.monotonic()
            if len(batch) >= self.max_batch_size or remaining <= 0:
                break
            await asyncio.sleep(min(remaining, 0.001))
        return batch

    async def _work(self) -> None:
        while True:
            batch = await self._collect()
            groups: dict[str, list[_Request]] = {}
            for request in batch:
                groups.setdefault(json.dumps(request.params, sort_keys=True), []).append(request)
            for group in groups.values():
                live = [r for r in group if r.wanted()]  # a cancelled caller needs no answer
                if live:
                    await self._run(live)

    async def _run(self, group: list[_Request]) -> None:
        """One `complete` call for the group; any failure goes to every caller, never kills the loop."""
        prompts, params = [r.prompt for r in group], group[0].params
        kwargs = dict(params)
        if any(r.recipe is not None for r in group):
            kwargs["recipes"] = [r.recipe for r in group]
        hooked = getattr(self.system, "streams_tokens", False) and not (
            "logprobs" in params or "echo" in params
        )
        if hooked and any(r.deltas is not None for r in group):
            assert self.loop is not None
            kwargs["on_step"] = _StreamHook(group, self.loop)
        self.stats.batch_sizes.append(len(group))
        try:
            results = await self._in_worker(lambda: self.system.complete(prompts, **kwargs))
            if len(results) != len(group):
                raise RuntimeError(f"the system returned {len(results)} completions for {len(group)} prompts")
        except Exception as exc:
            for r in group:
                r.fail(exc)
            return
        for r, result in zip(group, results, strict=True):
            r.answer(result)


class SystemCompleteFn:
    """An async ``messages -> text`` judge callable over a loaded system, batching concurrent calls.

    Works across event loops (each `asyncio.run` gets its own `Batcher`); the model always runs in the
    system's single generation thread. ``stats`` counts the batched calls.
    """

    def __init__(
        self,
        system: CompletingSystem,
        *,
        max_batch_size: int,
        max_wait_ms: float,
        overrides: Mapping[str, Any],
    ) -> None:
        self.system = system
        self.max_batch_size, self.max_wait_ms = max_batch_size, max_wait_ms
        self.overrides = dict(overrides)
        self.stats = BatchStats()
        self._batcher: Batcher | None = None

    async def __call__(self, messages: list[dict[str, str]]) -> str:
        loop = asyncio.get_running_loop()
        if self._batcher is None or self._batcher.loop is not loop:
            self._batcher = Batcher(
                self.system, max_batch_size=self.max_batch_size, max_wait_ms=self.max_wait_ms
            )
            self._batcher.stats = self.stats
            self._batcher.start()
        completion = await self._batcher.submit(list(messages), self.overrides)
        return completion.text

    def __repr__(self) -> str:
        return f"SystemCompleteFn(system={getattr(self.system, 'name', '?')!r})"
