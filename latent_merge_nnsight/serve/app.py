"""The OpenAI-compatible app (FastAPI): its routes, the batcher they share, and the guard in front of
them (the request size limit and the API key)."""

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from latent_merge_nnsight.serve.checks import Limits, check_limits, prepare, read_body
from latent_merge_nnsight.serve.responses import drop_stop, response_body, stream_events, submit_all
from latent_merge_nnsight.serve.wire import (
    DEFAULT_MAX_BODY_BYTES,
    ApiError,
    BaseRequest,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    ServedSystem,
    TokenizeRequest,
    generation_error,
    too_large,
    unknown_model,
    validation_error,
)
from latent_merge_nnsight.systems.batching import Batcher

if TYPE_CHECKING:
    from fastapi import FastAPI
    from starlette.requests import Request
    from starlette.types import ASGIApp, Receive, Scope, Send

# fastapi (the `eval` extra) is imported inside functions: the package works without it.

__all__ = ["create_app"]

logger = logging.getLogger(__name__)


class _Guard:
    """Refuses oversized bodies (413, from Content-Length) and, with a key, unauthenticated calls (401;
    the key is compared in constant time). ``/health`` stays open."""

    def __init__(self, app: "ASGIApp", *, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.max_body_bytes = app, max_body_bytes
        self._expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: "Scope", receive: "Receive", send: "Send") -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_body_bytes:
            await _send_error(send, ApiError(413, too_large(self.max_body_bytes), code="request_too_large"))
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


async def _send_error(send: "Send", error: ApiError, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(error.body()).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def create_app(
    system: ServedSystem,
    *,
    max_batch_size: int = 8,
    max_wait_ms: float = 5.0,
    max_prompt_tokens: int | None = None,
    max_tokens_limit: int | None = None,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    openai_finish_reasons: bool = False,
) -> "FastAPI":
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

    context, max_prompt_tokens, max_tokens_limit = check_limits(
        system, max_prompt_tokens, max_tokens_limit, max_body_bytes, api_key
    )
    batcher = Batcher(system, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms)
    name = system.name
    started = int(time.time())
    default_budget = getattr(
        getattr(getattr(system, "config", None), "sampling", None), "max_new_tokens", None
    )

    @asynccontextmanager
    async def lifespan(app: "FastAPI") -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            await batcher.close()

    app = FastAPI(title=f"lmn serve: {name}", lifespan=lifespan)
    app.state.system, app.state.batcher = system, batcher
    _add_error_handlers(app)
    _add_model_routes(app, name, started)
    limits = Limits(context, max_prompt_tokens, max_tokens_limit, max_body_bytes, default_budget)
    _add_completion_routes(app, system, batcher, limits, openai_finish_reasons)
    _add_tokenizer_routes(app, system, limits)
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    return app


def _add_error_handlers(app: "FastAPI") -> None:
    """Every error as an OpenAI-style error body: ours (`ApiError`), starlette's (404, 405), and any other
    (500)."""
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(ApiError)
    async def _api_error(request: "Request", exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request: "Request", exc: HTTPException) -> JSONResponse:
        message = f"{exc.detail}: {request.method} {request.url.path}"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(ApiError(exc.status_code, message, code=code).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _server_error(request: "Request", exc: Exception) -> JSONResponse:
        logger.exception("unhandled error serving %s", request.url.path)
        body = ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").body()
        return JSONResponse(body, status_code=500)


def _add_model_routes(app: "FastAPI", name: str, started: int) -> None:
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
            raise unknown_model(model_id, name)
        return model_card()


def _add_completion_routes(
    app: "FastAPI", system: ServedSystem, batcher: Batcher, limits: Limits, openai_words: bool = False
) -> None:
    """`/v1/chat/completions` and `/v1/completions`: checked, batched, answered whole or streamed
    (``finish_reason`` in OpenAI's words with ``openai_words``, see `create_app`)."""
    from fastapi import Request
    from fastapi.responses import StreamingResponse

    name = system.name

    async def answer(kind: str, request: Request, schema: type[BaseRequest]) -> Any:
        body, prompts, params, recipe = await prepare(request, schema, system, limits)
        stops = params.get("stop", ())
        cid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        if not body.stream:
            try:
                completions = await submit_all(batcher, prompts, params, recipe)
            except Exception as exc:
                logger.exception("generation failed")
                raise generation_error(exc) from None
            answers = [drop_stop(c, stops) for c in completions]
            return response_body(kind, cid, created, name, answers, openai_words)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        ids = (kind, cid, created, name)
        events = stream_events(batcher, prompts, params, recipe, ids, include_usage, openai_words)
        return StreamingResponse(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await answer("chat", request, ChatRequest)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await answer("text", request, CompletionRequest)


def _add_tokenizer_routes(app: "FastAPI", system: ServedSystem, limits: Limits) -> None:
    """vLLM's ``GET /tokenizer_info``, ``POST /tokenize`` and ``POST /detokenize`` (lm-eval's
    ``local-completions`` probes them and then tokenizes with the server's own tokenizer), for a system
    with a tokenizer and a `tokenize` method."""
    from fastapi import Request

    tokenizer, tokenize = getattr(system, "tokenizer", None), getattr(system, "tokenize", None)
    if tokenizer is None or tokenize is None:
        return

    async def parsed(request: Request, schema: type[TokenizeRequest | DetokenizeRequest]) -> Any:
        try:
            body = schema.model_validate_json(await read_body(request, limits.max_body_bytes))
        except ValidationError as exc:
            raise validation_error(exc) from None
        if body.model is not None and body.model != system.name:
            raise unknown_model(body.model, system.name)
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
        body = await parsed(request, TokenizeRequest)
        tokens = await asyncio.to_thread(tokenize, body.prompt, body.add_special_tokens)
        return {"count": len(tokens), "max_model_len": limits.context, "tokens": tokens, "token_strs": None}

    @app.post("/detokenize")
    async def detokenize_route(request: Request) -> dict[str, Any]:
        body = await parsed(request, DetokenizeRequest)
        vocab = len(tokenizer)
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"tokens {bad[:5]} are outside the vocabulary [0, {vocab})", param="tokens")
        return {"prompt": await asyncio.to_thread(tokenizer.decode, body.tokens)}
