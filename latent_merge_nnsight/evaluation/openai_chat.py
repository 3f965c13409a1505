"""The judge's chat client: an OpenAI-compatible endpoint through the official `openai` SDK.

Retries (429, 5xx, timeouts, connection errors) are ours, with exponential backoff and jitter; the SDK's
own retries are off. The API key is read from the environment and never logged or written; without one,
only a loopback endpoint (a local server) is accepted.
"""

import asyncio
import logging
import os
import random
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlparse

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.net import is_loopback

logger = logging.getLogger(__name__)

__all__ = ["JudgeRequestError", "Messages", "OpenAIChat", "SleepFn"]

Messages = list[dict[str, str]]
SleepFn = Callable[[float], Awaitable[Any]]

_RETRY_STATUS = frozenset({408, 409, 429})


class JudgeRequestError(LatentMergeError, RuntimeError):
    """A judge request failed for good: a non-retryable status, or retries exhausted.

    ``status`` is the HTTP status of the last attempt (None for a connection error or a garbled reply).
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _GarbledReply(Exception):
    """An HTTP 200 whose body is not a chat completion (not JSON, or no choices): retried like a 5xx."""


def _api_key(api_key_env: str, base_url: str | None) -> str:
    key = os.environ.get(api_key_env)
    if key:
        return key
    if is_loopback(urlparse(base_url or "").hostname or ""):
        return "unused-local-key"  # local servers usually ignore the key, but the SDK wants one
    raise LatentMergeError(
        f"api_key_env={api_key_env!r}: the environment variable {api_key_env} is not set; export your "
        f"API key there (a local server without auth accepts any value, e.g. {api_key_env}=dummy)"
    )


def _error_text(exc: Exception) -> str:
    """The server's own message when its error body has one (e.g. the prompt's and the context's token
    counts), else the exception's text."""
    body = getattr(exc, "body", None)
    message = body.get("message") if isinstance(body, dict) else None
    return message if isinstance(message, str) and message else str(exc)


def _hint(status: int | None) -> str:
    """What to check for a request that failed with `status`: the request itself for a refusal of its
    content (400/413/422, e.g. a prompt over the judge's context), the connection settings otherwise."""
    if status in (400, 413, 422):
        return "the endpoint refused this request itself (its size or content), not the connection"
    if status in (401, 403):
        return "check the key in --api-key-env"
    return "check --base-url, --judge-model and the key in --api-key-env"


def _retry_after(exc: Exception) -> float | None:
    response = getattr(exc, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _reply_text(response: object) -> str:
    """The first choice's text of a chat completion; `_GarbledReply` when the body is not one.

    A well-formed completion whose message has no content is an empty reply (an invalid verdict, not a
    transport error).
    """
    choices = getattr(response, "choices", None)
    if not isinstance(choices, list) or not choices:
        got = type(response).__name__ if choices is None else f"choices={choices!r:.60}"
        raise _GarbledReply(f"the reply is not a chat completion with a choice (got {got})")
    message = getattr(choices[0], "message", None)
    content = getattr(message, "content", None) if message is not None else None
    if message is None or not (content is None or isinstance(content, str)):
        raise _GarbledReply(f"choices[0] has no message text (got {choices[0]!r:.80})")
    return content or ""


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

    def _scrub(self, text: str) -> str:
        """``text`` with the API key's value replaced by ``***`` (replies and errors are written to disk).

        Keys under 8 characters (placeholders such as ``dummy`` for a local server) are no secret, and
        replacing them would mangle replies (a key ``a`` inside ``Output (a)``).
        """
        key = self._client.api_key
        return text.replace(key, "***") if key and len(key) >= 8 else text

    def _retryable(self, exc: Exception) -> bool:
        if isinstance(exc, _GarbledReply):
            return True
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
                try:
                    response = await self._client.chat.completions.create(**kwargs)
                except ValueError as exc:  # a JSON content type over a body that is not JSON
                    raise _GarbledReply(f"the reply is not JSON ({exc})") from None
                return self._scrub(_reply_text(response))
            except (self._openai.OpenAIError, _GarbledReply) as exc:
                status = getattr(exc, "status_code", None)
                if not self._retryable(exc) or attempt == self.max_retries:
                    tried = f"after {attempt + 1} attempt{'s' if attempt else ''}"
                    detail = self._scrub(_error_text(exc))[:400]  # a server may echo the key
                    raise JudgeRequestError(
                        f"judge request to {self.base_url or 'api.openai.com'} (model {self.judge_model!r}) "
                        f"failed {tried}: {type(exc).__name__} (status {status}): {detail}; {_hint(status)}",
                        status,
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
        raise AssertionError("unreachable")  # pragma: no cover

    async def aclose(self) -> None:
        """Close the underlying HTTP client."""
        await self._client.close()

    async def __aenter__(self) -> "OpenAIChat":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
