"""Echo scoring (`/v1/completions` with ``echo=true``): the log-probabilities of a prompt's own tokens
under a system's merge, as lm-eval's ``local-completions`` asks for them (``loglikelihood``).

A prompt scored this way is a context followed by a continuation, but the server sees one token list: it
cannot tell where the context ends. Generation from the context merges, for positions ``"last"``, at the
context's last token and at every token after it; scoring the whole list with the recipe's own positions
would merge only at the continuation's last token, whose prediction the client discards: the numbers of
the base. So a request names where the merge starts, ``merge_from`` (a token index into the prompt): one
teacher-forced forward merges at every position ``>= merge_from`` with the recipe's layers, alphas and
op. Positions ``"all"`` need no ``merge_from`` (every position merges, as in generation); ``"last"`` and
explicit indices without it are refused (`echo_merge_from`).

`score_echo` scores a request's prompts in one `lmn.score` call (each prompt its first token followed by
the rest, `merge_from` per row; the fast engine, batched) and, with one new token asked for, picks it from
the scored distribution after the last prompt token (`next_logprobs`) with the request's sampling, so the
reported logprob is that of the distribution it was drawn from.
"""

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.generation.loop import prepare_run
from latent_merge_nnsight.inputs import is_token_ids
from latent_merge_nnsight.nouns import Tokenizer
from latent_merge_nnsight.systems.batching import Completion, TokenLogprob
from latent_merge_nnsight.systems.logprobs import LoadedSystemLike, score_as_generated, supports_logprobs

if TYPE_CHECKING:
    from latent_merge_nnsight.recipe import Recipe
    from latent_merge_nnsight.systems.spec import System

__all__ = ["check_echo", "echo_merge_from", "score_echo"]

MERGE_FROM = "latent_merge.merge_from"
"""The request argument that says where the merge starts (named in errors)."""


def echo_merge_from(config: "System", merge_from: int | None) -> int:
    """The first merged position of an echo request: ``merge_from`` as given, or 0 for a merge at every
    position (or for a system with no latent merge); a `LatentMergeError` naming ``echo`` when the recipe's
    positions depend on where the context ends and the request does not say it."""
    if merge_from is not None:
        if isinstance(merge_from, bool) or not isinstance(merge_from, int) or merge_from < 0:
            raise LatentMergeError(f"{MERGE_FROM}={merge_from!r}; expected a token index >= 0")
        return merge_from
    recipe = config.recipe if config.kind == "latent" else None
    if recipe is None:
        return 0
    positions = recipe.resolved_positions()
    if positions == "all":
        return 0
    raise LatentMergeError(
        f"echo: system {config.name!r} merges at positions {positions!r}, which depend on where the "
        "context ends; scoring the echoed prompt with them would merge only at its last token, whose "
        "prediction is discarded, and report the base's numbers. Send "
        f"{MERGE_FROM} (the index of the context's last token: generation merges there and after it) "
        "in the request's latent_merge argument (vllm_xargs or the body), or serve a recipe with "
        "positions 'all'"
    )


def check_echo(loaded: LoadedSystemLike, top: int | None, max_new_tokens: int, merge_from: int | None) -> int:
    """An echo request's checks before any forward (a `LatentMergeError` naming the parameter at fault);
    returns the first merged position (`echo_merge_from`)."""
    if max_new_tokens not in (0, 1):
        raise LatentMergeError(
            f"max_tokens={max_new_tokens}: echo scores the prompt and takes max_tokens 0 or 1"
        )
    if loaded.config.backend == "vllm":
        raise LatentMergeError(
            f"echo: system {loaded.name!r} runs on vLLM and holds no weights here to score the prompt "
            "with; serve its export with `vllm serve` for prompt logprobs"
        )
    if top is not None and not supports_logprobs(loaded.config):
        raise LatentMergeError(
            f"logprobs: system {loaded.name!r} (kind {loaded.config.kind!r}) cannot report logprobs; "
            "single, weight and latent systems can"
        )
    return echo_merge_from(loaded.config, merge_from)


