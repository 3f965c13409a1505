"""Log-probabilities of the tokens a loaded system generated (the server's ``logprobs``).

The rows are scored after generation by `lmn.score` (teacher forcing, batched): the merge applied where
generation applied it (the recipe's layers, alphas, op and site; ``"last"``: the last prompt token and
every new token; ``"all"``: every token; explicit indices: those prompt positions only), the source on
exactly the same tokens, the logit ensemble mixed per step as it generated. So the numbers are those of
the distribution each token was drawn from, at temperature 1 (before temperature, top-p and top-k), up to
float rounding. A `backend: vllm` system holds no weights to score with: vLLM reports the same numbers
(its raw logprobs of the merged model's logits) while it generates, and those are used.
"""

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.generation.loop import GenerationResult
from latent_merge_nnsight.generation.score import LoadedLike, Rows, ScoreResult, score
from latent_merge_nnsight.nouns import Tokenizer
from latent_merge_nnsight.ops import get_op
from latent_merge_nnsight.systems.batching import TokenLogprob

if TYPE_CHECKING:
    from latent_merge_nnsight.recipe import Recipe
    from latent_merge_nnsight.systems.spec import System

__all__ = ["LoadedSystemLike", "score_as_generated", "supports_logprobs", "token_logprobs"]


class LoadedSystemLike(LoadedLike, Protocol):
    """What scoring reads of a loaded system (`systems.loaded.LoadedSystem`, which imports this module)."""

    config: "System"
    name: str
    tokenizer: Tokenizer


def supports_logprobs(config: "System") -> bool:
    """Whether `token_logprobs` can score this system's generations (not static steering vectors
    computed on the fly)."""
    if config.kind in ("single", "weight", "ensemble"):
        return True
    if config.kind != "latent" or config.recipe is None:
        return False
    return not get_op(config.recipe.op).static_source or config.recipe.deltas is not None


def _scored_rows(
    loaded: LoadedSystemLike,
    result: GenerationResult,
    top: int,
    recipes: "Sequence[Recipe | None] | None" = None,
) -> list[list[tuple[float, tuple[tuple[int, float], ...]]]]:
    """Per row, per new token: (its logprob, its ``top`` alternatives as (token id, logprob) pairs, most
    likely first). vLLM reports them while it generates (`result.info["logprobs"]`, backend vllm); our
    engines' rows are scored here, in one `lmn.score` call (rows with their own recipes, ``recipes``, as
    per-row recipes of that call)."""
    carried = result.info.get("logprobs")
    if carried is not None:
        return carried
    if loaded.config.backend == "vllm":
        raise LatentMergeError(
            f"logprobs: system {loaded.name!r} (backend vllm) got no logprobs from vLLM; its models here "
            "are shells without weights"
        )
    width = result.prompt_width
    scored = [row for row, new in enumerate(result.tokens) if new]
    prompts = [result.sequences[row, :width][result.attention_mask[row, :width].bool()] for row in scored]
    news = [list(result.tokens[row]) for row in scored]
    out: list[list[tuple[float, tuple[tuple[int, float], ...]]]] = [[] for _ in result.tokens]
    if scored:
        own = None if recipes is None else [recipes[row] for row in scored]
        got = score_as_generated(loaded, prompts, news, own, top=top)
        for k, row in enumerate(scored):
            out[row] = list(zip(got.logprobs[k], got.top[k], strict=True))
    return out


def score_as_generated(
    loaded: LoadedSystemLike,
    contexts: Rows,
    continuations: Rows,
    recipes: "Sequence[Recipe | None] | None" = None,
    **kwargs: object,
) -> ScoreResult:
    """`lmn.score` of rows under the system as it generates, in one call: ``recipes`` gives a row its
    request's own recipe (None: the system's), as per-row recipes of that call; ``kwargs`` go to
    `lmn.score`."""
    single = loaded.config.kind in ("single", "weight")
    base, sources, recipe = (loaded.base, None, None) if single else loaded.scoring_setup()
    own = [recipe if recipes is None or recipes[i] is None else recipes[i] for i in range(len(contexts))]
    rows = own[0] if all(r is own[0] for r in own) else own  # one recipe for all: a plain call
    return score(base, sources, contexts, continuations, rows, **kwargs)


def token_logprobs(
    loaded: LoadedSystemLike,
    result: GenerationResult,
    top: int,
    recipes: "Sequence[Recipe | None] | None" = None,
) -> list[tuple[TokenLogprob, ...]]:
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
