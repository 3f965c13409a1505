"""Ready-made evaluators for `sweep`: `Perplexity` (teacher-forced NLL) and `TaskAccuracy` (toy tasks).

An evaluator is a callable `evaluate(model, sources, recipe, prompts)` returning `{metric: number}` or
`{category: {metric: number}}`; `recipe=None` means "the model alone".

**Reuse below the merge layer.** `sweep` visits cells layer by layer (all ops and alphas of a layer in a
row), so an evaluator can keep per-layer work between cells. `Perplexity` does: per (texts, layer) it runs
the base and the sources once up to the merge layer, then for each (op, alpha) it runs only the blocks from
the merge layer up (the lower blocks are skipped with nnsight's `skip`, fed the cached residual).
`TaskAccuracy` cannot reuse prefixes across alphas (after the first new token the merged and base streams
differ at every layer); it keeps the fast engine's captured decode steps instead.
"""

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from latent_merge_nnsight.analysis.representations import as_model_list, as_recipe, model_device
from latent_merge_nnsight.analysis.sweep import fingerprint_of
from latent_merge_nnsight.deltas import Deltas, compute_deltas
from latent_merge_nnsight.ensemble import Ensemble
from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.evaluation.tasks import MAX_NEW_TOKENS, Example, accuracy, chat_messages
from latent_merge_nnsight.generation.run import generate
from latent_merge_nnsight.generation.score import score
from latent_merge_nnsight.inputs import Batch, encode
from latent_merge_nnsight.merge import apply_plan
from latent_merge_nnsight.models import model_info
from latent_merge_nnsight.nouns import Chat, Model
from latent_merge_nnsight.ops import get_op
from latent_merge_nnsight.plan import RecipeLike, Sources, load_recipe_deltas, recipe_plan
from latent_merge_nnsight.recipe import Recipe
from latent_merge_nnsight.residuals import Capture, capture
from latent_merge_nnsight.sites import get_layers

__all__ = ["Perplexity", "TaskAccuracy"]


def _nll_sums(
    logits: Float[Tensor, "b p v"], ids: Int[Tensor, "b p"], mask: Int[Tensor, "b p"]
) -> tuple[float, int]:
    """Summed next-token negative log-likelihood over real (token, next token) pairs, and their count."""
    wd = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = torch.log_softmax(logits[:, :-1].to(wd), dim=-1)
    target = ids[:, 1:].to(logp.device)
    nll = -logp.gather(-1, target[..., None]).squeeze(-1)
    real = (mask[:, 1:].bool() & mask[:, :-1].bool()).to(nll.device)
    return float(nll[real].sum()), int(real.sum())


@dataclasses.dataclass
class _Prefix:
    """What one (texts, layer) needs for every alpha: cached base residual and source captures."""

    key: tuple
    chunks: list[Batch]
    base_states: list[Tensor | tuple]  # what the skipped blocks hand on (the residual entering the layer)
    sources: list[Any]  # per chunk: a Capture, a list of Captures (multi-source) or Deltas