def score_echo(
    loaded: LoadedSystemLike,
    prompts: Sequence[str | Sequence[int]],
    *,
    top: int | None,
    max_new_tokens: int,
    merge_from: int | None,
    sampling: Mapping[str, object],
    recipes: "Sequence[Recipe | None] | None" = None,
) -> list[Completion]:
    """One echo `Completion` per prompt (a raw string or token ids): its text is the prompt's text plus
    the new token's; its ``logprobs`` (when ``top`` is not None) cover every prompt token (the first has
    none) and the new one, each with its ``top`` alternatives. ``sampling`` holds `prepare_run`'s sampling
    and stop arguments; ``recipes`` (one per prompt) score each prompt under a request's own recipe.
    The prompts are scored in one `lmn.score` call (`score_as_generated`), each as its first token
    followed by the rest, merged from ``merge_from`` on."""
    start = check_echo(loaded, top, max_new_tokens, merge_from)
    tokenizer = loaded.tokenizer
    runs, rows = [], []
    for i, prompt in enumerate(prompts):
        with warnings.catch_warnings():
            if max_new_tokens == 0:  # its context warning counts a new token that is not asked for
                warnings.simplefilter("ignore")
            run = prepare_run(loaded.base, [prompt], max_new_tokens=1, chat=False, **sampling)
        ids = run.batch.input_ids[0][run.batch.attention_mask[0].bool()].tolist()
        if start >= len(ids):
            raise LatentMergeError(
                f"{MERGE_FROM}={start} is past prompt {i}'s {len(ids)} tokens; expected 0 <= merge_from < "
                f"{len(ids)}"
            )
        runs.append(run)
        rows.append(ids)
    scored = score_as_generated(
        loaded,
        [ids[:1] for ids in rows],
        [ids[1:] for ids in rows],
        recipes,
        top=top or 0,
        merge_from=[start] * len(rows),
        next_logprobs=True,
    )
    out = []
    for k, (prompt, run, ids) in enumerate(zip(prompts, runs, rows, strict=True)):
        following = scored.next[k].float()
        new: list[int] = []
        reason, new_text = "length", ""
        if max_new_tokens == 1:
            device = run.batch.input_ids.device
            token = run.sampler(following[None].to(device), torch.tensor([0]))
            run.tracker.push([0], token)
            result = run.result("echo")
            new, reason, new_text = result.tokens[0], result.finish_reasons[0], result.texts[0]
        text = (prompt if not is_token_ids(prompt) else tokenizer.decode(ids)) + new_text
        logprobs = None
        if top is not None:
            chosen = [(lp, alts) for lp, alts in zip(scored.logprobs[k], scored.top[k], strict=True)]
            chosen += [(float(following[t]), _top(following, top)) for t in new]
            logprobs = _token_logprobs(tokenizer, ids + new, chosen)
        out.append(Completion(text, reason, len(ids), len(new), logprobs))
    return out


def _top(logp: Float[Tensor, " vocab"], top: int) -> tuple[tuple[int, float], ...]:
    values, indices = torch.topk(logp, min(top, logp.shape[-1]))
    return tuple(zip(indices.tolist(), values.tolist(), strict=True))


def _token_logprobs(
    tokenizer: Tokenizer, tokens: list[int], scored: list[tuple[float, tuple[tuple[int, float], ...]]]
) -> tuple[TokenLogprob, ...]:
    """The first token has no logprob; token i has ``scored[i - 1]``: its logprob and its alternatives
    as (token id, logprob)."""
    first = TokenLogprob(tokenizer.decode([tokens[0]]), None)
    return (first,) + tuple(
        TokenLogprob(
            tokenizer.decode([token]),
            float(logprob),
            tuple((tokenizer.decode([int(t)]), float(v)) for t, v in alternatives),
        )
        for token, (logprob, alternatives) in zip(tokens[1:], scored, strict=True)
    )
