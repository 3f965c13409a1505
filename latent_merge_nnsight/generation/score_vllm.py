"""`lmn.score(..., engine="vllm")`: the continuations' log-probabilities as vLLM's prompt logprobs.

The base and sources run as an export on the kept `vllm.LLM` of `lmn.generate(..., engine="vllm")`
(`vllm_engine.run`). Each row is one request whose prompt is its context followed by its continuation,
with `latent_merge.merge_from` where generation would have started merging (positions "last": the
context's last token; "all": 0; or the row's own `merge_from`), so prompt logprobs are scored as
generation merges; per-row recipes go with their requests as their op and alphas. Rows are salted by
their request, so vLLM's prefix cache never mixes recipes. Explicit positions merge only in the context,
which a request cannot say: they are refused here (pass `merge_from`, or use engine "fast").
"""

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.nouns import Model
from latent_merge_nnsight.plan import Plan

__all__ = ["score_vllm"]

Scored = tuple[list[list[float]], list[list[bool]], list[list[tuple[tuple[int, float], ...]]]]


def _merge_start(plan: Plan, ctx: list[int], given: int | None) -> int | None:
    if given is not None or plan.mode != "merge":
        return given
    positions = {repr(g.positions) for g in (plan.groups or [plan])}
    if positions == {"'all'"}:
        return 0
    if positions == {"'last'"}:
        return len(ctx) - 1
    raise LatentMergeError(
        f"engine='vllm' scores positions 'last' or 'all' (a request says where its merge starts, not which "
        f"context positions merge); got {sorted(positions)}: pass merge_from, or use engine='fast'"
    )


def score_vllm(
    base: Model,
    sources: list[Model],
    plan: Plan,
    contexts: list[list[int]],
    continuations: list[list[int]],
    merge_from: list[int | None],
    top: int,
) -> Scored:
    """Per row: each continuation token's logprob, whether it was the greedy choice (vLLM's rank 1), and
    its `top` alternatives, from one `llm.generate` with prompt logprobs (see the module docstring)."""
    from latent_merge_nnsight.vllm_engine import require_vllm

    require_vllm("lmn.score(..., engine='vllm')")
    from vllm import SamplingParams

    from latent_merge_nnsight.vllm_engine.requests import KEY, cache_salt, parse_request
    from latent_merge_nnsight.vllm_engine.run import _request, _row_requests, engine_for

    starts = [_merge_start(plan, c, m) for c, m in zip(contexts, merge_from, strict=True)]
    llm, export = engine_for(base, sources, plan)
    own = _row_requests(plan, export) if plan.groups else [_request(plan, export)] * len(contexts)
    prompts, params = [], []
    for ctx, cont, request, start in zip(contexts, continuations, own, starts, strict=True):
        if export.recipe is not None:
            request = dict(request or {}) | {"merge_from": start if start is not None else len(ctx) - 1}
        prompt: dict[str, object] = {"prompt_token_ids": ctx + cont}
        salt = None if request is None else cache_salt(parse_request(request, export))
        if salt is not None:
            prompt["cache_salt"] = salt
        prompts.append(prompt)
        params.append(
            SamplingParams(
                max_tokens=1,
                temperature=0.0,
                prompt_logprobs=max(top, 1),
                extra_args=None if request is None else {KEY: request},
            )
        )
    outputs = llm.generate(prompts, params, use_tqdm=False)
    logprobs, greedy, tops = [], [], []
    for o, ctx, cont in zip(outputs, contexts, continuations, strict=True):
        entries = o.prompt_logprobs[len(ctx) :]
        logprobs.append([float(e[t].logprob) for e, t in zip(entries, cont, strict=True)])
        greedy.append([e[t].rank == 1 for e, t in zip(entries, cont, strict=True)])
        tops.append([_ranked(e, top) for e in entries])
    return logprobs, greedy, tops


def _ranked(entries: dict, top: int) -> tuple[tuple[int, float], ...]:
    """vLLM's alternatives of one position: (token id, logprob) by rank, the `top` best."""
    ranked = sorted(
        (e.rank, -e.logprob, t) for t, e in entries.items() if e.rank is not None and e.rank <= top
    )
    return tuple((t, -neg) for _, neg, t in ranked)[:top]
