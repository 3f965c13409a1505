"""The OpenAI-compatible app (FastAPI) and the functions that run it with uvicorn."""

import ipaddress
import json
import logging
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
from latent_merge_nnsight.evaluation.loaded import Completion, load_system, openai_finish_reason
from latent_merge_nnsight.evaluation.systems import System
from latent_merge_nnsight.serve.batching import Batcher

__all__ = ["create_app", "run_serve", "start_server"]

logger = logging.getLogger(__name__)

MAX_STOP_STRINGS = 4


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


class ChatRequest(BaseModel):
    """The part of OpenAI's chat-completions request this server understands (other fields are ignored)."""

    model_config = ConfigDict(strict=True, extra="allow")

    model: str
    messages: list[_Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: _StreamOptions | None = None
    logprobs: bool | None = None


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


def _overrides(request: ChatRequest, max_tokens_limit: int | None) -> dict[str, Any]:
    """Sampling overrides from the request (absent fields keep the system's own settings)."""
    if request.logprobs:
        raise ApiError(
            400, "logprobs are not supported by this server", param="logprobs", code="unsupported_parameter"
        )
    for name in ("tools", "functions"):
        if getattr(request, "model_extra", {}).get(name):
            raise ApiError(
                400,
                f"'{name}' (tool calling) is not supported by this server",
                param=name,
                code="unsupported_parameter",
            )
    out: dict[str, Any] = {}
    max_new = request.max_completion_tokens or request.max_tokens
    if max_new is not None:
        if max_tokens_limit is not None and max_new > max_tokens_limit:
            param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
            raise ApiError(
                400,
                f"{param}={max_new} exceeds this server's limit of {max_tokens_limit}",
                param=param,
                code="invalid_value",
            )
        out["max_new_tokens"] = max_new
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


# ---------------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------------


def _without_stop(c: Completion, stops: Any) -> Completion:
    """OpenAI leaves the stop sequence out of the reply; `lmn.generate` keeps it at the end of the text."""
    if c.finish_reason != "stop":
        return c
    for stop in stops:
        if stop and c.text.endswith(stop):
            return Completion(c.text[: -len(stop)], c.finish_reason, c.prompt_tokens, c.completion_tokens)
    return c


def _completion_body(cid: str, created: int, model: str, c: Completion) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": None,
                "finish_reason": openai_finish_reason(c.finish_reason),
            }
        ],
        "usage": _usage(c),
    }


def _usage(c: Completion) -> dict[str, int]:
    return {
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "total_tokens": c.prompt_tokens + c.completion_tokens,
    }


def _sse_chunks(cid: str, created: int, model: str, c: Completion, include_usage: bool) -> list[str]:
    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [choice],
        }

    events = [chunk({"role": "assistant", "content": ""}, None)]
    if c.text:
        events.append(chunk({"content": c.text}, None))
    events.append(chunk({}, openai_finish_reason(c.finish_reason)))
    if include_usage:
        events.append({**chunk({}, None), "choices": [], "usage": _usage(c)})
    return [f"data: {json.dumps(e, ensure_ascii=False)}\n\n" for e in events] + ["data: [DONE]\n\n"]


