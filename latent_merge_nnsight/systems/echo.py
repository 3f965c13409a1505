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

`score_echo` runs one row at a time through a teacher-forced forward (`_row_logits`) (the seam where a
stepper-based scorer can take over) and, with one new token asked for, picks it from the scored
distribution of the last prompt position with the request's sampling, so the reported logprob is that of
the distribution it was drawn from.
"""

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Bool
from torch import Tensor

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.generation.loop import prepare_run
from latent_merge_nnsight.inputs import is_token_ids
from latent_merge_nnsight.merge import merge_into
from latent_merge_nnsight.models import hf_module, model_info
from latent_merge_nnsight.ops import get_op
from latent_merge_nnsight.residuals import capture
from latent_merge_nnsight.systems.batching import Completion, TokenLogprob
from latent_merge_nnsight.systems.logprobs import supports_logprobs

__all__ = ["check_echo", "echo_merge_from", "merge_from_mask", "score_echo"]

MERGE_FROM = "latent_merge.merge_from"
"""The request argument that says where the merge starts (named in errors)."""


def echo_merge_from(config: Any, merge_from: int | None) -> int:
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


def merge_from_mask(n_total: int, merge_from: int) -> Bool[Tensor, "1 pos"]:
    """[1, n_total]: True at every position >= ``merge_from``."""
    return (torch.arange(n_total) >= merge_from)[None]


def check_echo(loaded: Any, top: int | None, max_new_tokens: int, merge_from: int | None) -> int:
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
    loaded: Any,
    prompts: Sequence[Any],
    *,
    top: int | None,
    max_new_tokens: int,
    merge_from: int | None,
    sampling: dict[str, Any],
    recipes: Sequence[Any] | None = None,
) -> list[Completion]:
    """One echo `Completion` per prompt (a raw string or token ids): its text is the prompt's text plus
    the new token's; its ``logprobs`` (when ``top`` is not None) cover every prompt token (the first has
    none) and the new one, each with its ``top`` alternatives. ``sampling`` holds `prepare_run`'s sampling
    and stop arguments; ``recipes`` (one per prompt) score each prompt under a request's own recipe."""
    start = check_echo(loaded, top, max_new_tokens, merge_from)
    tokenizer = loaded.tokenizer
    out = []
    for i, prompt in enumerate(prompts):
        with warnings.catch_warnings():
            if max_new_tokens == 0:  # its context warning counts a new token that is not asked for
                warnings.simplefilter("ignore")
            run = prepare_run(loaded.base, [prompt], max_new_tokens=1, chat=False, **sampling)
        ids = run.batch.input_ids[0].cpu()
        n = ids.shape[0]
        if start >= n:
            raise LatentMergeError(
                f"{MERGE_FROM}={start} is past prompt {i}'s {n} tokens; expected 0 <= merge_from < {n}"
            )
        recipe = None if recipes is None else recipes[i]
        logp = torch.log_softmax(_scored_logits(loaded, ids, start, recipe), dim=-1).cpu()
        new: list[int] = []
        reason, new_text = "length", ""
        if max_new_tokens == 1:
            token = run.sampler(logp[-1:].to(run.batch.input_ids.device), torch.tensor([0]))
            run.tracker.push([0], token)
            result = run.result("echo")
            new, reason, new_text = result.tokens[0], result.finish_reasons[0], result.texts[0]
        text = (prompt if not is_token_ids(prompt) else tokenizer.decode(ids.tolist())) + new_text
        logprobs = None if top is None else _token_logprobs(tokenizer, ids.tolist() + new, logp, top)
        out.append(Completion(text, reason, n, len(new), logprobs))
    return out


def _scored_logits(loaded: Any, ids: Tensor, merge_from: int, recipe: Any = None) -> Tensor:
    """[pos, vocab] logits of one teacher-forced row merged at positions >= ``merge_from`` (under
    ``recipe``, a request's own, when given; the seam: a stepper-based scorer, `lmn.score`, can replace
    this one call)."""
    return _row_logits(loaded, ids, merge_from_mask(ids.shape[0], merge_from), recipe)


def _token_logprobs(tokenizer: Any, tokens: list[int], logp: Tensor, top: int) -> tuple[TokenLogprob, ...]:
    """Token i's logprob is row i-1 of ``logp`` (the first token has none), with its ``top``
    alternatives."""
    rows = logp[: len(tokens) - 1]
    chosen = rows[torch.arange(rows.shape[0]), torch.tensor(tokens[1:])].tolist()
    values, indices = torch.topk(rows, min(top, rows.shape[-1]), dim=-1)
    first = TokenLogprob(tokenizer.decode([tokens[0]]), None)
    return (first,) + tuple(
        TokenLogprob(
            tokenizer.decode([token]),
            float(chosen[i]),
            tuple(
                (tokenizer.decode([int(t)]), float(v))
                for t, v in zip(indices[i].tolist(), values[i].tolist(), strict=True)
            ),
        )
        for i, token in enumerate(tokens[1:])
    )


def _row_logits(
    loaded: Any, ids: torch.Tensor, select: Bool[Tensor, "1 pos"], recipe: Any = None
) -> torch.Tensor:
    """[seq, vocab] float32 logits of one unpadded row merged at ``select`` with the system's recipe's
    layers, alphas and op, or with ``recipe``'s (a request's own, `LoadedSystem.request_recipe`)."""
    base = loaded.base
    device = next(hf_module(base).parameters()).device
    ids = ids[None].to(device)
    mask = torch.ones_like(ids)
    if recipe is None:
        recipe = loaded.config.recipe if loaded.config.kind == "latent" else None
    with torch.no_grad():
        if recipe is None:
            with base.trace(input_ids=ids, attention_mask=mask):
                logits = base.output.logits.save()
            return logits[0].float()
        spec = get_op(recipe.op)
        alphas = recipe.layer_alphas(model_info(base).n_layers)
        layers = sorted(alphas)
        select = select.to(device)
        if spec.static_source:
            source: Any = loaded.sources[0]
        else:
            caps = [
                capture(s, input_ids=ids, attention_mask=mask, layers=layers, site=recipe.site)
                for s in loaded.sources
            ]
            source = caps if spec.multi_source else caps[0]
        with base.trace(input_ids=ids, attention_mask=mask):
            for layer in layers:
                merge_into(
                    layer=layer,
                    source=source,
                    op=spec,
                    alpha=alphas[layer],
                    positions=select,
                    site=recipe.site,
                    allow_extrapolation=recipe.allow_extrapolation,
                    **recipe.op_params(),
                )
            logits = base.output.logits.save()
    return logits[0].float()
