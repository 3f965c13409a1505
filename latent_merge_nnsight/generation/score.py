"""`lmn.score`: teacher-forced log-probabilities of continuations under a merge, merged as generation merges.

    recipe = lmn.Recipe(op="slerp", layers={20: 0.5})
    res = lmn.score(base, ft, ["The capital of France is"], [" Paris"], recipe)
    res.logprobs[0]   # log p of each continuation token;  res.totals[0]: their sum
    res.greedy[0]     # whether each one was the greedy choice;  res.all_greedy[0]

Each row is (context, continuation). The merge is applied where `lmn.generate` would have applied it,
had it generated that continuation from that context:
- positions "last": at the context's last token and at every continuation token;
- positions "all": at every token;
- explicit indices / a slice: at those context positions (counted over the context's real tokens) and
  at no continuation token, as in generation.
Sites, layers, alphas and ops are the recipe's; the logit ensemble mixes its logits with the weight of
each generation step (continuation token j is step j); a single model (`recipe=None`) and a weight-merged
model are the base alone. The numbers are those of the distribution each token would be drawn from at
temperature 1, so a continuation that greedy `lmn.generate` produced scores as the sum of that
generation's log-probabilities and is greedy at every token.

`recipe` may also be a list, one recipe (or None: the base alone) per row, as for `lmn.generate`: the
rows share the sources and one forward mixes each row by its own op, layers, alphas, site and positions
(`plan.rows_plan`); row i scores as a call with `recipe[i]` alone.

Rows run in batches (padded left or right, any lengths) through the fast engine's paired stepper
(`generation.fast.PairedEngine.score_states`): both models in lockstep, each source only up to its
deepest merged layer (`Plan.source_blocks`). A batch runs each distinct context once (rows sharing it,
as a multiple-choice question's choices, share its forward when they merge it alike), then every row's
continuation in one more forward that goes on from its context's KV caches (`PairedEngine.branch`), as
generation's decode steps go on from its prefill. Teacher forcing equals generation because attention is
causal: a position's states depend only on the positions before it, merged the same way.

`merge_from` (per row) replaces the recipe's positions by "every position from this index on" (an
echoed prompt, `systems.echo`); `next_logprobs` also returns the distribution after each row (the token
an echo request generates); `engine="vllm"` scores as vLLM's prompt logprobs (`generation.score_vllm`).
"""

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol, TypeAlias

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.generation.fast import PairedEngine
from latent_merge_nnsight.generation.run import _check_merge_happens
from latent_merge_nnsight.generation.stack import Stack, fast_support, plain_forwards
from latent_merge_nnsight.models import hf_module, model_info
from latent_merge_nnsight.nouns import Model, Tokenizer
from latent_merge_nnsight.plan import Plan, RecipeLike, Sources, resolve_plan

if TYPE_CHECKING:
    from latent_merge_nnsight.recipe import Recipe

__all__ = ["ScoreResult", "score"]

HEAD_CHUNK = 512
"""Positions whose logits are computed at once (the LM head's output is `chunk x vocab` floats)."""

ENGINES = ("fast", "vllm")
"""What `lmn.score` runs on."""


class LoadedLike(Protocol):
    """What `score` reads of a loaded system (`systems.loaded.LoadedSystem`, not imported here: it
    imports this module)."""

    @property
    def base(self) -> Model: ...

    def scoring_setup(self) -> tuple[Model, Sources, RecipeLike]: ...

    def generation_setup(self) -> tuple[Sources, RecipeLike]: ...


Rows: TypeAlias = Sequence[str | Sequence[int] | Tensor]
"""Per row, a string (tokenized) or token ids."""


