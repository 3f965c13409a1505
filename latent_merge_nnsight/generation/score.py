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
(`generation.fast.PairedEngine.score_states`): both models in lockstep over the whole row in one forward,
each source only up to its deepest merged layer (`Plan.source_blocks`). One teacher-forced forward equals
generation's prefill and decode steps because attention is causal: a position's states depend only on
the positions before it, merged the same way.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.generation.fast import PairedEngine
from latent_merge_nnsight.generation.run import _check_merge_happens
from latent_merge_nnsight.generation.stack import Stack, fast_support
from latent_merge_nnsight.models import hf_module, model_info
from latent_merge_nnsight.plan import Plan, resolve_plan

__all__ = ["ScoreResult", "score"]

HEAD_CHUNK = 512
"""Positions whose logits are computed at once (the LM head's output is `chunk x vocab` floats)."""


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
    """

    tokens: list[list[int]]
    logprobs: list[list[float]]
    greedy: list[list[bool]]
    top: list[list[tuple[tuple[int, float], ...]]] = field(default_factory=list)
    recipe: Any = None

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


def _ids(tokenizer: Any, items: Any, what: str, special: bool) -> list[list[int]]:
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


def _check_rows(base: Any, contexts: list[list[int]], continuations: list[list[int]]) -> None:
    if len(contexts) != len(continuations):
        raise LatentMergeError(
            f"contexts has {len(contexts)} rows and continuations {len(continuations)}; expected as many"
        )
    config = hf_module(base).config
    vocab, limit = config.vocab_size, getattr(config, "max_position_embeddings", None)
    for i, (ctx, cont) in enumerate(zip(contexts, continuations, strict=True)):
        if not ctx:
            raise LatentMergeError(f"contexts[{i}] is empty; expected at least one token to condition on")
        if not cont:
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


def _check_recipe_rows(recipe: Any, rows: int) -> None:
    if isinstance(recipe, (list, tuple)) and len(recipe) != rows:
        raise LatentMergeError(
            f"recipe is a list of {len(recipe)} recipes for {rows} rows; expected one recipe (or None) per "
            "row, or a single recipe for all"
        )


def _check_engine(base: Any, models: list[Any], plan: Plan) -> None:
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


def _merge_rows(
    plan: Plan, contexts: list[list[int]], continuations: list[list[int]]
) -> list[Bool[Tensor, "*groups seq"]]:
    """Per row, where generation would have merged: context positions as the recipe selects them (on
    the batch of contexts, as a generation's prompt batch), then every continuation token for
    "last"/"all", none for explicit positions. A per-row plan gets one such mask per group, `[groups,
    seq]` (`Plan.select`; a row outside a group has alpha 0 there, so its mask there mixes nothing)."""
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
        row = torch.cat([prompt[:, i, : len(ctx)], decoding[:, None].expand(-1, len(cont))], dim=-1)
        out.append(row if plan.groups else row[0])
    return out


def _batch_plan(plan: Plan, batch: "_Batch") -> tuple[Plan, Bool[Tensor, "*groups b seq"]]:
    """The plan and merge mask of one batch: a per-row plan cut to the batch's rows (their alphas, in
    batch order), without the layers and groups where none of them merges (so a batch of base rows runs
    no source; alpha 0 leaves a row's states bit for bit as they were); any other plan as is."""
    if not plan.groups:
        return plan, batch.select
    index = torch.tensor(batch.rows)
    groups, kept = [], []
    for g, group in enumerate(plan.groups):
        alphas = {layer: a[index] for layer, a in group.alphas.items() if bool(a[index].any())}
        if alphas:
            groups.append(replace(group, alphas=alphas))
            kept.append(g)
    if not groups:
        return Plan(mode="base", recipe=plan.recipe), batch.select[:0]
    return replace(plan, groups=groups), batch.select[kept]


# ----------------------------------------------------------------------------------------------------
# the forward and the numbers


@dataclass
class _Batch:
    rows: list[int]
    ids: Int[Tensor, "b seq"]
    mask: Int[Tensor, "b seq"]
    select: Bool[Tensor, "*groups b seq"]
    starts: list[int]  # column of each row's first real token


def _pad(rows: list[int], seqs: list[list[int]], selects: list[Tensor], side: str, pad_id: int) -> _Batch:
    width = max(len(seqs[r]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    lead = selects[rows[0]].shape[:-1]
    select = torch.zeros(*lead, len(rows), width, dtype=torch.bool)
    starts = []
    for j, r in enumerate(rows):
        n = len(seqs[r])
        start = width - n if side == "left" else 0
        ids[j, start : start + n] = torch.tensor(seqs[r], dtype=torch.long)
        mask[j, start : start + n] = 1
        select[..., j, start : start + n] = selects[r]
        starts.append(start)
    return _Batch(rows, ids, mask, select, starts)


def _head(stack: Stack, states: Float[Tensor, "n d_model"]) -> Float[Tensor, "n vocab"]:
    return torch.cat(
        [stack.logits(states[i : i + HEAD_CHUNK]) for i in range(0, states.shape[0], HEAD_CHUNK)]
    )


def _row_logits(
    plan: Plan, stacks: list[Stack], hb: Tensor, hs: Tensor | None, j: int, cols: Int[Tensor, " n"]
) -> Tensor:
    """The logits each continuation token of batch row `j` was chosen from (columns `cols` predict it)."""
    logits = _head(stacks[0], hb[j, cols])
    if plan.mode != "ensemble":
        return logits
    src = _head(stacks[1], hs[j, cols.to(hs.device)])
    return torch.stack([plan.next_logits(logits[k], src[k], k) for k in range(len(cols))])


def score(
    base: Any,
    sources: Any = None,
    contexts: Any = None,
    continuations: Any = None,
    recipe: Any = None,
    *,
    batch_size: int = 16,
    padding_side: str = "right",
    top: int = 0,
    tokenizer: Any = None,
) -> ScoreResult:
    """Log-probability of each continuation token given its context, under `recipe` merged as
    `lmn.generate` would merge it (see the module docstring for where the merge applies).

    Arguments:
        base: the model that generates (from `lmn.load` / `lmn.wrap`), or a loaded system
            (`load_system(...)`, any kind but `backend: vllm`: then `sources` and `recipe` are the system's).
        sources: as for `lmn.generate`: a source model, a list (RegMean), `Deltas`, or None.
        contexts: per row, a string (tokenized with the tokenizer's special tokens, as `lmn.generate`
            with `chat=False` does) or token ids; at least one token each.
        continuations: per row, a string (tokenized without special tokens) or token ids; at least one
            token each. Pass ids to score exactly the tokens a generation produced.
        recipe: an `lmn.Recipe`, an `Ensemble`, None (the base alone), or a list with one recipe (or
            None) per row: rows may differ in op, layers, alphas, site and positions and share `sources`,
            so each takes a live-source op (not `delta`, not an `Ensemble`); row i scores as a call with
            `recipe[i]` alone.
        batch_size: rows per forward (rows are grouped by length; results come back in the given order).
        padding_side: "right" or "left" (the numbers do not depend on it, to float rounding).
        top: also report the `top` most likely tokens at each continuation position.
        tokenizer: overrides the base's tokenizer for string inputs.

    Everything is checked before any forward runs; a bad argument raises `LatentMergeError`.
    """
    setup = getattr(base, "scoring_setup", None)
    if callable(setup):  # a loaded system: its models and recipe
        if sources is not None or recipe is not None:
            raise LatentMergeError(
                "score(system, ...) takes the system's own sources and recipe; pass neither"
            )
        base, sources, recipe = setup()
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise LatentMergeError(f"batch_size={batch_size!r}; expected an int >= 1")
    if padding_side not in ("left", "right"):
        raise LatentMergeError(f"padding_side={padding_side!r}; expected 'left' or 'right'")
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise LatentMergeError(f"top={top!r}; expected an int >= 0")
    _check_merge_happens(sources, recipe)
    plan, models = resolve_plan(base, sources, recipe)
    _check_engine(base, models, plan)
    tokenizer = tokenizer if tokenizer is not None else getattr(base, "tokenizer", None)
    ctx = _ids(tokenizer, contexts, "contexts", special=True)
    cont = _ids(tokenizer, continuations, "continuations", special=False)
    _check_rows(base, ctx, cont)
    _check_recipe_rows(recipe, len(ctx))
    selects = _merge_rows(plan, ctx, cont)
    seqs = [c + n for c, n in zip(ctx, cont, strict=True)]
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = pad_id if isinstance(pad_id, int) else 0

    stacks = [Stack(base), *(Stack(m) for m in (models if plan.live_sources else []))]
    order = sorted(range(len(seqs)), key=lambda r: -len(seqs[r]))  # similar lengths share a batch
    n = len(seqs)
    logprobs: list[list[float]] = [[] for _ in range(n)]
    greedy: list[list[bool]] = [[] for _ in range(n)]
    tops: list[list[tuple[tuple[int, float], ...]]] = [[] for _ in range(n)]
    wd = torch.float64 if stacks[0].dtype == torch.float64 else torch.float32
    for b in range(0, n, batch_size):
        batch = _pad(order[b : b + batch_size], seqs, selects, padding_side, pad_id)
        batch_plan, select = _batch_plan(plan, batch)
        engine = PairedEngine(
            stacks[0], stacks[1:], batch_plan, len(batch.rows), batch.ids.shape[1], cuda_graphs=False
        )
        device = engine.device
        with torch.inference_mode(), engine.plain():
            hb, hs = engine.score_states(batch.ids.to(device), batch.mask.to(device), select.to(device))
            for j, r in enumerate(batch.rows):
                first = batch.starts[j] + len(ctx[r])  # column of the first continuation token
                cols = torch.arange(first - 1, first - 1 + len(cont[r]), device=device)
                logits = _row_logits(plan, stacks, hb, hs, j, cols)
                target = torch.tensor(cont[r], device=logits.device)
                logp = torch.log_softmax(logits.to(wd), dim=-1)
                logprobs[r] = logp.gather(-1, target[:, None]).squeeze(-1).tolist()
                greedy[r] = (logits.argmax(dim=-1) == target).tolist()
                if top:
                    values, indices = torch.topk(logp, min(top, logp.shape[-1]), dim=-1)
                    tops[r] = [
                        tuple(zip(i.tolist(), v.tolist(), strict=True))
                        for i, v in zip(indices, values, strict=True)
                    ]
                else:
                    tops[r] = [() for _ in cont[r]]
        engine.release()
    return ScoreResult(tokens=cont, logprobs=logprobs, greedy=greedy, top=tops, recipe=plan.recipe)
