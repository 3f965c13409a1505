"""What travels over the wire: the OpenAI (and vLLM) request bodies as pydantic models, the systems the
server can serve (`ServedSystem`), and `ApiError`, an OpenAI-style error body with the parameter at fault."""

import json
from collections.abc import Sequence
from typing import Any, Literal, Protocol, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from latent_merge_nnsight.nouns import Chat
from latent_merge_nnsight.systems.batching import Completion

__all__ = [
    "ApiError",
    "BaseRequest",
    "ChatRequest",
    "CompletionRequest",
    "DetokenizeRequest",
    "Prompt",
    "ServedSystem",
    "TokenizeRequest",
    "validation_error",
]

Prompt: TypeAlias = str | list[int] | Chat
"""One prompt as the server hands it to a system: raw text, token ids, or a chat to template."""


class ServedSystem(Protocol):
    """What `create_app` serves: a `LoadedSystem`, or any object with a name, a batched ``complete`` and
    a prompt-token count (the rest, such as ``sampling``, ``tokenizer`` or ``check_echo``, is optional
    and looked up with ``getattr``)."""

    name: str

    def complete(self, prompts: Sequence[Prompt], **sampling: object) -> list[Completion]: ...

    def count_prompt_tokens(self, prompt: Prompt) -> int: ...


MAX_STOP_STRINGS = 4
MAX_INT = 2**31 - 1
"""The largest ``max_tokens`` / ``top_k`` a request may carry (larger ones are a 400, never an overflow)."""
MAX_SEED = 2**63 - 1
MAX_TOP_LOGPROBS = 20
DEFAULT_MAX_BODY_BYTES = 8 * 2**20


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


class BaseRequest(BaseModel):
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


class ChatRequest(BaseRequest):
    """The part of OpenAI's chat-completions request this server understands (other fields are ignored)."""

    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_INT)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionRequest(BaseRequest):
    """OpenAI's legacy text-completions request: prompts (text or token ids) in, their continuations (or,
    with ``echo``, the prompts' own logprobs) out."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0, le=MAX_INT)  # 0: only with echo (scoring the prompt)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool | None = False
    suffix: str | None = None


class TokenizeRequest(BaseModel):
    """vLLM's ``POST /tokenize`` body (text prompts)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
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

    def body(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(exc: ValidationError) -> ApiError:
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


def _param(loc: tuple[int | str, ...]) -> str:
    """The request parameter an error is about: its location up to the first union member tag."""
    parts = []
    for p in loc:
        if isinstance(p, str) and ("[" in p or p in ("str", "int", "float", "bool")):
            break
        parts.append(str(p))
    return ".".join(parts)


def too_large(limit: int) -> str:
    return f"the request body is larger than this server's limit of {limit} bytes (max_body_bytes)"


def unknown_model(model_id: str, name: str) -> ApiError:
    return ApiError(
        404,
        f"the model '{model_id}' does not exist; this server serves '{name}'",
        param="model",
        code="model_not_found",
    )


def generation_error(exc: Exception) -> ApiError:
    return ApiError(500, f"generation failed: {type(exc).__name__}: {exc}", type="server_error")
