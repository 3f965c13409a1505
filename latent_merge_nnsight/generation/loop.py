"""The generation loop's skeleton, shared by every engine: prepare -> step -> choose next -> stop.

    run = prepare_run(base, prompts, max_new_tokens=64, ...)  # checked and encoded; no forward yet
    logits, source_logits = <the engine's step>                # prefill, then one token per step
    tokens, finished = run.choose_next(logits, source_logits, rows)
    ... until run.tracker.all_done; then run.result(engine)

`choose_next` is the one place a next token is chosen: the logit ensemble's mix (`Plan.next_logits`),
the sampler (`lmn.sampling`), the tracker that decides EOS / stop / length, and the optional step hook
(`Run.on_step`: the tokens each row chose this step, as they are chosen; `lmn serve` streams them, and
ends the rows of clients that went away: "abort", vLLM's word). The fast engine
(`generation.fast`) calls it from its own decode loop, the nnsight engine (`generation.nnsight`) from a
logits processor inside HF's `generate`.
"""

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import torch
from jaxtyping import Float, Int
from torch import Tensor

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.inputs import Batch, TokenIds, check_context, encode
from latent_merge_nnsight.models import hf_module, model_info
from latent_merge_nnsight.nouns import Model, Prompts, Tokenizer
from latent_merge_nnsight.plan import Plan, RecipeLike, device_of
from latent_merge_nnsight.sampling import Sampler, SamplingConfig, Tracker
from latent_merge_nnsight.sampling_rules import check_sampling

__all__ = ["BEAM_SEARCH_UNSUPPORTED", "GenerationResult", "Run", "StepHook", "left_align", "prepare_run"]

BEAM_SEARCH_UNSUPPORTED = (
    "num_beams={n}: beam search is not supported. Lockstep merging keeps a KV cache per source model in "
    "step with the base's; beam search reorders the base's cache between steps (beams are re-ranked and "
    "copied), and the sources' caches would have to be reordered the same way. Use num_beams=1 (greedy "
    "or sampling), or sample several rows per prompt."
)


@dataclass
class GenerationResult:
    """What `lmn.generate` returns.

    Attributes:
        sequences: prompt + new tokens per row, `[batch, prompt_width + longest]`. Prompts are left-padded
            (right-padded input is re-aligned: padding moved to the left); rows that finished early are
            padded with the pad token after their last token.
        attention_mask: 1 for the real tokens of `sequences`, 0 for padding.
        prompt_width: columns of `sequences` that belong to the (padded) prompt.
        tokens: the new token ids of each row (an EOS token that ended a row is included).
        texts: the new text of each row (EOS left out; cut before the stop string that ended it, which is
            left out as the servers leave it out; `tokens` keep it).
        finish_reasons: per row, "eos", "stop" or "length" ("abort": a row the step hook ended).
        engine: which engine ran ("fast" or "nnsight").
        recipe: the recipe (or Ensemble, or None) that ran.
        info: details (cuda graphs used, KV cache bytes, source blocks per step).
    """

    sequences: Int[Tensor, "batch seq"]
    attention_mask: Int[Tensor, "batch seq"]
    prompt_width: int
    tokens: list[list[int]]
    texts: list[str]
    finish_reasons: list[str]
    engine: str
    recipe: RecipeLike = None
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        what = "base alone" if self.recipe is None else str(self.recipe)
        lines = [f"GenerationResult(engine={self.engine!r}, {what}, batch={len(self)})"]
        for i, (text, reason, toks) in enumerate(
            zip(self.texts, self.finish_reasons, self.tokens, strict=True)
        ):
            shown = text if len(text) <= 72 else text[:69] + "..."
            lines.append(f"  [{i}] {len(toks):>4} tokens, {reason:<6} {shown!r}")
        return "\n".join(lines)