class Perplexity:
    """Evaluator: token-level negative log-likelihood and perplexity of given texts under a (merged) model.

    Use as `sweep(..., evaluate=Perplexity(), prompts=texts)`; the texts are scored whole (every real
    token after the first), teacher-forced, by `lmn.score` (the model alone, and merges without prefix
    reuse); with prefix reuse, or explicit positions or steering deltas, the merge is applied with the
    recipe's `Plan` (`merge.apply_plan`) in an nnsight trace (the same numbers, to float rounding).
    Positions: the recipe's, or "all" when the recipe leaves them unset: teacher forcing stands in for
    generation, where lockstep merging mixes every new token (with the paper's "last", only the final
    position would change, and its prediction is not scored).

    Reuse: for single-layer recipes it keeps, for the latest (model, sources, texts, layer, site), the
    base residual entering the merge layer and the sources' captures; each further (op, alpha) skips the
    base's blocks below the layer (nnsight `skip`, fed the cached residual) and runs no source forward.
    `reuse_prefix=False` runs everything per call (same numbers, to float rounding).

    `batch(model, sources, recipes, prompts)` scores several systems on the same texts (what `sweep`
    calls): the recipes `lmn.score` can mix per row (live-source ops at positions "last", "all" or unset,
    and None) and that prefix reuse does not take run together, one row per (recipe, text), in one
    `lmn.score` call; the rest one call each. Each result equals its own call's (to float rounding).

    Returns `{"nll": mean nats per token, "perplexity": exp(nll), "n_tokens": count}`.
    """

    def __init__(self, *, batch_size: int = 8, reuse_prefix: bool = True, padding_side: str = "right"):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise LatentMergeError(f"batch_size={batch_size!r}; expected an int >= 1")
        if padding_side not in ("left", "right"):
            raise LatentMergeError(f"padding_side={padding_side!r}; expected 'left' or 'right'")
        self.batch_size = batch_size
        self.reuse_prefix = reuse_prefix
        self.padding_side = padding_side
        self._prefix: _Prefix | None = None
        self.prefix_runs = 0
        """How many times a prefix (base and sources up to the merge layer) was computed."""

    def __repr__(self) -> str:
        return f"Perplexity(batch_size={self.batch_size}, reuse_prefix={self.reuse_prefix})"

    def _chunks(self, model: Model, texts: Sequence[str]) -> list[Batch]:
        batch = encode(getattr(model, "tokenizer", None), texts, padding_side=self.padding_side)  # type: ignore[arg-type]
        ids, mask = batch.input_ids, batch.attention_mask
        return [
            Batch(ids[i : i + self.batch_size], mask[i : i + self.batch_size])
            for i in range(0, ids.shape[0], self.batch_size)
        ]

    def batch(
        self, model: Model, sources: Sequence[Model], recipes: Sequence[Recipe | None], prompts: Sequence[str]
    ) -> list[dict[str, float]]:
        """`[self(model, sources, r, prompts) for r in recipes]`, the per-row recipes in one `lmn.score`."""
        rows = [None if r is None else as_recipe(r) for r in recipes]
        together = [j for j, r in enumerate(rows) if self._per_row(r, model)]
        results = [
            self(model, sources, r, prompts) if j not in together else None for j, r in enumerate(rows)
        ]
        if together:
            texts = self._token_rows(model, prompts)
            srcs = list(sources)
            merging = any(rows[j] is not None for j in together)
            got = score(
                model, (srcs if len(srcs) > 1 else srcs[0]) if merging and srcs else None,
                [r[:1] for _ in together for r in texts], [r[1:] for _ in together for r in texts],
                [rows[j] for j in together for _ in texts],
                batch_size=self.batch_size, padding_side=self.padding_side,
            )  # fmt: skip
            n, count = len(texts), sum(len(r) - 1 for r in texts)
            for k, j in enumerate(together):
                results[j] = self._result(-sum(got.totals[k * n : (k + 1) * n]), count)
        return results  # type: ignore[return-value]

    def _per_row(self, recipe: Recipe | None, model: Model) -> bool:
        """Whether `recipe` scores as one row of a per-row `lmn.score` call (as `__call__`'s score path)."""
        if recipe is None:
            return True
        if get_op(recipe.op).static_source or not isinstance(recipe.resolved_positions(), str):
            return False
        layers = sorted(recipe.layer_alphas(model_info(model).n_layers))
        return not (self.reuse_prefix and len(layers) == 1 and layers[0] > 0)

    def __call__(
        self, model: Model, sources: Sequence[Model], recipe: Recipe | None, prompts: Sequence[str]
    ) -> dict[str, float]:
        if recipe is None:
            return self._scored(model, None, None, prompts)
        recipe = as_recipe(recipe)
        srcs = list(sources)
        plan = recipe_plan(recipe, model_info(model).n_layers, positions="all")  # teacher-forced: every token
        if not srcs and not (plan.op.static_source and recipe.deltas):
            raise LatentMergeError(f"sources is empty; recipe op {recipe.op!r} needs a source model")
        layers = sorted(plan.alphas)
        reuse = self.reuse_prefix and len(layers) == 1 and layers[0] > 0
        if not reuse and not plan.op.static_source and isinstance(plan.positions, str):
            # "last" and "all" merge every scored token alike (the context is the first token)
            return self._scored(model, srcs if len(srcs) > 1 else srcs[0], recipe, prompts)
        chunks = self._chunks(model, prompts)
        total, count = 0.0, 0
        prefix = self._get_prefix(model, srcs, recipe, prompts, chunks, layers)
        blocks = get_layers(model)
        for i, chunk in enumerate(chunks):
            c = chunk.to(model_device(model))
            with torch.no_grad(), model.trace(input_ids=c.input_ids, attention_mask=c.attention_mask):
                if reuse:
                    for b in range(layers[0]):
                        blocks[b].skip(prefix.base_states[i])
                given = prefix.sources[i]
                for layer in layers:
                    apply_plan(plan, layer, given if isinstance(given, list) else [given], model)
                logits = model.output.logits.save()  # the forward's own: soft-capped where the model caps
            s, k = _nll_sums(logits, c.input_ids, c.attention_mask)
            total, count = total + s, count + k
        return self._result(total, count)

    def _token_rows(self, model: Model, texts: Sequence[str]) -> list[list[int]]:
        """Each text's token ids, those with a token pair to score (none: the error `_result` raises)."""
        batch = encode(getattr(model, "tokenizer", None), texts, padding_side=self.padding_side)  # type: ignore[arg-type]
        rows = [
            ids[mask.bool()].tolist() for ids, mask in zip(batch.input_ids, batch.attention_mask, strict=True)
        ]
        rows = [r for r in rows if len(r) > 1]
        if not rows:
            self._result(0.0, 0)
        return rows

    def _scored(
        self, model: Model, sources: Sources, recipe: Recipe | None, texts: Sequence[str]
    ) -> dict[str, float]:
        """Every token after each text's first, scored by `lmn.score` (the one scoring path)."""
        rows = self._token_rows(model, texts)
        got = score(
            model, sources, [r[:1] for r in rows], [r[1:] for r in rows], recipe,
            batch_size=self.batch_size, padding_side=self.padding_side,
        )  # fmt: skip
        return self._result(-sum(got.totals), sum(len(r) - 1 for r in rows))

    @staticmethod
    def _result(total: float, count: int) -> dict[str, float]:
        if count == 0:
            raise LatentMergeError(
                "prompts have no token pairs to score; each text needs at least two tokens"
            )
        nll = total / count
        return {"nll": nll, "perplexity": math.exp(nll), "n_tokens": float(count)}

    def _get_prefix(
        self,
        model: Model,
        srcs: list[Model],
        recipe: Recipe,
        texts: Sequence[str],
        chunks: list[Batch],
        layers: list[int],
    ) -> _Prefix:
        spec = get_op(recipe.op)
        key = (
            id(model),
            tuple(id(s) for s in srcs),
            fingerprint_of({"texts": texts}),
            tuple(layers),
            recipe.site,
            spec.static_source,
            recipe.deltas,
            self.padding_side,
        )
        if self._prefix is not None and self._prefix.key == key:
            return self._prefix
        self.prefix_runs += 1
        base_states: list[Any] = []
        per_chunk_sources: list[Any] = []
        deltas: Deltas | None = None
        if spec.static_source:
            if recipe.deltas is not None:
                deltas = load_recipe_deltas(recipe, device=model_device(model))
            else:
                deltas = compute_deltas(
                    model, srcs[0], texts, layers, site=recipe.site, batch_size=self.batch_size
                )
        blocks = get_layers(model)
        for chunk in chunks:
            if deltas is not None:
                per_chunk_sources.append(deltas)
            else:
                caps: list[Capture] = [
                    capture(
                        s,
                        input_ids=chunk.input_ids,
                        attention_mask=chunk.attention_mask,
                        layers=layers,
                        site=recipe.site,
                    )
                    for s in srcs
                ]
                per_chunk_sources.append(caps if spec.multi_source else caps[0])
            if self.reuse_prefix and len(layers) == 1 and layers[0] > 0:
                c = chunk.to(model_device(model))
                with (
                    torch.no_grad(),
                    model.trace(input_ids=c.input_ids, attention_mask=c.attention_mask) as tracer,
                ):
                    out = blocks[layers[0] - 1].output
                    state = (out[0].clone(),) if isinstance(out, tuple) else out.clone()
                    state = state.save()
                    tracer.stop()
                base_states.append(state)
        self._prefix = _Prefix(key, chunks, base_states, per_chunk_sources)
        return self._prefix


