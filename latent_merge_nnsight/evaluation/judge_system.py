"""A local system as the judge of JudgeBench's official protocol (no API needed): `lmn judgebench-accuracy
--judge-system`. Lives here, above `systems/`: a system is the judge's model, JudgeBench is evaluation."""

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from latent_merge_nnsight.evaluation.judge import CompleteFn, judgebench_accuracy_sync
from latent_merge_nnsight.evaluation.judgebench.data import JudgePair
from latent_merge_nnsight.evaluation.judgebench.templates import Template
from latent_merge_nnsight.evaluation.openai_chat import Messages
from latent_merge_nnsight.systems.fit import check_truncate, fit_chats
from latent_merge_nnsight.systems.loaded import LoadedSystem, load_system
from latent_merge_nnsight.systems.spec import System

__all__ = ["judge_model_id", "judgebench_accuracy_system"]


def judge_model_id(system: "LoadedSystem", overrides: Mapping[str, Any] | None = None) -> str:
    """``name-<hash>``: the system's name plus a hash of its settings, so a judgment cache never mixes
    judgments of two different setups that share a name."""
    blob = json.dumps([system.config.to_dict(), dict(overrides or {})], sort_keys=True)
    return f"{system.name}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"


def judgebench_accuracy_system(
    pairs: Sequence[JudgePair],
    system: "str | Path | System | LoadedSystem",
    template: Template,
    *,
    cache_path: str | Path | None = None,
    batch_size: int = 8,
    both_orders: bool = True,
    progress: bool = True,
    retry_invalid: bool = False,
    truncate: str = "error",
    **overrides: object,
) -> list[dict[str, Any]]:
    """JudgeBench's official protocol with a local system as the judge (`lmn judgebench-accuracy
    --judge-system`): returns records in JudgeBench's output format, for `official_accuracy`.

    Judge requests are batched ``batch_size`` at a time (twice that many are kept in flight so the next
    batch gathers while one generates). ``overrides`` set the judge's sampling (e.g. ``max_new_tokens``).
    ``truncate``: a judge prompt that leaves less than ``max_new_tokens`` of the judge's context is
    refused before any judging ("error"), has the start of its last message cut ("left"), or is fed
    whole ("none"), as `lmn respond --truncate` does with questions.
    """
    check_truncate(truncate)
    loaded = load_system(system)
    fn = loaded.complete_fn(max_batch_size=batch_size, **overrides)
    if truncate != "none":
        orders = [False, True] if both_orders else [False]
        chats = [
            template.messages(
                p.question, *((p.response_B, p.response_A) if swap else (p.response_A, p.response_B))
            )
            for p in pairs
            for swap in orders
        ]
        budget = loaded.sampling(**overrides).max_new_tokens
        fitted = fit_chats(loaded, chats, budget, truncate, "judge prompts")  # refuses before any work
        fn = _FittedCompleteFn(fn, {_chat_key(c): f for c, (f, _) in zip(chats, fitted, strict=True)})
    model_id = judge_model_id(loaded, overrides)
    return judgebench_accuracy_sync(
        pairs,
        fn,
        template,
        cache_path=cache_path,
        judge_model=model_id,
        judge_name=loaded.name,
        both_orders=both_orders,
        concurrency=2 * batch_size,
        progress=progress,
        retry_invalid=retry_invalid,
    )


def _chat_key(chat: Sequence[Mapping[str, Any]]) -> str:
    return json.dumps([dict(m) for m in chat], sort_keys=True)


class _FittedCompleteFn:
    """A judge's `CompleteFn` that asks each known prompt as `fit_chats` fitted it to the context."""

    def __init__(self, inner: CompleteFn, fitted: dict[str, Messages]) -> None:
        self.inner, self.fitted = inner, fitted

    async def __call__(self, messages: Messages) -> str:
        return await self.inner(self.fitted.get(_chat_key(messages), messages))