@dataclass
class Run:
    """The per-call state every engine shares: the batch, the plan, the sampler and the tracker."""

    batch: Batch
    sampler: Sampler
    tracker: Tracker
    max_new_tokens: int
    pad_id: int
    recipe: RecipeLike = None
    plan: Plan | None = None
    info: dict[str, Any] = field(default_factory=dict)
    on_step: "Callable[[Run, list[int], list[int]], Iterable[int] | None] | None" = None
    """Called after each step with (this run, the rows that took a token, their tokens); returns rows to
    end now (finish reason "abort"), which the engines drop like any finished row. None: no cost."""

    def choose_next(
        self,
        logits: Float[Tensor, "rows vocab"],
        source_logits: Float[Tensor, "rows vocab"] | None,
        rows: Int[Tensor, " rows"],
    ) -> tuple[Int[Tensor, " rows"], list[int]]:
        """The loop's one choice step, the same for every engine: mix the logits (the logit ensemble),
        sample the next tokens of `rows` (indices into the original batch), record them.

        Returns the tokens and the rows that just finished (EOS, a stop string, the length limit, or the
        step hook's "abort").
        """
        if self.plan is not None:
            logits = self.plan.next_logits(logits, source_logits, self.tracker.steps)
        tokens = self.sampler(logits, rows)
        if self.on_step is None:
            return tokens, self.tracker.push(rows, tokens)
        return tokens, self._hooked_push(rows, tokens)

    def _hooked_push(self, rows: Int[Tensor, " rows"], tokens: Int[Tensor, " rows"]) -> list[int]:
        """`Tracker.push`, then the step hook on the rows that took a token; rows it names end ("abort")."""
        tracker = self.tracker
        row_list, token_list = rows.tolist(), tokens.tolist()
        took = [(r, t) for r, t in zip(row_list, token_list, strict=True) if tracker.reasons[r] is None]
        finished = tracker.push(rows, tokens)
        assert self.on_step is not None
        ended = self.on_step(self, [r for r, _ in took], [t for _, t in took]) or ()
        for row in ended:
            if tracker.reasons[row] is None:
                tracker.reasons[row] = "abort"
                finished.append(row)
        return finished

    def result(self, engine: str) -> GenerationResult:
        tracker, batch = self.tracker, self.batch
        rows, width = batch.input_ids.shape
        longest = max((len(t) for t in tracker.tokens), default=0)
        new = torch.full((rows, longest), self.pad_id, dtype=torch.long)
        new_mask = torch.zeros(rows, longest, dtype=torch.long)
        for i, toks in enumerate(tracker.tokens):
            new[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            new_mask[i, : len(toks)] = 1
        return GenerationResult(
            sequences=torch.cat([batch.input_ids.cpu(), new], dim=1),
            attention_mask=torch.cat([batch.attention_mask.cpu(), new_mask], dim=1),
            prompt_width=width,
            tokens=[list(t) for t in tracker.tokens],
            texts=[tracker.text(i) for i in range(rows)],
            finish_reasons=[r or "length" for r in tracker.reasons],
            engine=engine,
            recipe=self.recipe,
            info=dict(self.info),
        )


# ----------------------------------------------------------------------------------------------------
# checks and preparation (no forward runs here)


StepHook: TypeAlias = Callable[[Run, list[int], list[int]], Iterable[int] | None]
"""`Run.on_step`: called with the run, the rows that chose a token this step and those tokens; returns
rows to end now (or None)."""


def left_align(batch: Batch) -> Batch:
    """Move every row's padding to the left (real tokens keep their order), so each row's last real token
    is its last column. Both engines run on this layout."""
    order = torch.sort(batch.attention_mask, dim=-1, stable=True).indices  # pads (0) first, then real
    return Batch(batch.input_ids.gather(1, order), batch.attention_mask.gather(1, order))


def _eos_ids(
    model: Model, tokenizer: Tokenizer, eos_token_id: int | Sequence[int] | None, ignore_eos: bool
) -> list[int]:
    if ignore_eos:
        return []
    if eos_token_id is not None:
        ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise LatentMergeError(
                f"eos_token_id={eos_token_id!r}; expected a token id or a list of token ids"
            )
        return ids
    found: list[int] = []
    config_eos = getattr(getattr(hf_module(model), "generation_config", None), "eos_token_id", None)
    for value in (config_eos, getattr(tokenizer, "eos_token_id", None)):
        for i in [value] if isinstance(value, int) else list(value or []):
            if i not in found:
                found.append(int(i))
    return found


def _pad_id(model: Model, tokenizer: Tokenizer, eos: list[int]) -> int:
    for value in (
        getattr(tokenizer, "pad_token_id", None),
        getattr(getattr(hf_module(model), "generation_config", None), "pad_token_id", None),
    ):
        if isinstance(value, int):
            return value
    return eos[0] if eos else 0


def _check_stop(stop: str | Sequence[str] | None, tokenizer: Tokenizer) -> list[str]:
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, Sequence) or not all(isinstance(s, str) and s for s in items):
        raise LatentMergeError(
            f"stop={stop!r}; expected a non-empty string or a list of non-empty strings",
            param="stop",
            value=stop,
        )
    if items and tokenizer is None:
        raise LatentMergeError("stop strings need a tokenizer to decode the new text; the model has none")
    return list(items)


