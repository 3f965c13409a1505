"""Batching: requests that arrive together (HTTP clients, a concurrent judge) become one `complete` call.

`Batcher` lives in one event loop: after the first waiting request it gathers more for up to
``max_wait_ms`` (or until ``max_batch_size``), groups them by sampling parameters (one `generate`
call takes one set) and runs each group in the system's single generation thread, so an nnsight model
is never traced from two threads. `SystemCompleteFn` wraps a loaded system as the async
``messages -> text`` callable a judge takes; `Completion` is what one request gets back.
"""

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from latent_merge_nnsight.errors import LatentMergeError

__all__ = ["BatchStats", "Batcher", "Completion", "SystemCompleteFn", "TokenLogprob"]


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


@dataclass
class _Request:
    prompt: Any
    params: dict[str, Any]
    future: "asyncio.Future[Completion]"


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

    def __init__(self, system: Any, *, max_batch_size: int = 8, max_wait_ms: float = 5.0) -> None:
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

    async def submit(self, prompt: Any, params: Mapping[str, Any] | None = None) -> Completion:
        """Queue one prompt with its sampling overrides; wait for its `Completion`."""
        if self._queue is None or self.loop is not asyncio.get_running_loop():
            raise LatentMergeError("Batcher.submit called before start() in this event loop")
        future: asyncio.Future[Completion] = self.loop.create_future()
        await self._queue.put(_Request(prompt, dict(params or {}), future))
        return await future

    async def close(self) -> None:
        """Stop collecting; requests still queued fail with `LatentMergeError`."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        while self._queue is not None and not self._queue.empty():
            request = self._queue.get_nowait()
            if not request.future.done():
                request.future.set_exception(LatentMergeError("the batcher was closed"))
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
                live = [r for r in group if not r.future.done()]  # a cancelled caller needs no answer
                if live:
                    await self._run(live)

    async def _run(self, group: list[_Request]) -> None:
        """One `complete` call for the group; any failure goes to every caller, never kills the loop."""
        prompts, params = [r.prompt for r in group], group[0].params
        self.stats.batch_sizes.append(len(group))
        try:
            results = await self._in_worker(lambda: self.system.complete(prompts, **params))
            if len(results) != len(group):
                raise RuntimeError(f"the system returned {len(results)} completions for {len(group)} prompts")
        except Exception as exc:
            for r in group:
                if not r.future.done():
                    r.future.set_exception(exc)
            return
        for r, result in zip(group, results, strict=True):
            if not r.future.done():
                r.future.set_result(result)


class SystemCompleteFn:
    """An async ``messages -> text`` judge callable over a loaded system, batching concurrent calls.

    Works across event loops (each `asyncio.run` gets its own `Batcher`); the model always runs in the
    system's single generation thread. ``stats`` counts the batched calls.
    """

    def __init__(
        self, system: Any, *, max_batch_size: int, max_wait_ms: float, overrides: Mapping[str, Any]
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
