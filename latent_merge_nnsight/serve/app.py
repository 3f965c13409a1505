"""The OpenAI-compatible app (FastAPI) and the functions that run it with uvicorn."""

import asyncio
import dataclasses
import hmac
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.net import is_loopback
from latent_merge_nnsight.request_recipe import KEY, check_request
from latent_merge_nnsight.sampling import openai_finish_reason
from latent_merge_nnsight.systems.batching import Batcher, Completion, without_stop
from latent_merge_nnsight.systems.loaded import load_system
from latent_merge_nnsight.systems.spec import System

# fastapi and uvicorn (the `eval` extra) are imported inside functions: the package works without them.

__all__ = ["create_app", "run_serve", "start_server"]

logger = logging.getLogger(__name__)

MAX_STOP_STRINGS = 4
MAX_INT = 2**31 - 1
"""The largest ``max_tokens`` / ``top_k`` a request may carry (larger ones are a 400, never an overflow)."""
MAX_SEED = 2**63 - 1
MAX_TOP_LOGPROBS = 20
DEFAULT_MAX_BODY_BYTES = 8 * 2**20
API_KEY_ENV = "LMN_API_KEY"
DEFAULT_MAX_TOKENS_LIMIT = 4096
"""`max_tokens` cap when neither ``max_tokens_limit`` nor the system's context length is known."""


# ---------------------------------------------------------------------------------------------------
# Request schema and OpenAI-style errors
# ---------------------------------------------------------------------------------------------------


class _TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    type: Literal["text"]
    text: str


class _Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart] | None = None


class _StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    include_usage: bool = False


class _Request(BaseModel):
    """What chat and text completions share (other OpenAI fields are ignored)."""

    model_config = ConfigDict(strict=True, extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1, le=MAX_INT)
    n: int | None = Field(None, ge=1, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool | None = False
    stream_options: _StreamOptions | None = None
    latent_merge: str | dict[str, Any] | None = None
    vllm_xargs: dict[str, Any] | None = None


class ChatRequest(_Request):
    """The part of OpenAI's chat-completions request this server understands (other fields are ignored)."""

    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_INT)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionRequest(_Request):
    """OpenAI's legacy text-completions request: prompts (text or token ids) in, their continuations (or,
    with ``echo``, the prompts' own logprobs) out."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0, le=MAX_INT)  # 0: only with echo (scoring the prompt)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool | None = False
    suffix: str | None = None


_HARMLESS = frozenset({"user", "metadata", "store", "service_tier"})
"""OpenAI request fields that change nothing this server computes (accepted)."""
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "response_format": ({"type": "text"},),
    "logit_bias": ({},),
    "frequency_penalty": (0,),
    "presence_penalty": (0,),
    "repetition_penalty": (1,),
    "best_of": (1,),
    "min_tokens": (0,),
    "min_p": (0,),
    "tools": ([],),
    "functions": ([],),
    "tool_choice": ("none",),
    "modalities": (["text"],),
}
"""Fields this server does not implement, with the values that ask for nothing (accepted); any other
value is a 400 naming the field."""
_WHY = {"tools": "tool calling", "functions": "tool calling", "tool_choice": "tool calling"}


class _TokenizeRequest(BaseModel):
    """vLLM's ``POST /tokenize`` body (text prompts)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class _DetokenizeRequest(BaseModel):
    """vLLM's ``POST /detokenize`` body."""

    model_config = ConfigDict(strict=True, extra="forbid")

    model: str | None = None
    tokens: list[int]