@dataclass
class ScoreResult:
    """What `lmn.score` returns, one entry per row in the order given.

    Attributes:
        tokens: the continuation's token ids.
        logprobs: log-probability of each continuation token given everything before it.
        greedy: whether each continuation token was the most likely next token (the greedy choice).
        top: per token, the `top` most likely tokens as (token id, logprob), most likely first (empty
            tuples when `top=0`).
        recipe: the recipe (or Ensemble, or None, or the list of per-row recipes) that scored.
        next: with `next_logprobs=True`, per row the log-probabilities over the vocabulary of the token
            after the continuation (a float tensor on the CPU); otherwise empty.
    """

    tokens: list[list[int]]
    logprobs: list[list[float]]
    greedy: list[list[bool]]
    top: list[list[tuple[tuple[int, float], ...]]] = field(default_factory=list)
    recipe: "RecipeLike | Sequence[Recipe | None]" = None
    next: list[Float[Tensor, " vocab"]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def totals(self) -> list[float]:
        """Per row, the continuation's log-probability (the sum over its tokens)."""
        return [float(sum(row)) for row in self.logprobs]

    @property
    def all_greedy(self) -> list[bool]:
        """Per row, whether greedy decoding would have produced the whole continuation."""
        return [all(row) for row in self.greedy]


# ----------------------------------------------------------------------------------------------------
# checks and encoding


def _ids(tokenizer: Tokenizer | None, items: Rows, what: str, special: bool) -> list[list[int]]:
    """Token id lists from strings (tokenized) or id lists (checked)."""
    if isinstance(items, str) or not isinstance(items, Sequence):
        raise LatentMergeError(
            f"{what} has type {type(items).__name__}; expected a list of strings or token ids"
        )
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            if tokenizer is None:
                raise LatentMergeError(f"{what}[{i}] is text but the model has no tokenizer; pass token ids")
            out.append(list(tokenizer(item, add_special_tokens=special)["input_ids"]))
        elif isinstance(item, Tensor):
            out.append([int(t) for t in item.flatten().tolist()])
        elif isinstance(item, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            out.append([int(t) for t in item])
        else:
            raise LatentMergeError(
                f"{what}[{i}] has type {type(item).__name__}; expected a string or token ids"
            )
    return out


def _check_rows(base: Model, contexts: list[list[int]], continuations: list[list[int]], empty: bool) -> None:
    if len(contexts) != len(continuations):
        raise LatentMergeError(
            f"contexts has {len(contexts)} rows and continuations {len(continuations)}; expected as many"
        )
    config = hf_module(base).config
    vocab, limit = config.vocab_size, getattr(config, "max_position_embeddings", None)
    for i, (ctx, cont) in enumerate(zip(contexts, continuations, strict=True)):
        if not ctx:
            raise LatentMergeError(f"contexts[{i}] is empty; expected at least one token to condition on")
        if not cont and not empty:
            raise LatentMergeError(f"continuations[{i}] is empty; expected at least one token to score")
        bad = [t for t in (*ctx, *cont) if not 0 <= t < vocab]
        if bad:
            raise LatentMergeError(
                f"row {i} holds token ids {bad[:3]}; expected 0 <= id < vocab_size={vocab}"
            )
        if limit is not None and len(ctx) + len(cont) > limit:
            raise LatentMergeError(
                f"row {i} has {len(ctx) + len(cont)} tokens; {model_info(base).name} takes at most {limit} "
                "(max_position_embeddings)"
            )


def _check_recipe_rows(recipe: "RecipeLike | Sequence[Recipe | None]", rows: int) -> None:
    if isinstance(recipe, (list, tuple)) and len(recipe) != rows:
        raise LatentMergeError(
            f"recipe is a list of {len(recipe)} recipes for {rows} rows; expected one recipe (or None) per "
            "row, or a single recipe for all"
        )


def _check_engine(base: Model, models: list[Model], plan: Plan) -> None:
    info = model_info(base)
    if info.truncated:
        raise LatentMergeError(
            f"base {info.name} holds only {info.n_layers} of its {info.full_n_layers} layers; score with the "
            "whole model"
        )
    for model in [base, *(models if plan.live_sources else [])]:
        reason = fast_support(model)
        if reason is not None:
            raise LatentMergeError(
                f"lmn.score runs on the block-by-block engine, which cannot run this model: {reason}"
            )
    if any(isinstance(p.positions, Tensor) for p in (plan.groups or [plan])):
        raise LatentMergeError(
            "lmn.score takes positions 'last', 'all', a list of indices or a slice; a boolean mask over a "
            "forward's raw positions does not say which tokens of each row it means"
        )


def _check_merge_from(
    merge_from: Sequence[int | None] | None, contexts: list[list[int]], continuations: list[list[int]]
) -> list[int | None]:
    """Per row, the first merged position (None: the recipe's positions)."""
    if merge_from is None:
        return [None] * len(contexts)
    if isinstance(merge_from, (str, int)) or not isinstance(merge_from, Sequence):
        raise LatentMergeError(
            f"merge_from has type {type(merge_from).__name__}; expected a list with one token index (or "
            "None) per row"
        )
    if len(merge_from) != len(contexts):
        raise LatentMergeError(
            f"merge_from has {len(merge_from)} entries for {len(contexts)} rows; expected one per row"
        )
    for i, (m, ctx, cont) in enumerate(zip(merge_from, contexts, continuations, strict=True)):
        n = len(ctx) + len(cont)
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or not 0 <= m < n):
            raise LatentMergeError(f"merge_from[{i}]={m!r}; expected None or a token index 0 <= i < {n}")
    return list(merge_from)


def _merge_rows(
    plan: Plan, contexts: list[list[int]], continuations: list[list[int]], merge_from: list[int | None]
) -> list[Bool[Tensor, "*groups seq"]]:
    """Per row, where generation would have merged: context positions as the recipe selects them (on
    the batch of contexts, as a generation's prompt batch), then every continuation token for
    "last"/"all", none for explicit positions; a row's `merge_from` instead: every position from it on.
    A per-row plan gets one such mask per group, `[groups, seq]` (`Plan.select`; a row outside a group
    has alpha 0 there, so its mask there mixes nothing)."""
    if plan.mode != "merge":
        return [
            torch.zeros(len(c) + len(n), dtype=torch.bool)
            for c, n in zip(contexts, continuations, strict=True)
        ]
    width = max(len(c) for c in contexts)
    mask = torch.zeros(len(contexts), width, dtype=torch.long)
    for i, ctx in enumerate(contexts):
        mask[i, : len(ctx)] = 1
    groups = plan.groups or [plan]
    prompt = plan.select(mask, decoding=False).reshape(len(groups), *mask.shape)
    decoding = torch.tensor([g.merges_while_decoding for g in groups])
    out = []
    for i, (ctx, cont) in enumerate(zip(contexts, continuations, strict=True)):
        if merge_from[i] is None:
            row = torch.cat([prompt[:, i, : len(ctx)], decoding[:, None].expand(-1, len(cont))], dim=-1)
        else:
            row = (torch.arange(len(ctx) + len(cont)) >= merge_from[i]).expand(len(groups), -1)
        out.append(row if plan.groups else row[0])
    return out


def _batch_plan(
    plan: Plan, rows: list[int], select: Bool[Tensor, "*groups b seq"]
) -> tuple[Plan, Bool[Tensor, "*groups b seq"]]:
    """The plan and merge mask of one batch of `rows`: a per-row plan cut to them (their alphas, in
    batch order), without the layers and groups where none of them merges (so a batch of base rows runs
    no source; alpha 0 leaves a row's states bit for bit as they were); any other plan as is."""
    if not plan.groups:
        return plan, select
    index = torch.tensor(rows)
    groups, kept = [], []
    for g, group in enumerate(plan.groups):
        alphas = {layer: a[index] for layer, a in group.alphas.items() if bool(a[index].any())}
        if alphas:
            groups.append(replace(group, alphas=alphas))
            kept.append(g)
    if not groups:
        return Plan(mode="base", recipe=plan.recipe), select[:0]
    return replace(plan, groups=groups), select[kept]


# ----------------------------------------------------------------------------------------------------
# rows that share a context


def _row_alphas(plan: Plan, row: int) -> tuple[float, ...]:
    """A row's alphas under a per-row plan (what its context's states depend on besides the tokens)."""
    return tuple(float(a[row]) for g in plan.groups for _, a in sorted(g.alphas.items()))


def _batches(
    plan: Plan, contexts: list[list[int]], seqs: list[list[int]], selects: list[Tensor], batch_size: int
) -> list[list[list[int]]]:
    """The rows in batches of at most `batch_size`, each batch a list of context groups: rows whose
    context runs the same forward (the same tokens, merged at the same positions by the same alphas),
    so it runs once for all of them. Longest rows first (similar lengths share a batch); a context with
    more rows than `batch_size` is run once per batch its rows fill."""
    shared: dict[tuple, list[int]] = {}
    for r, ctx in enumerate(contexts):
        where = tuple(selects[r][..., : len(ctx)].flatten().tolist())
        shared.setdefault((tuple(ctx), where, _row_alphas(plan, r)), []).append(r)
    groups = [rows[i : i + batch_size] for rows in shared.values() for i in range(0, len(rows), batch_size)]
    groups.sort(key=lambda rows: -max(len(seqs[r]) for r in rows))
    batches: list[list[list[int]]] = []
    for rows in groups:
        if batches and sum(map(len, batches[-1])) + len(rows) <= batch_size:
            batches[-1].append(rows)
        else:
            batches.append([rows])
    return batches


# ----------------------------------------------------------------------------------------------------
# the forward and the numbers


@dataclass
class _Padded:
    ids: Int[Tensor, "b seq"]
    mask: Int[Tensor, "b seq"]
    select: Bool[Tensor, "*groups b seq"]
    starts: list[int]  # column of each row's first real token


def _pad(seqs: list[list[int]], selects: list[Tensor], side: str, pad_id: int) -> _Padded:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    select = torch.zeros(*selects[0].shape[:-1], len(seqs), width, dtype=torch.bool)
    starts = []
    for j, (seq, sel) in enumerate(zip(seqs, selects, strict=True)):
        start = width - len(seq) if side == "left" else 0
        if seq:
            ids[j, start : start + len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[j, start : start + len(seq)] = 1
            select[..., j, start : start + len(seq)] = sel
        starts.append(start)
    return _Padded(ids, mask, select, starts)


def _head(stack: Stack, states: Float[Tensor, "n d_model"]) -> Float[Tensor, "n vocab"]:
    return torch.cat(
        [stack.logits(states[i : i + HEAD_CHUNK]) for i in range(0, states.shape[0], HEAD_CHUNK)]
    )


def _logits(plan: Plan, stacks: list[Stack], states: list[Tensor]) -> Float[Tensor, "n vocab"]:
    """The logits each state's next token is chosen from (state k is generation step k: the ensemble's
    weight)."""
    logits = _head(stacks[0], states[0])
    if plan.mode != "ensemble":
        return logits
    src = _head(stacks[1], states[1]).to(logits.device)
    return torch.stack([plan.next_logits(logits[k], src[k], k) for k in range(logits.shape[0])])


@dataclass
class _Rows:
    """Every row's context, the tokens fed after it and merge mask, and how batches are padded."""

    stacks: list[Stack]
    plan: Plan
    contexts: list[list[int]]
    feeds: list[list[int]]  # each continuation, less its last token unless what follows it is asked for
    selects: list[Tensor]
    side: str
    pad_id: int

    def run(self, groups: list[list[int]]) -> dict[int, list[Tensor]]:
        """One batch: each context group's context once (its first row's), then every row's fed tokens
        going on from its context's caches. Per row, the states that predict its tokens after the
        context (the context's last one, then one per fed token): the base's, and the source's for the
        ensemble."""
        heads = [g[0] for g in groups]
        first = _pad(
            [self.contexts[r] for r in heads],
            [self.selects[r][..., : len(self.contexts[r])] for r in heads],
            self.side,
            self.pad_id,
        )
        plan, select = _batch_plan(self.plan, heads, first.select)
        width = first.ids.shape[1] + max(len(self.feeds[r]) for g in groups for r in g)
        engine = PairedEngine(self.stacks[0], self.stacks[1:], plan, len(heads), width, cuda_graphs=False)
        device = engine.device
        try:
            hb, hs = engine.score_states(first.ids.to(device), first.mask.to(device), select.to(device))
            last = [first.starts[u] + len(self.contexts[r]) - 1 for u, r in enumerate(heads)]
            ends = [[h[u, c][None] for u, c in enumerate(last)] for h in (hb, hs) if h is not None]
            rows = [r for g in groups for r in g]
            index = [u for u, g in enumerate(groups) for _ in g]
            out = {r: [e[index[j]] for e in ends] for j, r in enumerate(rows)}
            if max(len(self.feeds[r]) for r in rows) > 0:
                for r, later in zip(rows, self._go_on(engine, rows, index, first.mask), strict=True):
                    out[r] = [torch.cat([a, b.to(a.device)]) for a, b in zip(out[r], later, strict=True)]
            return out
        finally:
            engine.release()

    def _go_on(
        self, engine: PairedEngine, rows: list[int], index: list[int], context_mask: Tensor
    ) -> list[list[Tensor]]:
        """Each row's fed tokens in one forward over the caches of its context (`index`: its group)."""
        ahead = [
            self.selects[r][..., len(self.contexts[r]) : len(self.contexts[r]) + len(self.feeds[r])]
            for r in rows
        ]
        then = _pad([self.feeds[r] for r in rows], ahead, "right", self.pad_id)
        plan, select = _batch_plan(self.plan, rows, then.select)
        engine.branch(torch.tensor(index), plan)
        device = engine.device
        mask = torch.cat([context_mask[index], then.mask], dim=-1).to(device)
        hb, hs = engine.score_states(then.ids.to(device), mask, select.to(device))
        return [[h[j, : len(self.feeds[r])] for h in (hb, hs) if h is not None] for j, r in enumerate(rows)]


def score(
    base: "Model | LoadedLike",
    sources: Sources = None,
    contexts: Rows | None = None,
    continuations: Rows | None = None,
    recipe: "RecipeLike | Sequence[Recipe | None]" = None,
    *,
    batch_size: int = 16,
    padding_side: str = "right",
    top: int = 0,
    tokenizer: Tokenizer | None = None,
    merge_from: Sequence[int | None] | None = None,
    next_logprobs: bool = False,
    engine: str = "fast",
) -> ScoreResult:
    """Log-probability of each continuation token given its context, under `recipe` merged as
    `lmn.generate` would merge it (see the module docstring for where the merge applies).

    Arguments:
        base: the model that generates (from `lmn.load` / `lmn.wrap`), or a loaded system
            (`load_system(...)`, any kind but `backend: vllm`: then `sources` and `recipe` are the system's).
        sources: as for `lmn.generate`: a source model, a list (RegMean), `Deltas`, or None.
        contexts: per row, a string (tokenized with the tokenizer's special tokens, as `lmn.generate`
            with `chat=False` does) or token ids; at least one token each. Rows with the same context
            (multiple choice) run it once.
        continuations: per row, a string (tokenized without special tokens) or token ids; at least one
            token each (none is allowed with `next_logprobs`). Pass ids to score exactly the tokens a
            generation produced.
        recipe: an `lmn.Recipe`, an `Ensemble`, None (the base alone), or a list with one recipe (or
            None) per row: rows may differ in op, layers, alphas, site and positions and share `sources`,
            so each takes a live-source op (not `delta`, not an `Ensemble`); row i scores as a call with
            `recipe[i]` alone.
        batch_size: rows per forward (rows are grouped by length; results come back in the given order).
        padding_side: how contexts are padded, "right" or "left" (the numbers do not depend on it, to
            float rounding; a model with sliding-window attention always pads on the left, where a window
            counts only real tokens).
        top: also report the `top` most likely tokens at each continuation position.
        tokenizer: overrides the base's tokenizer for string inputs.
        merge_from: per row, None (the recipe's positions) or the index into the row's tokens (context,
            then continuation) from which on every position merges, with the recipe's layers, alphas and
            op (an echoed prompt whose context end the recipe's positions cannot see).
        next_logprobs: also return, per row, the log-probabilities of the token after the continuation
            (`ScoreResult.next`).
        engine: "fast" (the paired block-by-block engine) or "vllm" (vLLM's prompt logprobs, each row
            merged from where generation would merge: `generation.score_vllm`; positions "last" or
            "all", or `merge_from`; a `backend: vllm` system scores there).

    Everything is checked before any forward runs; a bad argument raises `LatentMergeError`.
    """
    if engine not in ENGINES:
        raise LatentMergeError(f"engine={engine!r}; expected one of {', '.join(ENGINES)}")
    setup = getattr(base, "scoring_setup", None)
    if callable(setup):  # a loaded system: its models and recipe
        if sources is not None or recipe is not None:
            raise LatentMergeError(
                "score(system, ...) takes the system's own sources and recipe; pass neither"
            )
        if engine == "vllm" or base.config.backend == "vllm":  # its models may be shells: vLLM has weights
            engine, (sources, recipe), base = "vllm", base.generation_setup(), base.base
        else:
            base, sources, recipe = setup()
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise LatentMergeError(f"batch_size={batch_size!r}; expected an int >= 1")
    if padding_side not in ("left", "right"):
        raise LatentMergeError(f"padding_side={padding_side!r}; expected 'left' or 'right'")
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise LatentMergeError(f"top={top!r}; expected an int >= 0")
    _check_merge_happens(sources, recipe)
    plan, models = resolve_plan(base, sources, recipe, weights_on_disk=engine == "vllm")
    if engine == "fast":
        _check_engine(base, models, plan)
    elif next_logprobs:
        raise LatentMergeError("next_logprobs=True runs on engine='fast'")
    tokenizer = tokenizer if tokenizer is not None else getattr(base, "tokenizer", None)
    ctx = _ids(tokenizer, contexts, "contexts", special=True)
    cont = _ids(tokenizer, continuations, "continuations", special=False)
    _check_rows(base, ctx, cont, empty=next_logprobs)
    _check_recipe_rows(recipe, len(ctx))
    starts = _check_merge_from(merge_from, ctx, cont)
    if engine == "vllm":
        from latent_merge_nnsight.generation.score_vllm import score_vllm

        logprobs, greedy, tops = score_vllm(base, models, plan, ctx, cont, starts, top)
        return ScoreResult(tokens=cont, logprobs=logprobs, greedy=greedy, top=tops, recipe=plan.recipe)
    selects = _merge_rows(plan, ctx, cont, starts)
    seqs = [c + n for c, n in zip(ctx, cont, strict=True)]
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = pad_id if isinstance(pad_id, int) else 0

    stacks = [Stack(base), *(Stack(m) for m in (models if plan.live_sources else []))]
    if any(w is not None for stack in stacks for w in stack.distinct_windows):
        padding_side = "left"
    feeds = cont if next_logprobs else [n[:-1] for n in cont]
    rows = _Rows(stacks, plan, ctx, feeds, selects, padding_side, pad_id)
    n = len(seqs)
    logprobs: list[list[float]] = [[] for _ in range(n)]
    greedy: list[list[bool]] = [[] for _ in range(n)]
    tops: list[list[tuple[tuple[int, float], ...]]] = [[] for _ in range(n)]
    following: dict[int, Tensor] = {}
    wd = torch.float64 if stacks[0].dtype == torch.float64 else torch.float32
    with torch.inference_mode(), plain_forwards([m for stack in stacks for m in stack.modules]):
        for batch in _batches(plan, ctx, seqs, selects, batch_size):
            for r, states in rows.run(batch).items():
                logp = torch.log_softmax(_logits(plan, stacks, states).to(wd), dim=-1)
                target = torch.tensor(cont[r], device=logp.device, dtype=torch.long)
                chosen = logp[: len(cont[r])]
                logprobs[r] = chosen.gather(-1, target[:, None]).squeeze(-1).tolist()
                greedy[r] = (chosen.argmax(dim=-1) == target).tolist()
                tops[r] = _top(chosen, top)
                if next_logprobs:
                    following[r] = logp[len(cont[r])].cpu()
    nexts = [following[r] for r in range(n)] if next_logprobs else []
    return ScoreResult(
        tokens=cont, logprobs=logprobs, greedy=greedy, top=tops, recipe=plan.recipe, next=nexts
    )


def _top(logp: Float[Tensor, "n vocab"], top: int) -> list[tuple[tuple[int, float], ...]]:
    """Per position, the `top` most likely tokens as (token id, logprob), most likely first."""
    if not top:
        return [() for _ in range(logp.shape[0])]
    values, indices = torch.topk(logp, min(top, logp.shape[-1]), dim=-1)
    return [tuple(zip(i.tolist(), v.tolist(), strict=True)) for i, v in zip(indices, values, strict=True)]