def _by_category(examples: list[Example]) -> dict[str, list[int]]:
    """Example indices by category, in first-seen order (a category's rows share a token budget)."""
    by_category: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_category.setdefault(ex.category, []).append(i)
    return by_category


def _per_row(recipe: "Recipe | Ensemble | None") -> bool:
    """Whether a system can share a pass as a per-row recipe (the model alone, or a live-source op)."""
    return recipe is None or (isinstance(recipe, Recipe) and not get_op(recipe.op).static_source)


class TaskAccuracy:
    """Evaluator for the toy tasks: greedy exact-match accuracy per category, generated with `lmn.generate`.

    `prompts` is a list of `lmn.evaluation.tasks.Example`; each is asked as one user turn (the chat the toy
    models were trained on), answered greedily within the category's token budget (`tasks.MAX_NEW_TOKENS`
    unless `max_new_tokens` is given) and scored with `tasks.score`. Op `delta` steers with `sources` when
    they are `Deltas`, else with the recipe's `deltas` file, or else with
    `compute_deltas(model, sources[0], the prompts' chats, layers)`. A recipe may also be an `lmn.Ensemble`
    (a logit ensemble of `model` and `sources`).
    Returns `{category: {"accuracy": x}}`, x a fraction in [0, 1].

    With the fast engine the engine (its caches, and on CUDA its captured decode steps) is kept on the
    model from call to call (`generate(..., keep_engine=True)`), so a sweep over alphas captures once per
    layer and op; `sweep` lets it go when it ends (`generation.release_engine`).

    `batch(model, sources, recipes, prompts)` scores several systems on the same prompts at once: every
    (recipe, prompt) is one row of per-row recipes (`lmn.generate(recipe=[...])`), up to `batch_size` rows
    a pass, so a grid of alphas costs a few passes instead of one per cell (`sweep`, `lmn search` and
    `lmn demo` call it). Each system's result equals its own call's (token for token in float64).
    `generations(...)` is the same with the texts themselves (the demo keeps them for its report).
    """

    def __init__(self, *, max_new_tokens: int | None = None, batch_size: int = 64, engine: str = "auto"):
        if max_new_tokens is not None and (
            isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1
        ):
            raise LatentMergeError(f"max_new_tokens={max_new_tokens!r}; expected an int >= 1 or None")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise LatentMergeError(f"batch_size={batch_size!r}; expected an int >= 1")
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.engine = engine
        self._deltas: tuple[tuple, Deltas] | None = None

    def __repr__(self) -> str:
        return f"TaskAccuracy(max_new_tokens={self.max_new_tokens}, batch_size={self.batch_size})"

    def batch(
        self, model: Model, sources: Sources, recipes: Sequence[RecipeLike], prompts: Sequence[Example]
    ) -> list[dict[str, dict[str, float]]]:
        """`[self(model, sources, r, prompts) for r in recipes]`, with the live-source recipes (and None)
        run together as per-row recipes; steering (`delta`) recipes and ensembles run one call each."""
        examples = list(prompts)
        texts = self.generations(model, sources, recipes, examples)
        return [{c: {"accuracy": a} for c, a in accuracy(examples, out).items()} for out in texts]

    def generations(
        self, model: Model, sources: Sources, recipes: Sequence[RecipeLike], prompts: Sequence[Example]
    ) -> list[list[str]]:
        """Per recipe, the generated answer to every prompt (in prompt order): the live-source recipes
        (and None) together as per-row recipes, `batch_size` rows a pass (a lone one as a plain recipe);
        steering recipes and ensembles in calls of their own."""
        systems = [r if r is None or isinstance(r, Ensemble) else as_recipe(r) for r in recipes]
        examples, chats = self._examples(prompts)
        outputs: list[list[str]] = [[""] * len(examples) for _ in systems]
        together = [j for j, r in enumerate(systems) if _per_row(r)]
        for j, r in enumerate(systems):
            if j not in together:
                self._generate(
                    model, self._sources(model, sources, r, chats), [r], chats, examples, [outputs[j]]
                )
        if together:
            merging = any(systems[j] is not None for j in together)
            srcs = self._sources(model, sources, None, chats) if merging else None
            rows = [systems[j] for j in together]
            self._generate(model, srcs, rows, chats, examples, [outputs[j] for j in together])
        return outputs

    def _generate(
        self,
        model: Model,
        sources: Sources,
        systems: list["Recipe | Ensemble | None"],
        chats: list[Chat],
        examples: list[Example],
        outputs: list[list[str]],
    ) -> None:
        """Answer every (system, prompt), category by category within its budget, into `outputs`: one
        system per call as itself, several as per-row recipes (system-major rows)."""
        for category, idx in _by_category(examples).items():
            budget = self.max_new_tokens or MAX_NEW_TOKENS.get(category, 64)
            pairs = [(k, i) for k in range(len(systems)) for i in idx]
            for start in range(0, len(pairs), self.batch_size):
                chunk = pairs[start : start + self.batch_size]
                recipe = systems[0] if len(systems) == 1 else [systems[k] for k, _ in chunk]
                result = generate(
                    model,
                    sources if recipe is not None else None,
                    [chats[i] for _, i in chunk],
                    recipe,  # type: ignore[arg-type]
                    max_new_tokens=budget,
                    engine=self.engine,
                    keep_engine=True,
                )
                for (k, i), text in zip(chunk, result.texts, strict=True):
                    outputs[k][i] = text

    @staticmethod
    def _examples(prompts: Sequence[Example]) -> tuple[list[Example], list[Chat]]:
        examples = list(prompts)
        if not examples:
            raise LatentMergeError("prompts=[] is empty; expected a list of evaluation.tasks.Example")
        for i, ex in enumerate(examples):
            if not isinstance(ex, Example):
                raise LatentMergeError(
                    f"prompts[{i}] has type {type(ex).__name__}; TaskAccuracy expects "
                    "evaluation.tasks.Example items (e.g. from tasks.make_eval_set)"
                )
        return examples, [chat_messages(ex.prompt) for ex in examples]

    def __call__(
        self, model: Model, sources: Sources, recipe: RecipeLike, prompts: Sequence[Example]
    ) -> dict[str, dict[str, float]]:
        return self.batch(model, sources, [recipe], prompts)[0]

    def _sources(
        self, model: Model, sources: Sources, recipe: "Recipe | Ensemble | None", chats: list[Chat]
    ) -> Sources:
        """What a system merges: the sources as given, or for a steering recipe its `Deltas`."""
        if isinstance(sources, Deltas) or isinstance(recipe, Ensemble):
            return sources
        if not (isinstance(recipe, Recipe) and get_op(recipe.op).static_source):
            return as_model_list(sources)
        srcs = as_model_list(sources) if sources is not None else []
        if recipe.deltas is not None:
            return load_recipe_deltas(recipe, device=model_device(model))
        if not srcs:
            raise LatentMergeError(
                "op 'delta' needs a source model to compute deltas from (or a recipe with a deltas file)"
            )
        layers = sorted(recipe.layer_alphas(model_info(model).n_layers))
        key = (id(model), id(srcs[0]), fingerprint_of({"chats": chats}), recipe.site)
        if self._deltas is None or self._deltas[0] != key or not set(layers) <= set(self._deltas[1].vectors):
            n = model_info(model).n_layers
            every = sorted(set(range(min(n, model_info(srcs[0]).n_layers))))
            self._deltas = (key, compute_deltas(model, srcs[0], chats, every, site=recipe.site))
        return self._deltas[1]
