"""Log-probabilities of the tokens a loaded system generated (the server's ``logprobs``).

Each row is scored after generation by one teacher-forced forward over its prompt and new tokens,
merged as generation merged it: the recipe's layers, alphas and op, at the prompt positions the recipe
selects (``"last"``: the last prompt token) and at every new token for ``"last"``/``"all"`` (explicit
indices select prompt positions only, as in generation). The source sees exactly the same tokens, as in
lockstep generation, so the numbers are those of the distribution each token was drawn from, at
temperature 1 (before temperature, top-p and top-k), up to float rounding. Rows are scored one at a time,
without padding. A `backend: vllm` system holds no weights to score with: vLLM reports the same numbers
(its raw logprobs of the merged model's logits) while it generates, and those are used.
"""

from typing import Any

import torch

from latent_merge_nnsight.capture import capture
from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.merge import merge_into
from latent_merge_nnsight.models import hf_module, model_info
from latent_merge_nnsight.ops import get_op
from latent_merge_nnsight.positions import position_mask
from latent_merge_nnsight.systems.batching import TokenLogprob

__all__ = ["supports_logprobs", "token_logprobs"]


def supports_logprobs(config: Any) -> bool:
    """Whether `token_logprobs` can score this system's generations (not logit ensembles or static
    steering vectors computed on the fly)."""
    if config.kind in ("single", "weight"):
        return True
    if config.kind != "latent" or config.recipe is None:
        return False
    return not get_op(config.recipe.op).static_source or config.recipe.deltas is not None


def _merge_mask(n_prompt: int, n_total: int, positions: Any) -> torch.Tensor:
    """[1, n_total] bool: where generation merged for a row of ``n_prompt`` prompt tokens."""
    prompt = position_mask(torch.ones(1, n_prompt, dtype=torch.long), positions)
    rest = torch.full((1, n_total - n_prompt), isinstance(positions, str), dtype=torch.bool)
    return torch.cat([prompt, rest], dim=1)


def _row_logits(
    loaded: Any, ids: torch.Tensor, n_prompt: int, select: Any = None, recipe: Any = None
) -> torch.Tensor:
    """[seq, vocab] float32 logits of one unpadded row under the system's merge, or under ``recipe`` (a
    request's own, `LoadedSystem.request_recipe`) when given (at ``select``, a [1, seq] bool mask, when
    given; else where generation merged)."""
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
        if select is None:
            select = _merge_mask(n_prompt, ids.shape[1], recipe.resolved_positions())
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


def _scored_rows(
    loaded: Any, result: Any, top: int, recipes: list[Any] | None = None
) -> list[list[tuple[float, tuple[Any, ...]]]]:
    """Per row, per new token: (its logprob, its ``top`` alternatives as (token id, logprob) pairs, most
    likely first), each row under its own recipe when ``recipes`` is given. vLLM reports them while it
    generates (`result.info["logprobs"]`, backend vllm); our engines' rows are scored here."""
    carried = result.info.get("logprobs")
    if carried is not None:
        return carried
    if loaded.config.backend == "vllm":
        raise LatentMergeError(
            f"logprobs: system {loaded.name!r} (backend vllm) got no logprobs from vLLM; its models here "
            "are shells without weights"
        )
    width = result.prompt_width
    out = []
    for row, new in enumerate(result.tokens):
        if not new:
            out.append([])
            continue
        prompt = result.sequences[row, :width][result.attention_mask[row, :width].bool()]
        ids = torch.cat([prompt, torch.tensor(new, dtype=prompt.dtype)])
        n = prompt.shape[0]
        recipe = None if recipes is None else recipes[row]
        logits = _row_logits(loaded, ids, n, recipe=recipe)[n - 1 : n - 1 + len(new)]
        logp = torch.log_softmax(logits, dim=-1).cpu()
        chosen = logp[torch.arange(len(new)), torch.tensor(new)].tolist()
        values, indices = torch.topk(logp, min(top, logp.shape[-1]), dim=-1)
        out.append(
            [
                (chosen[i], tuple(zip(indices[i].tolist(), values[i].tolist(), strict=True)))
                for i in range(len(new))
            ]
        )
    return out


def token_logprobs(
    loaded: Any, result: Any, top: int, recipes: list[Any] | None = None
) -> list[tuple[Any, ...]]:
    """One tuple of `TokenLogprob` per row of a `GenerationResult` (``top`` alternatives each; each row
    scored under its own recipe when ``recipes`` holds one per row)."""
    if not supports_logprobs(loaded.config):
        raise LatentMergeError(
            f"logprobs: system {loaded.name!r} (kind {loaded.config.kind!r}) cannot report logprobs; "
            "single, weight and latent systems can"
        )
    tokenizer = loaded.tokenizer
    out = []
    for new, scored in zip(result.tokens, _scored_rows(loaded, result, top, recipes), strict=True):
        out.append(
            tuple(
                TokenLogprob(
                    tokenizer.decode([token]),
                    float(chosen),
                    tuple((tokenizer.decode([int(t)]), float(v)) for t, v in alternatives),
                )
                for token, (chosen, alternatives) in zip(new, scored, strict=True)
            )
        )
    return out
