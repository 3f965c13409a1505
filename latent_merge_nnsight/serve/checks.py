"""A request checked before any work: its body parsed, its prompts, sampling overrides, token budget,
logprobs, echo and own recipe (``latent_merge``) read and held to the server's limits (`prepare`), each
fault a 400 (or 413) naming the request parameter; and `create_app`'s own limits (`check_limits`)."""

import asyncio
import dataclasses
import logging
import re
from typing import TYPE_CHECKING

from pydantic import ValidationError

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.request_recipe import KEY, check_request
from latent_merge_nnsight.serve.wire import (
    MAX_STOP_STRINGS,
    ApiError,
    BaseRequest,
    ChatRequest,
    CompletionRequest,
    Prompt,
    ServedSystem,
    too_large,
    unknown_model,
    validation_error,
)

if TYPE_CHECKING:
    from starlette.requests import Request

    from latent_merge_nnsight.recipe import Recipe

__all__ = ["Limits", "check_limits", "prepare", "read_body"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS_LIMIT = 4096
"""`max_tokens` cap when neither ``max_tokens_limit`` nor the system's context length is known."""


_HARMLESS = frozenset({"user", "metadata", "store", "service_tier"})
"""OpenAI request fields that change nothing this server computes (accepted)."""
_NEUTRAL: dict[str, tuple[object, ...]] = {
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


def _max_new_tokens(request: BaseRequest) -> tuple[str, int | None]:
    """(the parameter's name, its value) of the request's token budget."""
    extra = getattr(request, "max_completion_tokens", None)
    if extra is not None:
        return "max_completion_tokens", extra
    return "max_tokens", request.max_tokens


def _logprobs(request: BaseRequest) -> int | None:
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


def _refuse_unsupported(request: BaseRequest) -> None:
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


def _overrides(request: BaseRequest) -> dict[str, object]:
    """Sampling overrides from the request (absent fields keep the system's own settings)."""
    _refuse_unsupported(request)
    out: dict[str, object] = {}
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


def _check_sampling(system: ServedSystem, overrides: dict[str, object], budget_param: str) -> None:
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


def _refuse_buffered_stream(request: BaseRequest, system: ServedSystem) -> None:
    """A 400 naming the parameter that keeps a ``stream=true`` request from streaming token by token (the
    generation loop's step hook), rather than sending its whole answer in one chunk at the end: logprobs
    (scored by teacher forcing once the reply is generated: `systems.logprobs`), echo (the prompt scored
    in one forward pass) and a ``backend: vllm`` system (vLLM returns the whole answer at once)."""
    if not request.stream:
        return
    if _logprobs(request) is not None:
        raise ApiError(
            400,
            "logprobs with stream=true is not supported: this server scores a reply's tokens once the "
            "whole reply is generated, so it cannot send them token by token; send stream=false to get "
            "logprobs",
            param="logprobs",
            code="unsupported_parameter",
        )
    if isinstance(request, CompletionRequest) and request.echo:
        raise ApiError(
            400,
            "echo=true with stream=true is not supported: echo scores the prompt in one forward pass, "
            "so there is nothing to stream token by token; send stream=false",
            param="echo",
            code="unsupported_parameter",
        )
    if getattr(getattr(system, "config", None), "backend", None) == "vllm":
        raise ApiError(
            400,
            f"stream=true is not supported by system {system.name!r} (backend vllm): vLLM returns the "
            "whole answer at once, so this server cannot send it token by token; send stream=false, or "
            "serve the system with backend hf",
            param="stream",
            code="unsupported_parameter",
        )


def _latent_merge(request: BaseRequest, system: ServedSystem) -> "tuple[Recipe | None, int | None]":
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


def _check_limit(name: str, value: object) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise LatentMergeError(f"{name}={value!r}; expected an int >= 1 or None")


def check_limits(
    system: ServedSystem,
    max_prompt_tokens: int | None,
    max_tokens_limit: int | None,
    max_body_bytes: int,
    api_key: str | None,
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


@dataclasses.dataclass(frozen=True)
class Limits:
    """What `create_app` holds every request to (limits already defaulted by `check_limits`)."""

    context: int | None  # None: the caller chose to go past the model's nominal context
    max_prompt_tokens: int | None
    max_tokens_limit: int
    max_body_bytes: int
    default_budget: int | None  # the system's own max_new_tokens


async def prepare(
    request: "Request", schema: type[BaseRequest], system: ServedSystem, limits: Limits
) -> "tuple[BaseRequest, list[Prompt], dict[str, object], Recipe | None]":
    """Validate a request: (the parsed body, its prompts for the system, the generation params, its own
    recipe or None)."""
    try:
        body = schema.model_validate_json(await read_body(request, limits.max_body_bytes))
    except ValidationError as exc:
        raise validation_error(exc) from None
    if body.model != system.name:
        raise unknown_model(body.model, system.name)
    prompts, prompt_param = _request_prompts(body)
    overrides = _overrides(body)
    _refuse_buffered_stream(body, system)
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
    overrides: dict[str, object],
    system: ServedSystem,
    budget: int | None,
    merge_from: int | None,
    counts: list[int],
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


async def read_body(request: "Request", max_body_bytes: int) -> bytes:
    """The body, refused with a 413 as soon as it passes ``max_body_bytes`` (chunked uploads too)."""
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > max_body_bytes:
            raise ApiError(413, too_large(max_body_bytes), code="request_too_large")
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


def _request_prompts(body: BaseRequest) -> tuple[list[Prompt], str]:
    """The prompts a request asks about, and the parameter they came in (refusing what we do not serve)."""
    if not isinstance(body, CompletionRequest):
        return [_chat(body)], "messages"
    if body.suffix:
        raise ApiError(400, "suffix is not supported", param="suffix", code="unsupported_parameter")
    return _prompt_list(body), "prompt"


def _fit_budget(
    overrides: dict[str, object],
    limits: Limits,
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


def _add_logprobs(overrides: dict[str, object], system: ServedSystem, body: BaseRequest) -> None:
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
