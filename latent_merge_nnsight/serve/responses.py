"""The answers in OpenAI's shapes: a whole response body (`response_body`, its choices, usage and
logprob objects) or a stream of server-sent chunk events (`stream_events`) as the batcher decodes."""

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

from latent_merge_nnsight.sampling import openai_finish_reason
from latent_merge_nnsight.serve.wire import Prompt, generation_error
from latent_merge_nnsight.systems.batching import Batcher, Completion, without_stop

if TYPE_CHECKING:
    from latent_merge_nnsight.recipe import Recipe

__all__ = ["drop_stop", "response_body", "stream_events", "submit_all"]

logger = logging.getLogger(__name__)


def drop_stop(c: Completion, stops: Sequence[str]) -> Completion:
    """The reply without the stop string that ended it. `lmn.generate` already leaves it out (one rule
    for the package and its servers); this guards systems written outside the package that keep it."""
    text = without_stop(c.text, c.finish_reason, stops)
    return c if text == c.text else dataclasses.replace(c, text=text)


def _usage(cs: list[Completion]) -> dict[str, int]:
    prompt, new = sum(c.prompt_tokens for c in cs), sum(c.completion_tokens for c in cs)
    return {"prompt_tokens": prompt, "completion_tokens": new, "total_tokens": prompt + new}


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))


def _chat_logprobs(c: Completion) -> dict[str, object] | None:
    """OpenAI's chat ``logprobs`` object: one entry per generated token, with its alternatives."""
    if c.logprobs is None:
        return None
    content = [
        {
            "token": t.token,
            "logprob": t.logprob,
            "bytes": _token_bytes(t.token),
            "top_logprobs": [{"token": tok, "logprob": lp, "bytes": _token_bytes(tok)} for tok, lp in t.top],
        }
        for t in c.logprobs
    ]
    return {"content": content, "refusal": None}


def _text_logprobs(c: Completion) -> dict[str, object] | None:
    """The legacy completions ``logprobs`` object: parallel lists over the generated tokens (with echo,
    the prompt's tokens first: the first has ``null`` logprob and alternatives)."""
    if c.logprobs is None:
        return None
    offsets, at = [], 0
    for t in c.logprobs:
        offsets.append(at)
        at += len(t.token)
    return {
        "tokens": [t.token for t in c.logprobs],
        "token_logprobs": [t.logprob for t in c.logprobs],
        "top_logprobs": [None if t.logprob is None else dict(t.top) for t in c.logprobs],
        "text_offset": offsets,
    }


def _finish(c: Completion, openai_words: bool) -> str:
    """The reply's ``finish_reason``: the package's "eos"/"stop"/"length", or with ``openai_words``
    OpenAI's "stop"/"length" (an EOS becomes "stop"), for clients that accept only those."""
    return openai_finish_reason(c.finish_reason) if openai_words else c.finish_reason


def _choice(kind: str, c: Completion, openai_words: bool = False, index: int = 0) -> dict[str, object]:
    finish = _finish(c, openai_words)
    if kind == "chat":
        return {
            "index": index,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": _chat_logprobs(c),
            "finish_reason": finish,
        }
    return {"index": index, "text": c.text, "logprobs": _text_logprobs(c), "finish_reason": finish}


_OBJECT = {"chat": "chat.completion", "text": "text_completion"}
_CHUNK = {"chat": "chat.completion.chunk", "text": "text_completion"}


def response_body(
    kind: str, cid: str, created: int, model: str, cs: list[Completion], openai_words: bool = False
) -> dict[str, object]:
    return {
        "id": cid,
        "object": _OBJECT[kind],
        "created": created,
        "model": model,
        "choices": [_choice(kind, c, openai_words, i) for i, c in enumerate(cs)],
        "usage": _usage(cs),
    }


def _sse(data: str | dict[str, object]) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def submit_all(
    batcher: Batcher, prompts: list[Prompt], params: dict[str, object], recipe: "Recipe | None"
) -> list[Completion]:
    """Every prompt of a request through the batcher (they may share a batch)."""
    return list(await asyncio.gather(*(batcher.submit(p, params, recipe) for p in prompts)))


async def stream_events(
    batcher: Batcher,
    prompts: list[Prompt],
    params: dict[str, object],
    recipe: "Recipe | None",
    ids: tuple[str, str, int, str],
    include_usage: bool,
    openai_words: bool,
) -> AsyncIterator[str]:
    """The server-sent events of one streamed completion (`ids`: kind, id, created, model name): each
    prompt's text as the batcher decodes it (`Batcher.stream`; one choice per prompt, by ``index``), what
    is left of it and its finish reason when it ends, the usage, then [DONE]. Closing the stream (the
    client went away) ends its rows at the next step."""
    kind, cid, created, name = ids
    stops = params.get("stop", ())
    merged: asyncio.Queue[tuple[int, str | Completion | Exception]] = asyncio.Queue()

    async def pump(i: int, prompt: Prompt) -> None:
        try:
            async for item in batcher.stream(prompt, params, recipe):
                merged.put_nowait((i, item))
        except Exception as exc:
            merged.put_nowait((i, exc))

    def chunk(choice: dict[str, object] | None, **extra: object) -> str:
        choices = [choice] if choice is not None else []
        head = {"id": cid, "object": _CHUNK[kind], "created": created, "model": name}
        return _sse(head | {"choices": choices} | extra)

    def piece(i: int, text: str) -> str:
        if kind == "chat":
            return chunk({"index": i, "delta": {"content": text}, "logprobs": None, "finish_reason": None})
        return chunk({"index": i, "text": text, "logprobs": None, "finish_reason": None})

    tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(prompts)]
    sent, answers = [""] * len(prompts), [None] * len(prompts)
    try:
        if kind == "chat":  # Headers are out before generation runs: a failure is an error event
            yield chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None})  # fmt: skip
        while any(a is None for a in answers):
            i, item = await merged.get()
            if isinstance(item, Exception):
                logger.error("generation failed (stream)", exc_info=item)
                yield _sse(generation_error(item).body())
                yield _sse("[DONE]")
                return
            if isinstance(item, str):
                sent[i] += item
                yield piece(i, item)
                continue
            c = answers[i] = drop_stop(item, stops)
            if not c.text.startswith(sent[i]):
                logger.warning("streamed text %r is not a prefix of the answer %r", sent[i], c.text)
            rest = c.text[len(sent[i]) :] if c.text.startswith(sent[i]) else ""
            if rest:  # a streamed request carries no logprobs (`checks`: a 400 asks for stream=false)
                yield piece(i, rest)
            finish = _finish(c, openai_words)
            if kind == "chat":
                yield chunk({"index": i, "delta": {}, "logprobs": None, "finish_reason": finish})
            else:
                yield chunk({"index": i, "text": "", "logprobs": None, "finish_reason": finish})
        if include_usage:
            yield chunk(None, usage=_usage([a for a in answers if a is not None]))
        yield _sse("[DONE]")
    finally:
        for task in tasks:
            task.cancel()