def _chat_default(chat: bool | None, tokenizer: Tokenizer) -> bool:
    """`chat=None` means: apply the chat template when the tokenizer has one."""
    if chat not in (None, True, False):
        raise LatentMergeError(
            f"chat={chat!r}; expected None (when the tokenizer has a template), True, False"
        )
    return getattr(tokenizer, "chat_template", None) is not None if chat is None else chat


def prepare_run(
    base: Model,
    prompts: Prompts | None = None,
    *,
    max_new_tokens: int,
    input_ids: TokenIds | None = None,
    attention_mask: TokenIds | None = None,
    padding_side: str | None = None,
    stop: str | Sequence[str] | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    ignore_eos: bool = False,
    num_beams: int = 1,
    tokenizer: Tokenizer | None = None,
    chat: bool | None = None,
    **sampling: object,
) -> Run:
    """Check the generation arguments and encode the prompts (left-aligned, on the base's device).

    `sampling` holds `SamplingConfig`'s fields (`do_sample`, `temperature`, `top_p`, `top_k`, `seed`,
    `sampler`).
    """
    check_sampling("max_new_tokens", max_new_tokens)
    if num_beams != 1:
        raise LatentMergeError(BEAM_SEARCH_UNSUPPORTED.format(n=num_beams))
    config = SamplingConfig(**sampling)
    tokenizer = tokenizer if tokenizer is not None else getattr(base, "tokenizer", None)
    stops = _check_stop(stop, tokenizer)
    batch = encode(
        tokenizer,
        prompts,
        input_ids=input_ids,
        attention_mask=attention_mask,
        padding_side=padding_side,
        chat=_chat_default(chat, tokenizer),
    )
    vocab = hf_module(base).config.vocab_size
    if int(batch.input_ids.max()) >= vocab or int(batch.input_ids.min()) < 0:
        raise LatentMergeError(
            f"input_ids hold ids in [{int(batch.input_ids.min())}, {int(batch.input_ids.max())}]; "
            f"expected 0 <= id < vocab_size={vocab}"
        )
    context = getattr(hf_module(base).config, "max_position_embeddings", None)
    check_context(batch, max_new_tokens, context, model_info(base).name)
    device = device_of(base)
    batch = left_align(batch).to(device)
    eos = _eos_ids(base, tokenizer, eos_token_id, ignore_eos)
    rows = batch.input_ids.shape[0]
    return Run(
        batch=batch,
        sampler=Sampler(config, rows, device),
        tracker=Tracker(rows, max_new_tokens, eos, stops, tokenizer),
        max_new_tokens=max_new_tokens,
        pad_id=_pad_id(base, tokenizer, eos),
    )