def create_app(
    system: Any,
    *,
    max_batch_size: int = 8,
    max_wait_ms: float = 5.0,
    max_prompt_tokens: int | None = None,
    max_tokens_limit: int | None = None,
) -> Any:
    """A FastAPI app serving ``system`` (a `LoadedSystem`, or any object with ``name``,
    ``complete(prompts, **sampling) -> list[Completion]`` and ``count_prompt_tokens(chat)``).

    Arguments:
        max_batch_size: requests per batched `generate` call at most.
        max_wait_ms: how long the first waiting request waits for others to join its batch.
        max_prompt_tokens: longer prompts get a 400 (default: the system's ``context_length``).
        max_tokens_limit: larger ``max_tokens`` values get a 400 (default: no limit).
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    if max_prompt_tokens is None:
        max_prompt_tokens = getattr(system, "context_length", None)
    if max_prompt_tokens is not None and (not isinstance(max_prompt_tokens, int) or max_prompt_tokens < 1):
        raise LatentMergeError(f"max_prompt_tokens={max_prompt_tokens!r}; expected an int >= 1 or None")
    if max_tokens_limit is not None and (not isinstance(max_tokens_limit, int) or max_tokens_limit < 1):
        raise LatentMergeError(f"max_tokens_limit={max_tokens_limit!r}; expected an int >= 1 or None")
    batcher = Batcher(system, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms)
    name = system.name
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            await batcher.close()

    app = FastAPI(title=f"lmn serve: {name}", lifespan=lifespan)
    app.state.system, app.state.batcher = system, batcher

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
            raise ApiError(
                404,
                f"the model '{model_id}' does not exist; this server serves '{name}'",
                param="model",
                code="model_not_found",
            )
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        raw = await request.body()
        try:
            body = ChatRequest.model_validate_json(raw)
        except ValidationError as exc:
            raise _validation_error(exc) from None
        if body.model != name:
            raise ApiError(
                404,
                f"the model '{body.model}' does not exist; this server serves '{name}'",
                param="model",
                code="model_not_found",
            )
        overrides = _overrides(body, max_tokens_limit)
        check = getattr(system, "sampling", None)
        if check is not None:
            try:
                check(**overrides)
            except LatentMergeError as exc:
                raise ApiError(400, str(exc), code="invalid_value") from None
        chat = _chat(body)
        try:
            n_prompt = system.count_prompt_tokens(chat)
        except Exception as exc:  # e.g. the chat template rejects the conversation
            raise ApiError(
                400, f"the messages cannot be rendered for this model: {exc}", param="messages"
            ) from None
        if max_prompt_tokens is not None and n_prompt > max_prompt_tokens:
            raise ApiError(
                400,
                f"the prompt has {n_prompt} tokens, more than this server's limit of {max_prompt_tokens}; "
                "shorten the messages",
                param="messages",
                code="context_length_exceeded",
            )
        try:
            completion = await batcher.submit(chat, overrides)
        except Exception as exc:
            logger.exception("generation failed")
            raise ApiError(
                500, f"generation failed: {type(exc).__name__}: {exc}", type="server_error"
            ) from None
        completion = _without_stop(completion, overrides.get("stop", ()))
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = _sse_chunks(cid, created, name, completion, include_usage)

            async def stream() -> AsyncIterator[str]:
                for event in events:
                    yield event

            return StreamingResponse(
                stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        return _completion_body(cid, created, name, completion)

    return app


# ---------------------------------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------------------------------


def _as_system(system: Any) -> Any:
    if isinstance(system, str | Path | System):
        return load_system(system)
    return system


def _warn_if_public(host: str) -> None:
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        logger.warning(
            "serving on %s without authentication: anyone who can reach it can use the model", host
        )


def _url(host: str, port: int) -> str:
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


def start_server(
    system: Any, port: int = 0, host: str = "127.0.0.1", *, timeout: float = 30.0, **app_kwargs: Any
) -> tuple[str, Callable[[], None]]:
    """Serve ``system`` from a background thread; returns (base URL ending in ``/v1``, stop function).

    ``port=0`` picks a free port. ``app_kwargs`` go to `create_app`. For tests and notebooks.
    """
    import uvicorn

    _warn_if_public(host)
    app = create_app(_as_system(system), **app_kwargs)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise LatentMergeError(f"cannot bind host={host!r} port={port}: {exc}") from None
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
    """Serve ``system`` (a YAML path, `System` or `LoadedSystem`) until interrupted (`lmn serve`)."""
    import uvicorn

    _warn_if_public(host)
    loaded = _as_system(system)
    app = create_app(loaded, **app_kwargs)
    logger.warning("serving %r at %s", loaded.name, _url(host, port))
    uvicorn.run(app, host=host, port=port, log_level="info")