class ApiError(Exception):
    """An error the client caused (or a failed generation), sent as an OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _validation_error(exc: ValidationError) -> ApiError:
    err = exc.errors()[0]
    if err["type"] == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON: {err['msg']}", code="invalid_json")
    if not err["loc"]:
        return ApiError(400, "the request body must be a JSON object", code="invalid_json")
    param = _param(err["loc"])
    if err["type"] == "missing" and _param(err["loc"]) == ".".join(str(p) for p in err["loc"]):
        return ApiError(
            400, f"missing required parameter: '{param}'", param=param, code="missing_required_parameter"
        )
    if param == "n":
        return ApiError(
            400,
            f"n={err['input']!r} is not supported; this server returns exactly one choice (n=1)",
            param="n",
            code="invalid_value",
        )
    # a union (stop: str | list[str], content: str | parts) fails once per member: report them together
    same = [e for e in exc.errors() if _param(e["loc"]) == param]
    msg = "; or ".join(dict.fromkeys(e["msg"] for e in same))
    got = json.dumps(err.get("input"))[:80] if "input" in err else "?"
    return ApiError(400, f"invalid value for '{param}': {msg} (got {got})", param=param, code="invalid_value")


def _param(loc: tuple[Any, ...]) -> str:
    """The request parameter an error is about: its location up to the first union member tag."""
    parts = []
    for p in loc:
        if isinstance(p, str) and ("[" in p or p in ("str", "int", "float", "bool")):
            break
        parts.append(str(p))
    return ".".join(parts)


def _chat(request: ChatRequest) -> list[dict[str, str]]:
    """OpenAI messages -> the plain chat the system's template renders (text parts joined)."""
    chat = []
    for m in request.messages:
        if m.content is None:
            content = ""
        elif isinstance(m.content, str):
            content = m.content
        else:
            content = "".join(part.text for part in m.content)
        chat.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return chat


def _max_new_tokens(request: _Request) -> tuple[str, int | None]:
    """(the parameter's name, its value) of the request's token budget."""
    extra = getattr(request, "max_completion_tokens", None)
    if extra is not None:
        return "max_completion_tokens", extra
    return "max_tokens", request.max_tokens


def _logprobs(request: _Request) -> int | None:
    """How many alternatives per token to report (0: the chosen token only), or None for no logprobs."""
    if isinstance(request, ChatRequest):
        if not request.logprobs:
            if request.top_logprobs:
                raise ApiError(
                    400, "top_logprobs needs logprobs=true", param="top_logprobs", code="invalid_value"
                )
            return None
        return request.top_logprobs or 0
    assert isinstance(request, CompletionRequest)
    return request.logprobs


def _refuse_unsupported(request: _Request) -> None:
    """A 400 naming the first field the request sets that this server would otherwise ignore: one it
    does not implement (with a value other than its neutral one) or one it does not know."""
    for name, value in (request.model_extra or {}).items():
        if value is None or name in _HARMLESS or value in _NEUTRAL.get(name, ()):
            continue
        what = f" ({_WHY[name]})" if name in _WHY else ""
        known = "is not supported" if name in _NEUTRAL else "is not a parameter this endpoint supports"
        raise ApiError(
            400,
            f"'{name}'{what} {known} by this server; leave it out rather than have it ignored",
            param=name,
            code="unsupported_parameter",
        )


def _overrides(request: _Request) -> dict[str, Any]:
    """Sampling overrides from the request (absent fields keep the system's own settings)."""
    _refuse_unsupported(request)
    out: dict[str, Any] = {}
    if request.temperature is not None:
        out["do_sample"] = request.temperature > 0
        if request.temperature > 0:
            out["temperature"] = request.temperature
    elif request.top_p is not None or request.top_k is not None:
        out["do_sample"] = True
    if request.top_p is not None:
        out["top_p"] = request.top_p
    if request.top_k is not None:
        out["top_k"] = request.top_k
    if request.seed is not None:
        out["seed"] = request.seed
    if request.stop is not None:
        stops = [request.stop] if isinstance(request.stop, str) else list(request.stop)
        if len(stops) > MAX_STOP_STRINGS or any(s == "" for s in stops):
            raise ApiError(
                400,
                f"stop={request.stop!r}: expected up to {MAX_STOP_STRINGS} non-empty strings",
                param="stop",
                code="invalid_value",
            )
        out["stop"] = stops
    return out


_OVERRIDE_PARAM = {"max_new_tokens": "max_tokens", "do_sample": "temperature"}


