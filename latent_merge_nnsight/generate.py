"""`lmn.generate`: lockstep merged generation, and the baselines, from one entry point.

    out = lmn.generate(base, ft, prompts, lmn.Recipe(op="slerp", layers={20: 0.5}), max_new_tokens=256)
    out.texts, out.finish_reasons, out.sequences

Every source model sees exactly the tokens the merged base produced, keeps its own KV cache, and stops
after the highest merged layer. Each step, in the paper's terms (site "pre", positions "last"):

    1. the source runs its blocks 0..L-1 on the step's tokens, giving h_src = its residual entering L;
    2. the base runs blocks 0..L-1, and its residual entering L becomes op(h_base, h_src, alpha) at
       the merged positions (the last real prompt token at prefill, every new token after that);
    3. the base runs its remaining blocks and head; the next token is chosen from its logits.

Two engines run the same plan and give the same greedy tokens:
- `engine="fast"` (the default through "auto"): a paired engine that calls the HF modules directly
  with static KV caches, drops finished rows, and on CUDA replays the decode step as a CUDA graph;
- `engine="nnsight"`: one nnsight `base.generate` trace with a `merge_into` per step (see `lmn.pair`
  to add your own interventions to such a trace); HF's decode loop keeps finished rows in the batch.

Baselines use the same call: `recipe=None` (base alone), the source as `base` (source alone),
`Ensemble(b=...)` (logit ensemble), `Recipe(op="delta", ...)` with `Deltas` (steering).

Memory: a source is needed only up to the highest merged layer, so load it with
`lmn.load(ft_id, up_to_layer=L)` (or `lmn.models.truncate(ft, L)`); its upper layers never exist.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from latent_merge_nnsight.baselines.ensemble import mix_logits
from latent_merge_nnsight.engine.fast import PairedEngine
from latent_merge_nnsight.engine.plan import Plan, device_of, resolve_plan
from latent_merge_nnsight.engine.stack import Stack, fast_support
from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.inputs import Batch, check_context, encode
from latent_merge_nnsight.models import hf_module, model_info
from latent_merge_nnsight.sampling import Sampler, SamplingConfig, Tracker

__all__ = ["ENGINES", "GenerationResult", "generate", "release_engine"]

ENGINES = ("auto", "fast", "nnsight")

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
        texts: the new text of each row (EOS left out; cut just after the stop string that ended it).
        finish_reasons: per row, "eos", "stop" or "length".
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
    recipe: Any = None
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
    """The per-call state both engines share: the batch, the sampler and the tracker."""

    batch: Batch
    sampler: Sampler
    tracker: Tracker
    max_new_tokens: int
    pad_id: int
    recipe: Any = None
    info: dict[str, Any] = field(default_factory=dict)

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


def left_align(batch: Batch) -> Batch:
    """Move every row's padding to the left (real tokens keep their order), so each row's last real token
    is its last column. Both engines run on this layout."""
    order = torch.sort(batch.attention_mask, dim=-1, stable=True).indices  # pads (0) first, then real
    return Batch(batch.input_ids.gather(1, order), batch.attention_mask.gather(1, order))


def _eos_ids(model: Any, tokenizer: Any, eos_token_id: Any, ignore_eos: bool) -> list[int]:
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


def _pad_id(model: Any, tokenizer: Any, eos: list[int]) -> int:
    for value in (
        getattr(tokenizer, "pad_token_id", None),
        getattr(getattr(hf_module(model), "generation_config", None), "pad_token_id", None),
    ):
        if isinstance(value, int):
            return value
    return eos[0] if eos else 0


def _check_stop(stop: Any, tokenizer: Any) -> list[str]:
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, Sequence) or not all(isinstance(s, str) and s for s in items):
        raise LatentMergeError(f"stop={stop!r}; expected a non-empty string or a list of non-empty strings")
    if items and tokenizer is None:
        raise LatentMergeError("stop strings need a tokenizer to decode the new text; the model has none")
    return list(items)


def prepare_run(
    base: Any,
    prompts: Any = None,
    *,
    max_new_tokens: Any,
    input_ids: Any = None,
    attention_mask: Any = None,
    padding_side: str | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop: Any = None,
    eos_token_id: Any = None,
    ignore_eos: bool = False,
    num_beams: int = 1,
    tokenizer: Any = None,
    chat: bool | None = None,
    sampler: str = "default",
) -> Run:
    """Check the generation arguments and encode the prompts (left-aligned, on the base's device)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise LatentMergeError(f"max_new_tokens={max_new_tokens!r}; expected an int >= 1")
    if num_beams != 1:
        raise LatentMergeError(BEAM_SEARCH_UNSUPPORTED.format(n=num_beams))
    config = SamplingConfig(do_sample, temperature, top_p, top_k, seed, sampler)
    tokenizer = tokenizer if tokenizer is not None else getattr(base, "tokenizer", None)
    stops = _check_stop(stop, tokenizer)
    if chat not in (None, True, False):
        raise LatentMergeError(
            f"chat={chat!r}; expected None (when the tokenizer has a template), True, False"
        )
    if chat is None:
        chat = getattr(tokenizer, "chat_template", None) is not None
    batch = encode(
        tokenizer,
        prompts,
        input_ids=input_ids,
        attention_mask=attention_mask,
        padding_side=padding_side,
        chat=chat,
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


# ----------------------------------------------------------------------------------------------------
# the fast engine's decode loop


_KEPT = "_lmn_kept_engine"
"""Attribute of the base's HF module holding the engine kept by `generate(..., keep_engine=True)`."""


def release_engine(base: Any) -> bool:
    """Free the engine kept on `base` by `generate(..., keep_engine=True)` (its caches, graphs and its
    hold on the sources). Returns whether there was one."""
    kept = hf_module(base).__dict__.pop(_KEPT, None)
    if kept is not None:
        kept.release()
    return kept is not None


def _engine_for(base: Any, sources: list[Any], plan: Plan, run: Run, options: dict[str, Any]) -> PairedEngine:
    """A fresh engine, or the one kept by the previous call made ready for this run.

    A kept engine serves any batch up to its own size. When only its size or capacity is too small, the
    new engine takes the larger of both, so calls that alternate sizes (a sweep's last, partial batch;
    a benchmark's batch 1 and 16) settle on one engine and capture each batch size once.
    """
    rows, width = run.batch.input_ids.shape
    capacity = width + run.max_new_tokens
    module = hf_module(base)
    kept: PairedEngine | None = module.__dict__.pop(_KEPT, None)
    stacks = Stack(base), [Stack(s) for s in sources]
    compile_step = options["compile_step"]
    if options["keep_engine"] and kept is not None:
        if kept.reuse(*stacks, plan, rows, capacity, compile_step):
            run.info["engine_reused"] = True
            return kept
        if kept.same_layout(*stacks, plan, compile_step):
            rows, capacity = max(rows, kept.max_rows), max(capacity, kept.capacity)
    if kept is not None:
        kept.release()
    run.info["engine_reused"] = False
    return PairedEngine(*stacks, plan, rows, capacity, options["cuda_graphs"], compile_step=compile_step)


def _run_fast(
    base: Any, sources: list[Any], plan: Plan, run: Run, options: dict[str, Any]
) -> GenerationResult:
    ids, mask = run.batch.input_ids, run.batch.attention_mask
    n_rows = ids.shape[0]
    engine = _engine_for(base, sources, plan, run, options)
    tracker, sampler = run.tracker, run.sampler
    with torch.inference_mode(), engine.plain():
        base_logits, src_logits = engine.prefill(ids, mask)  # 1. both models over the prompts
        rows = torch.arange(n_rows)  # which original rows the engine's batch rows are
        while True:
            logits = base_logits
            if plan.mode == "ensemble":
                logits = mix_logits(base_logits, src_logits, plan.ensemble.weight(tracker.steps))
            tokens = sampler(logits, rows)  # 2. choose the next tokens
            finished = tracker.push(rows, tokens)  # 3. record them; EOS / stop / length
            if tracker.all_done:
                break
            if finished:  # 4. drop finished rows from the batch (and their caches)
                keep = torch.tensor([i for i, r in enumerate(rows.tolist()) if tracker.reasons[r] is None])
                if engine.keep(keep):
                    rows, tokens = rows[keep], tokens[keep.to(tokens.device)]
            base_logits, src_logits = engine.decode(tokens)  # 5. one lockstep step on the new tokens
    run.info.update(
        cuda_graphs=bool(engine.graphs) and engine.use_graphs,
        compiled_step=engine.compiled and engine.static,
        cuda_graph_error=engine.graphs.error,
        kv_cache_bytes=engine.cache_bytes(),
        source_blocks_per_step=engine.src_blocks,
    )
    if options["keep_engine"] and engine.static:
        hf_module(base).__dict__[_KEPT] = engine
    else:
        engine.release()
    return run.result("fast")


# ----------------------------------------------------------------------------------------------------


def _pick_engine(engine: str, base: Any, sources: list[Any], plan: Plan) -> str:
    if engine not in ENGINES:
        raise LatentMergeError(f"engine={engine!r}; expected one of: {', '.join(ENGINES)}")
    info = model_info(base)
    if info.truncated:
        raise LatentMergeError(
            f"base {info.name} holds only {info.n_layers} of its {info.full_n_layers} layers "
            "(loaded up_to_layer); "
            "generate with the whole model"
        )
    models = [base, *(sources if plan.live_sources else [])]
    reasons = [r for r in (fast_support(m) for m in models) if r is not None]
    if engine == "fast" and reasons:
        raise LatentMergeError(f"engine='fast' cannot run this pair: {reasons[0]}; use engine='nnsight'")
    if engine == "auto":
        engine = "fast" if not reasons else "nnsight"
    if engine == "nnsight":
        if not hasattr(base, "interleaver"):
            raise LatentMergeError(
                f"engine='nnsight' needs an nnsight model; base is a {type(base).__name__} "
                "(wrap it with lmn.wrap)"
            )
        live_reasons = [r for r in (fast_support(m) for m in models[1:]) if r is not None]
        if live_reasons:
            raise LatentMergeError(f"cannot step this source model in lockstep: {live_reasons[0]}")
    return engine


def _check_merge_happens(sources: Any, recipe: Any) -> None:
    """A latent-merge recipe with no source would silently generate the base's own text: refuse it."""
    from latent_merge_nnsight.ops import get_op
    from latent_merge_nnsight.recipe import Recipe

    if not isinstance(recipe, Recipe) or get_op(recipe.op).static_source:
        return
    if sources is None or (isinstance(sources, (list, tuple)) and not sources):
        raise LatentMergeError(
            f"recipe merges with op {recipe.op!r} at layers {recipe.layers}, but sources={sources!r}: "
            "nothing would be merged; pass the source model(s), or recipe=None for the base alone"
        )


def generate(
    base: Any,
    sources: Any = None,
    prompts: Any = None,
    recipe: Any = None,
    *,
    max_new_tokens: int,
    input_ids: Any = None,
    attention_mask: Any = None,
    padding_side: str | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    ignore_eos: bool = False,
    num_beams: int = 1,
    engine: str = "auto",
    cuda_graphs: bool | None = None,
    keep_engine: bool = False,
    compile_step: bool = False,
    tokenizer: Any = None,
    chat: bool | None = None,
    sampler: str = "default",
) -> GenerationResult:
    """Generate from `base` with `sources` merged in lockstep according to `recipe`.

    Arguments:
        base: the model that generates (from `lmn.load` / `lmn.wrap`).
        sources: a source model, a list of them (RegMean), `Deltas` (op "delta"), or None (base alone).
            Sources loaded with `lmn.load(..., up_to_layer=L)` hold only the blocks a merge at L needs.
        prompts: a string, list of strings, chat(s) (the chat template is applied), or token ids. A plain
            string is sent as one user message through the tokenizer's chat template when the tokenizer
            has one (see `chat`).
        recipe: an `lmn.Recipe` (latent merge or delta steering), an `Ensemble` (logit ensemble), or None.
        max_new_tokens: new tokens per row at most (>= 1).
        input_ids, attention_mask: token ids (and mask; left or right padding) instead of prompts.
        padding_side: how to pad text prompts of different lengths ("left" or "right").
        do_sample, temperature, top_p, top_k, seed: sampling (greedy when do_sample=False); the same seed
            gives the same tokens on both engines.
        stop: strings that end a row when they appear in its new text.
        eos_token_id: tokens that end a row (default: the model's and tokenizer's EOS); ignore_eos=True
            generates exactly max_new_tokens.
        num_beams: must be 1 (beam search would need the sources' caches reordered with the base's).
        engine: "auto" (the fast engine when it supports the models, else nnsight), "fast", "nnsight".
        cuda_graphs: on CUDA, capture decode steps as CUDA graphs (default: yes): the fast engine's whole
            paired step; the nnsight engine's source steps (the base runs under nnsight's trace).
        keep_engine: fast engine on CUDA: keep its KV caches and captured graphs on the base after this
            call, so the next call with the same models and recipe layout (alphas and deltas may change)
            and a batch no larger skips the capture (a batch size not seen before costs one). The kept
            engine holds the sources and the caches in memory until a call with `keep_engine=False` (or
            with another layout) replaces it, or until `release_engine(base)` (from
            `latent_merge_nnsight.generate`).
        compile_step: fast engine: run the decode step through `torch.compile` (then, on CUDA, capture
            it as a graph). Fuses the many small kernels of a step, so a step runs closer to the time of
            reading the weights; costs a compilation (about a minute for a 7B pair) per batch size, so it
            pays off with `keep_engine=True` over many calls.
        tokenizer: overrides the base's tokenizer.
        chat: for string prompts: None (default) applies the chat template when the tokenizer has one,
            True always (an error without a template), False sends the raw text (e.g. a prompt already
            templated, or plain continuation).
        sampler: the top-p rule, "default" (keeps the token that crosses top_p) or "paper" (the paper's
            code: drops it); see `latent_merge_nnsight.sampling`.

    Everything is checked before any forward runs; a bad argument raises `LatentMergeError`.
    """
    _check_merge_happens(sources, recipe)
    run = prepare_run(
        base,
        prompts,
        max_new_tokens=max_new_tokens,
        input_ids=input_ids,
        attention_mask=attention_mask,
        padding_side=padding_side,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=stop,
        eos_token_id=eos_token_id,
        ignore_eos=ignore_eos,
        num_beams=num_beams,
        tokenizer=tokenizer,
        chat=chat,
        sampler=sampler,
    )
    plan, models = resolve_plan(base, sources, recipe)
    chosen = _pick_engine(engine, base, models, plan)
    run.recipe = plan.recipe
    if plan.live_sources:
        run.info["source_blocks_per_step"] = [plan.source_blocks(model_info(m).n_layers) for m in models]
    if chosen == "fast":
        options = dict(cuda_graphs=cuda_graphs, keep_engine=keep_engine, compile_step=compile_step)
        return _run_fast(base, models, plan, run, options)
    from latent_merge_nnsight.pair import run_nnsight

    return run_nnsight(base, models, plan, run, cuda_graphs=cuda_graphs)