def _check_sampling(system: Any, overrides: dict[str, Any], budget_param: str) -> None:
    """The system's own validation of the overrides (the pydantic `SamplingSpec`), as a 400 naming the
    request parameter at fault: the error's `param`, spelled as the request spells it (`_OVERRIDE_PARAM`)."""
    check = getattr(system, "sampling", None)
    if check is None:
        return
    try:
        check(**overrides)
    except LatentMergeError as exc:
        key = exc.param
        param = budget_param if key == "max_new_tokens" else _OVERRIDE_PARAM.get(key, key)
        raise ApiError(400, str(exc), param=param, code="invalid_value") from None


def _prompt_list(request: CompletionRequest) -> list[str | list[int]]:
    """The request's prompts: each a string or a token-id list (one string, one id list, or a list of
    either)."""
    prompt = request.prompt
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise ApiError(400, "prompt is an empty list; expected at least one prompt", param="prompt")
    if isinstance(prompt[0], int):
        return [list(prompt)]  # type: ignore[arg-type]
    prompts = list(prompt)
    if any(len(p) == 0 for p in prompts):
        raise ApiError(400, "prompt holds an empty prompt; every prompt needs a token", param="prompt")
    return prompts  # type: ignore[return-value]


def _latent_merge(request: _Request, system: Any) -> tuple[Any, int | None]:
    """The request's ``latent_merge`` (in ``vllm_xargs`` or the body; JSON text or an object), vLLM's
    per-request protocol (`request_recipe`): (its own recipe, by the system's `request_recipe`, or None;
    its ``merge_from``, for echo). A bad form is a 400 naming the field."""
    extra = dict(request.vllm_xargs or {})
    unknown = sorted(set(extra) - {KEY})
    if unknown:
        raise ApiError(
            400, f"vllm_xargs keys {unknown} are not supported; expected {KEY}", param="vllm_xargs"
        )
    given = [v for v in (request.latent_merge, extra.get(KEY)) if v is not None]
    if not given:
        return None, None
    if len(given) > 1:
        raise ApiError(400, f"give {KEY} once: in vllm_xargs or in the body", param=KEY)
    resolve = getattr(system, "request_recipe", None)
    try:
        raw = check_request(given[0])
        recipe = None
        if set(raw) - {"merge_from", "allow_extrapolation"}:  # alphas (and an op): the request's own recipe
            if resolve is None:
                raise LatentMergeError(f"{KEY}: this system takes no per-request recipe")
            recipe = resolve(raw)
    except LatentMergeError as exc:  # the message names the field (latent_merge.layers, .op, .alpha)
        raise ApiError(400, str(exc), param=KEY, code="invalid_value") from None
    merge_from = raw.get("merge_from")
    if merge_from is not None and not getattr(request, "echo", False):
        raise ApiError(
            400, f"{KEY}.merge_from says where an echoed prompt's merge starts; it needs echo=true", param=KEY
        )
    return recipe, merge_from


# ---------------------------------------------------------------------------------------------------
# Response bodies
# ---------------------------------------------------------------------------------------------------


def _without_stop(c: Completion, stops: Any) -> Completion:
    """OpenAI leaves the stop sequence out of the reply; `lmn.generate` keeps it at the end of the text."""
    text = without_stop(c.text, c.finish_reason, stops)
    return c if text == c.text else dataclasses.replace(c, text=text)


def _usage(cs: list[Completion]) -> dict[str, int]:
    prompt, new = sum(c.prompt_tokens for c in cs), sum(c.completion_tokens for c in cs)
    return {"prompt_tokens": prompt, "completion_tokens": new, "total_tokens": prompt + new}


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))


def _chat_logprobs(c: Completion) -> dict[str, Any] | None:
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


def _text_logprobs(c: Completion) -> dict[str, Any] | None:
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


def _choice(kind: str, c: Completion, openai_words: bool = False, index: int = 0) -> dict[str, Any]:
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


def _body(
    kind: str, cid: str, created: int, model: str, cs: list[Completion], openai_words: bool = False
) -> dict[str, Any]:
    return {
        "id": cid,
        "object": _OBJECT[kind],
        "created": created,
        "model": model,
        "choices": [_choice(kind, c, openai_words, i) for i, c in enumerate(cs)],
        "usage": _usage(cs),
    }


def _sse(data: Any) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


# ---------------------------------------------------------------------------------------------------
# Authentication and the request size limit (plain ASGI, so streamed responses pass through untouched)
# ---------------------------------------------------------------------------------------------------


class _Guard:
    """Refuses oversized bodies (413, from Content-Length) and, with a key, unauthenticated calls (401;
    the key is compared in constant time). ``/health`` stays open."""

    def __init__(self, app: Any, *, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.max_body_bytes = app, max_body_bytes
        self._expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_body_bytes:
            await _send_error(send, ApiError(413, _too_large(self.max_body_bytes), code="request_too_large"))
            return
        if self._expected is not None and scope["path"] != "/health":
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                error = ApiError(
                    401,
                    "missing or wrong API key: send the header 'Authorization: Bearer <key>' with the key "
                    "the server was started with (--api-key / LMN_API_KEY)",
                    code="invalid_api_key",
                )
                await _send_error(send, error, {"www-authenticate": "Bearer"})
                return
        await self.app(scope, receive, send)


def _too_large(limit: int) -> str:
    return f"the request body is larger than this server's limit of {limit} bytes (max_body_bytes)"


async def _send_error(send: Any, error: ApiError, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(error.body()).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------------


def _check_limit(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise LatentMergeError(f"{name}={value!r}; expected an int >= 1 or None")


def create_app(
    system: Any,
    *,
    max_batch_size: int = 8,
    max_wait_ms: float = 5.0,
    max_prompt_tokens: int | None = None,
    max_tokens_limit: int | None = None,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    openai_finish_reasons: bool = False,
) -> Any:
    """A FastAPI app serving ``system`` (a `LoadedSystem`, or any object with ``name``,
    ``complete(prompts, **sampling) -> list[Completion]`` and ``count_prompt_tokens(prompt)``).

    Arguments:
        max_batch_size: requests per batched `generate` call at most.
        max_wait_ms: how long the first waiting request waits for others to join its batch.
        max_prompt_tokens: longer prompts get a 400 (default: the system's ``context_length``).
        max_tokens_limit: larger ``max_tokens`` values get a 400 (default: the system's
            ``context_length``, else 4096). A request never gets more new tokens than the context
            leaves after its prompt: asking for more is a 400 naming ``max_tokens``, and a request that
            names no budget gets the system's default cut to what fits.
        api_key: when set, every ``/v1`` request needs ``Authorization: Bearer <api_key>`` (else 401).
        max_body_bytes: larger request bodies get a 413.
        openai_finish_reasons: ``finish_reason`` in OpenAI's words only ("stop", "length": an EOS is
            "stop"); by default it is the package's one vocabulary, "eos", "stop" or "length".
    """
    from fastapi import FastAPI

    context, max_prompt_tokens, max_tokens_limit = _limits(
        system, max_prompt_tokens, max_tokens_limit, max_body_bytes, api_key
    )
    batcher = Batcher(system, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms)
    name = system.name
    started = int(time.time())
    default_budget = getattr(
        getattr(getattr(system, "config", None), "sampling", None), "max_new_tokens", None
    )

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            await batcher.close()

    app = FastAPI(title=f"lmn serve: {name}", lifespan=lifespan)
    app.state.system, app.state.batcher = system, batcher
    _add_error_handlers(app)
    _add_model_routes(app, name, started)
    limits = _Limits(context, max_prompt_tokens, max_tokens_limit, max_body_bytes, default_budget)
    _add_completion_routes(app, system, batcher, limits, openai_finish_reasons)
    _add_tokenizer_routes(app, system, limits)
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    return app


def _limits(
    system: Any, max_prompt_tokens: Any, max_tokens_limit: Any, max_body_bytes: Any, api_key: Any
) -> tuple[int | None, int | None, int]:
    """`create_app`'s limits checked, with their defaults: (the context requests are held to, the prompt
    limit, the max_tokens limit)."""
    for limit_name, limit in (
        ("max_prompt_tokens", max_prompt_tokens),
        ("max_tokens_limit", max_tokens_limit),
        ("max_body_bytes", max_body_bytes),
    ):
        _check_limit(limit_name, limit)
    context = getattr(system, "context_length", None)
    if max_prompt_tokens is None:
        max_prompt_tokens = context
    elif context is not None and max_prompt_tokens > context:
        logger.warning(
            "max_prompt_tokens=%d is beyond the model's context of %d: prompts and answers may run past it",
            max_prompt_tokens,
            context,
        )
        context = None  # the caller chose to go past the model's nominal context
    if max_tokens_limit is None:
        max_tokens_limit = context if context is not None else DEFAULT_MAX_TOKENS_LIMIT
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
        raise LatentMergeError("api_key is empty; give a non-empty key or None for no authentication")
    return context, max_prompt_tokens, max_tokens_limit


def _add_error_handlers(app: Any) -> None:
    """Every error as an OpenAI-style error body: ours (`ApiError`), starlette's (404, 405), and any other
    (500)."""
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(ApiError)
    async def _api_error(request: Any, exc: ApiError) -> Any:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Any, exc: HTTPException) -> Any:
        message = f"{exc.detail}: {request.method} {request.url.path}"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(ApiError(exc.status_code, message, code=code).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _server_error(request: Any, exc: Exception) -> Any:
        logger.exception("unhandled error serving %s", request.url.path)
        body = ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").body()
        return JSONResponse(body, status_code=500)


def _unknown_model(model_id: str, name: str) -> ApiError:
    return ApiError(
        404,
        f"the model '{model_id}' does not exist; this server serves '{name}'",
        param="model",
        code="model_not_found",
    )


def _add_model_routes(app: Any, name: str, started: int) -> None:
    """`/health`, `/v1/models` and `/v1/models/{id}`: the one model served."""

    def model_card() -> dict[str, Any]:
        return {"id": name, "object": "model", "created": started, "owned_by": "latent_merge_nnsight"}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "model": name}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != name:
            raise _unknown_model(model_id, name)
        return model_card()


@dataclasses.dataclass(frozen=True)
class _Limits:
    """What `create_app` holds every request to (limits already defaulted by `_limits`)."""

    context: int | None  # None: the caller chose to go past the model's nominal context
    max_prompt_tokens: int | None
    max_tokens_limit: int
    max_body_bytes: int
    default_budget: int | None  # the system's own max_new_tokens


async def _prepare(
    request: Any, schema: type[_Request], system: Any, limits: _Limits
) -> tuple[Any, list[Any], dict[str, Any], Any]:
    """Validate a request: (the parsed body, its prompts for the system, the generation params, its own
    recipe or None)."""
    try:
        body = schema.model_validate_json(await _read_body(request, limits.max_body_bytes))
    except ValidationError as exc:
        raise _validation_error(exc) from None
    if body.model != system.name:
        raise _unknown_model(body.model, system.name)
    prompts, prompt_param = _request_prompts(body)
    overrides = _overrides(body)
    budget_param, budget = _max_new_tokens(body)
    echo = isinstance(body, CompletionRequest) and bool(body.echo)
    recipe, merge_from = _latent_merge(body, system)
    if budget == 0 and not echo:
        raise ApiError(
            400,
            "max_tokens=0 generates nothing; it is for echo=true (scoring the prompt)",
            param="max_tokens",
        )
    _check_budget_limit(budget_param, budget, limits.max_tokens_limit)
    _check_sampling(system, overrides | ({"max_new_tokens": budget} if budget else {}), budget_param)
    counts = []
    for prompt in prompts:
        try:  # off the event loop: a huge prompt must not stall other clients
            counts.append(await asyncio.to_thread(system.count_prompt_tokens, prompt))
        except Exception as exc:  # e.g. the chat template rejects the conversation, ids out of range
            raise ApiError(
                400, f"the {prompt_param} cannot be rendered for this model: {exc}", param=prompt_param
            ) from None
    need = 0 if echo and budget == 0 else 1  # echo with max_tokens 0 runs the prompt alone
    _fit_budget(overrides, limits, max(counts), prompt_param, budget_param, budget, need)
    _add_logprobs(overrides, system, body)
    if echo:
        _add_echo(overrides, system, budget, merge_from, counts)
    return body, prompts, overrides, recipe


def _add_echo(
    overrides: dict[str, Any], system: Any, budget: int | None, merge_from: int | None, counts: list[int]
) -> None:
    """An echo request's checks (the system's own: `LoadedSystem.check_echo`) and its params."""
    check = getattr(system, "check_echo", None)
    if check is None:
        raise ApiError(
            400, "echo=true is not supported by this system", param="echo", code="unsupported_parameter"
        )
    if budget is None:
        raise ApiError(400, "echo=true scores the prompt: give max_tokens 0 or 1", param="max_tokens")
    if merge_from is not None and merge_from >= min(counts):
        raise ApiError(
            400,
            f"latent_merge.merge_from={merge_from} is past the end of a prompt of {min(counts)} tokens",
            param="latent_merge",
        )
    try:
        check(overrides.get("logprobs"), budget, merge_from)
    except LatentMergeError as exc:
        param = re.match(r"[a-z_]*", str(exc)).group(0) or "echo"  # the messages start with the parameter
        raise ApiError(400, str(exc), param=param, code="unsupported_parameter") from None
    overrides["echo"] = True
    if merge_from is not None:
        overrides["merge_from"] = merge_from


async def _submit_all(
    batcher: Batcher, prompts: list[Any], params: dict[str, Any], recipe: Any
) -> list[Completion]:
    """Every prompt of a request through the batcher (they may share a batch)."""
    return list(await asyncio.gather(*(batcher.submit(p, params, recipe) for p in prompts)))


async def _events(
    batcher: Batcher,
    prompts: list[Any],
    params: dict[str, Any],
    recipe: Any,
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
    merged: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(i: int, prompt: Any) -> None:
        try:
            async for item in batcher.stream(prompt, params, recipe):
                merged.put_nowait((i, item))
        except Exception as exc:
            merged.put_nowait((i, exc))

    def chunk(choice: dict[str, Any] | None, **extra: Any) -> str:
        choices = [choice] if choice is not None else []
        head = {"id": cid, "object": _CHUNK[kind], "created": created, "model": name}
        return _sse(head | {"choices": choices} | extra)

    def piece(i: int, text: str, logprobs: Any = None) -> str:
        if kind == "chat":
            return chunk(
                {"index": i, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": None}
            )
        return chunk({"index": i, "text": text, "logprobs": logprobs, "finish_reason": None})

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
                yield _sse(_generation_error(item).body())
                yield _sse("[DONE]")
                return
            if isinstance(item, str):
                sent[i] += item
                yield piece(i, item)
                continue
            c = answers[i] = _without_stop(item, stops)
            if not c.text.startswith(sent[i]):
                logger.warning("streamed text %r is not a prefix of the answer %r", sent[i], c.text)
            rest = c.text[len(sent[i]) :] if c.text.startswith(sent[i]) else ""
            if rest or c.logprobs is not None:
                yield piece(i, rest, (_chat_logprobs if kind == "chat" else _text_logprobs)(c))
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


def _add_completion_routes(
    app: Any, system: Any, batcher: Batcher, limits: _Limits, openai_words: bool = False
) -> None:
    """`/v1/chat/completions` and `/v1/completions`: checked, batched, answered whole or streamed
    (``finish_reason`` in OpenAI's words with ``openai_words``, see `create_app`)."""
    from fastapi import Request
    from fastapi.responses import StreamingResponse

    name = system.name

    async def answer(kind: str, request: Request, schema: type[_Request]) -> Any:
        body, prompts, params, recipe = await _prepare(request, schema, system, limits)
        stops = params.get("stop", ())
        cid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        if not body.stream:
            try:
                completions = await _submit_all(batcher, prompts, params, recipe)
            except Exception as exc:
                logger.exception("generation failed")
                raise _generation_error(exc) from None
            answers = [_without_stop(c, stops) for c in completions]
            return _body(kind, cid, created, name, answers, openai_words)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        ids = (kind, cid, created, name)
        events = _events(batcher, prompts, params, recipe, ids, include_usage, openai_words)
        return StreamingResponse(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await answer("chat", request, ChatRequest)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await answer("text", request, CompletionRequest)


def _add_tokenizer_routes(app: Any, system: Any, limits: _Limits) -> None:
    """vLLM's ``GET /tokenizer_info``, ``POST /tokenize`` and ``POST /detokenize`` (lm-eval's
    ``local-completions`` probes them and then tokenizes with the server's own tokenizer), for a system
    with a tokenizer and a `tokenize` method."""
    from fastapi import Request

    tokenizer, tokenize = getattr(system, "tokenizer", None), getattr(system, "tokenize", None)
    if tokenizer is None or tokenize is None:
        return

    async def parsed(request: Request, schema: type[BaseModel]) -> Any:
        try:
            body = schema.model_validate_json(await _read_body(request, limits.max_body_bytes))
        except ValidationError as exc:
            raise _validation_error(exc) from None
        if body.model is not None and body.model != system.name:
            raise _unknown_model(body.model, system.name)
        return body

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        info = {k: getattr(tokenizer, k, None) for k in ("eos_token", "bos_token", "pad_token", "unk_token")}
        return {
            "tokenizer_class": type(tokenizer).__name__,
            **info,
            "chat_template": getattr(tokenizer, "chat_template", None),
            "model_max_length": limits.context,
        }

    @app.post("/tokenize")
    async def tokenize_route(request: Request) -> dict[str, Any]:
        body = await parsed(request, _TokenizeRequest)
        tokens = await asyncio.to_thread(tokenize, body.prompt, body.add_special_tokens)
        return {"count": len(tokens), "max_model_len": limits.context, "tokens": tokens, "token_strs": None}

    @app.post("/detokenize")
    async def detokenize_route(request: Request) -> dict[str, Any]:
        body = await parsed(request, _DetokenizeRequest)
        vocab = len(tokenizer)
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"tokens {bad[:5]} are outside the vocabulary [0, {vocab})", param="tokens")
        return {"prompt": await asyncio.to_thread(tokenizer.decode, body.tokens)}


async def _read_body(request: Any, max_body_bytes: int) -> bytes:
    """The body, refused with a 413 as soon as it passes ``max_body_bytes`` (chunked uploads too)."""
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > max_body_bytes:
            raise ApiError(413, _too_large(max_body_bytes), code="request_too_large")
        parts.append(part)
    return b"".join(parts)


def _check_budget_limit(budget_param: str, budget: int | None, max_tokens_limit: int) -> None:
    if budget is not None and budget > max_tokens_limit:
        raise ApiError(
            400,
            f"{budget_param}={budget} exceeds this server's limit of {max_tokens_limit}",
            param=budget_param,
            code="invalid_value",
        )


def _request_prompts(body: Any) -> tuple[list[Any], str]:
    """The prompts a request asks about, and the parameter they came in (refusing what we do not serve)."""
    if not isinstance(body, CompletionRequest):
        return [_chat(body)], "messages"
    if body.suffix:
        raise ApiError(400, "suffix is not supported", param="suffix", code="unsupported_parameter")
    return _prompt_list(body), "prompt"


def _fit_budget(
    overrides: dict[str, Any],
    limits: _Limits,
    n_prompt: int,
    prompt_param: str,
    budget_param: str,
    budget: int | None,
    need: int = 1,
) -> None:
    """Refuse a prompt past the limits or the context (leaving less than ``need`` tokens of room), or a
    budget past what the context leaves; set `max_new_tokens` in `overrides` to the asked budget, or the
    system's default cut to what fits."""
    context, max_prompt_tokens = limits.context, limits.max_prompt_tokens
    if max_prompt_tokens is not None and n_prompt > max_prompt_tokens:
        raise _too_long(
            f"the prompt has {n_prompt} tokens, more than this server's limit of {max_prompt_tokens}; "
            f"shorten the {prompt_param}",
            prompt_param,
        )
    room = context - n_prompt if context is not None else None
    if room is not None and room < need:
        raise _too_long(
            f"the prompt has {n_prompt} tokens and fills the model's context of {context}; "
            f"shorten the {prompt_param}",
            prompt_param,
        )
    if budget is not None:
        if room is not None and budget > room:
            raise _too_long(
                f"{budget_param}={budget} is more than the {room} tokens the context of {context} "
                f"leaves after the prompt's {n_prompt}; ask for at most {room}",
                budget_param,
            )
        overrides["max_new_tokens"] = budget
    else:
        cap = min(x for x in (room, limits.max_tokens_limit) if x is not None)
        if limits.default_budget is not None and limits.default_budget > cap:
            overrides["max_new_tokens"] = cap


def _add_logprobs(overrides: dict[str, Any], system: Any, body: Any) -> None:
    """The request's top logprobs into `overrides`, when it asks for them and the system can."""
    top = _logprobs(body)
    if top is not None:
        if not getattr(system, "supports_logprobs", False):
            raise ApiError(
                400, "this system cannot report logprobs", param="logprobs", code="unsupported_parameter"
            )
        overrides["logprobs"] = top


def _too_long(message: str, param: str) -> ApiError:
    return ApiError(400, message, param=param, code="context_length_exceeded")


def _generation_error(exc: Exception) -> ApiError:
    return ApiError(500, f"generation failed: {type(exc).__name__}: {exc}", type="server_error")


# ---------------------------------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------------------------------


def _as_system(system: Any) -> Any:
    if isinstance(system, str | Path | System):
        return load_system(system)
    return system


def _warn_if_public(host: str, api_key: str | None) -> None:
    """A warning when a non-loopback address (IPv4 or IPv6, ``::`` included) is served without a key."""
    if api_key is None and not is_loopback(host):
        logger.warning(
            "serving on %s without authentication: anyone who can reach it can use the model; "
            "set --api-key (or LMN_API_KEY) to require 'Authorization: Bearer <key>'",
            host,
        )


def _url(host: str, port: int) -> str:
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


def _resolve_key(app_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``api_key`` from the arguments, else from ``LMN_API_KEY`` (never logged)."""
    if app_kwargs.get("api_key") is None and os.environ.get(API_KEY_ENV):
        app_kwargs = {**app_kwargs, "api_key": os.environ[API_KEY_ENV]}
    return app_kwargs


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port), or a `LatentMergeError` naming them."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise LatentMergeError(f"port={port!r} is not a TCP port; expected 0 <= port <= 65535 (0: any free)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise LatentMergeError(f"cannot listen on host={host!r} port={port}: {exc.strerror or exc}") from None
    return sock


def start_server(
    system: Any, port: int = 0, host: str = "127.0.0.1", *, timeout: float = 30.0, **app_kwargs: Any
) -> tuple[str, Callable[[], None]]:
    """Serve ``system`` from a background thread; returns (base URL ending in ``/v1``, stop function).

    ``port=0`` picks a free port. ``app_kwargs`` go to `create_app`. For tests and notebooks.
    """
    import uvicorn

    app_kwargs = _resolve_key(app_kwargs)
    sock = _bind(host, port)
    _warn_if_public(host, app_kwargs.get("api_key"))
    try:
        app = create_app(_as_system(system), **app_kwargs)
    except BaseException:
        sock.close()
        raise
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="lmn-serve")
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"the server did not start within {timeout} s")
        time.sleep(0.01)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()

    return _url(host, sock.getsockname()[1]), stop


def run_serve(system: Any, host: str = "127.0.0.1", port: int = 8000, **app_kwargs: Any) -> None:
    """Serve ``system`` (a YAML path, `System` or `LoadedSystem`) until interrupted (`lmn serve`).

    The address is bound before the models load, so a bad or busy port fails at once.
    """
    import uvicorn

    app_kwargs = _resolve_key(app_kwargs)
    sock = _bind(host, port)
    try:
        _warn_if_public(host, app_kwargs.get("api_key"))
        loaded = _as_system(system)
        app = create_app(loaded, **app_kwargs)
        logger.warning("serving %r at %s", loaded.name, _url(host, sock.getsockname()[1]))
        uvicorn.Server(uvicorn.Config(app, log_level="info", lifespan="on")).run(sockets=[sock])
    finally:
        sock.close()
