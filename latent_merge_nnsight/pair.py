"""`lmn.pair(base, ft)`: a base model traced with nnsight and source models stepped in lockstep with it.

    pair = lmn.pair(base, ft)
    with pair.generate(prompts, max_new_tokens=64) as tracer:
        states = list().save()
        for step in tracer.iter[:]:
            lmn.merge_into(layer=20, source=pair.ft, op="slerp", alpha=0.5)
            states.append(base.model.layers[24].output[:, -1].clone())  # your own reads and edits
    print(tracer.generation.texts)

The loop over `tracer.iter[:]` ends when generation ends, and nnsight then skips whatever follows it in
the block (with a warning); read results after the block (`tracer.generation`, saved values).

`pair.ft` is a `LiveSource`: inside the trace, `pair.ft.resid(layer, site)` waits until the base reaches
that site in the current forward, runs the source model on exactly the tokens the base is processing
now (plain torch, block by block, with its own KV cache), and returns its residual there. The source
stops after the highest block anyone asked for, so its upper layers are never computed (and need not
be loaded: `lmn.load(ft_id, up_to_layer=20)`).

Token choice and stopping come from the package's own sampler (`lmn.sampling`), so a seed gives the same
tokens here as with `lmn.generate(..., engine="fast")`. Beam search is not offered: it reorders the
base's cache between steps, and nothing reorders the source's in step with it.
"""

import functools
import warnings
from typing import Any

import torch
from jaxtyping import Float
from nnsight.intervention.tracer import InterleavingTracer
from torch import Tensor
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from latent_merge_nnsight.baselines.ensemble import mix_logits
from latent_merge_nnsight.engine.plan import Plan
from latent_merge_nnsight.engine.stack import Stack, attention_bias, mask_positions
from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.inputs import Batch
from latent_merge_nnsight.merge import merge_into
from latent_merge_nnsight.models import check_compatible, hf_module, last_inputs, model_info
from latent_merge_nnsight.positions import position_mask
from latent_merge_nnsight.sampling import Sampler, Tracker
from latent_merge_nnsight.sites import Site, check_layer, check_site, get_layers, read_resid

__all__ = ["LiveSource", "Pair", "PairTracer", "pair"]


class LiveSource:
    """A source model's residual stream at the step a traced base model is running (a `ResidSource`).

    Arguments:
        base: the traced base model (nnsight).
        model: the source model (a shallow one from `up_to_layer` works).
        up_to_layer: run the source through block `up_to_layer` every step, so any site up to that layer
            can be asked for at any step. Without it the source runs as deep as the deepest request at the
            prompt step; asking deeper at a later step is an error (its deeper caches would lack the
            earlier tokens).
    """

    def __init__(self, base: Any, model: Any, *, up_to_layer: int | None = None):
        self.base = base
        self.model = model
        self.info = model_info(model)
        self.stack = Stack(model)
        if up_to_layer is not None:
            check_layer(up_to_layer, self.info.n_layers, what="up_to_layer", model_name=self.info.name)
        self.min_blocks = 0 if up_to_layer is None else up_to_layer + 1
        self.budget = 64
        self.reset()

    def reset(self) -> None:
        """Forget the current generation (frees the KV cache)."""
        self.cache = None
        self._ids: Tensor | None = None
        self._h: Tensor | None = None
        self._states: dict[int, Tensor] = {}
        self._ran = 0
        self.depth = self.min_blocks

    def __repr__(self) -> str:
        return f"LiveSource({self.info.name}, blocks run per step={self.depth} of {self.info.n_layers})"

    # ------------------------------------------------------------------------------------------------

    def resid(self, layer: int, site: Site) -> Float[Tensor, "batch pos d_model"]:
        """The source's residual at (layer, site) for the tokens the base is processing now."""
        check_site(site)
        check_layer(layer, self.info.n_layers, model_name=self.info.name)
        if not getattr(self.base.interleaver, "interleaving", False):
            raise LatentMergeError(
                "a live source's state exists only inside a trace of its base: use it in "
                "`with pair.generate(...)` (or a trace of the pair's base model)"
            )
        # reading the base at this site parks the trace body until the model gets there, so the tokens
        # recorded below are those of the forward now running (the body runs ahead otherwise)
        read_resid(get_layers(self.base)[layer], site)
        self._sync()
        return self._state(layer + (1 if site == "post" else 0), layer)

    def logits(self) -> Float[Tensor, "batch vocab"]:
        """The source's next-token logits for the base's latest forward (the whole model runs)."""
        self._sync()
        h = self._state(self.info.n_layers, self.info.n_layers - 1)
        return self.stack.logits(h[:, -1])

    # ------------------------------------------------------------------------------------------------

    def _sync(self) -> None:
        """Start a source forward on the base's latest tokens, if it has not started yet."""
        recorded = last_inputs(self.base)
        ids, mask = recorded if recorded is not None else (None, None)
        if ids is None:
            raise LatentMergeError(
                "the base's latest forward recorded no input_ids; wrap the base with lmn.wrap"
            )
        if ids is self._ids:
            return
        self._complete()
        new = ids.shape[1]
        if mask is None:  # HF generate drops an all-ones mask: no padding, so the mask is all ones
            prompt = self.cache is None or new > 1  # decoding steps feed one token
            past = 0 if prompt else self.cache.end
            mask = torch.ones(ids.shape[0], past + new, dtype=torch.long, device=ids.device)
        width = mask.shape[1]
        if width == new:  # a prompt: a new generation starts
            self.reset()
            self.cache = self.stack.new_cache(width + self.budget)
        elif self.cache is None or self.cache.end != width - new:
            have = 0 if self.cache is None else self.cache.end
            raise LatentMergeError(
                f"the source is out of step with the base: it holds {have} tokens, the base {width - new}; "
                "a live source follows one generation from its prompt on"
            )
        dev = self.stack.device
        ids, mask = ids.to(dev), mask.to(dev)
        self.cache.begin(new)
        self._ids = recorded[0]
        self._pos = mask_positions(mask)[:, -new:]
        self._bias = attention_bias(mask, width - new, new, self.stack.dtype)
        self._h, self._ctx = self.stack.embed(ids, self._pos)
        self._ran = 0
        self._states = {0: self._h}

    def _run_to(self, blocks: int) -> None:
        while self._ran < blocks:
            self._h = self.stack.block(self._ran, self._h, self._bias, self._pos, self._ctx, self.cache)
            self._ran += 1

    def _state(self, blocks: int, layer: int) -> Tensor:
        """The residual after `blocks` blocks (asked for as a site of `layer`)."""
        if blocks in self._states:
            return self._states[blocks]
        if blocks < self._ran:
            raise LatentMergeError(
                f"asked for the source state after {blocks} blocks after it ran {self._ran}; "
                "ask in layer order"
            )
        if blocks > self.depth and self.cache.start > 0:
            raise LatentMergeError(
                f"asked for the source state after {blocks} blocks, but earlier steps ran only "
                f"{self.depth}, so "
                f"its deeper KV caches lack those tokens; pass up_to_layer={layer} to lmn.pair"
            )
        self._run_to(blocks)
        self.depth = max(self.depth, blocks)
        self._states[blocks] = self._h
        return self._h

    def _complete(self) -> None:
        """Finish the previous step up to the depth every step runs (keeps all caches in step)."""
        if self._h is not None and self._ran < self.depth:
            self._run_to(self.depth)


class _Step(LogitsProcessor):
    """Chooses the next tokens with the package's sampler; HF's argmax then picks exactly them."""

    def __init__(
        self, sampler: Sampler, tracker: Tracker, plan: Plan | None, live: list[LiveSource], pad_id: int
    ):
        self.sampler, self.tracker, self.plan, self.live, self.pad_id = sampler, tracker, plan, live, pad_id

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.tracker.all_done:  # a step HF runs after the end (deferred stop check): keep padding
            tokens = torch.full((scores.shape[0],), self.pad_id, device=scores.device)
        else:
            if self.plan is not None and self.plan.mode == "ensemble":
                b = self.plan.ensemble.weight(self.tracker.steps)
                scores = mix_logits(scores, self.live[0].logits(), b)
            rows = torch.arange(scores.shape[0])
            tokens = self.sampler(scores, rows)
            self.tracker.push(rows, tokens)
            done = torch.tensor(self.tracker.done, device=tokens.device)
            tokens = torch.where(done, torch.full_like(tokens, self.pad_id), tokens)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, tokens[:, None].to(scores.device), 0.0)
        return out


class _Stop(StoppingCriteria):
    def __init__(self, tracker: Tracker):
        self.tracker = tracker

    def __call__(self, input_ids: Tensor, scores: Any, **kwargs: Any) -> Tensor:
        return torch.tensor(self.tracker.done, device=input_ids.device)


def _neutral_config(hf: Any, pad_id: int) -> GenerationConfig:
    """A generation config with no logits processors of its own (the model's may carry a repetition
    penalty or sampling defaults that would change the base's logits before our sampler sees them)."""
    old = hf.generation_config
    return GenerationConfig(
        bos_token_id=getattr(old, "bos_token_id", None),
        pad_token_id=pad_id,
        eos_token_id=None,
        do_sample=False,
        num_beams=1,
    )


def _run_generate(base: Any, pad_id: int, *args: Any, **kwargs: Any) -> Any:
    """nnsight's own `generate` under a neutral generation config (restored afterwards)."""
    hf = hf_module(base)
    saved = hf.generation_config
    hf.generation_config = _neutral_config(hf, pad_id)
    try:
        return type(base).generate.__wrapped__(base, *args, **kwargs)
    finally:
        hf.generation_config = saved


class PairTracer(InterleavingTracer):
    """The tracer `Pair.generate` returns; after the block, `.generation` holds the `GenerationResult`."""

    generation: Any = None
    _lmn_finish: Any = None

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> bool:
        ok = False
        try:
            with torch.no_grad():
                suppress = super().__exit__(exc_type, exc_value, traceback)
            ok = True  # the body and the generation ran to the end
            return suppress
        finally:
            if self._lmn_finish is not None:
                self.generation = self._lmn_finish(ok=ok)


class Pair:
    """A base model and its source models, for traces where the sources follow the base step by step.

    Attributes:
        base: the base model (nnsight).
        sources: one `LiveSource` per source model.
        ft: the first (usually only) live source; `sources` for RegMean.
    """

    def __init__(self, base: Any, sources: Any, *, up_to_layer: int | None = None):
        if not hasattr(base, "interleaver"):
            raise LatentMergeError(
                f"base has type {type(base).__name__}; lmn.pair needs an nnsight model from lmn.load "
                "or lmn.wrap"
            )
        models = list(sources) if isinstance(sources, (list, tuple)) else [sources]
        if not models:
            raise LatentMergeError("sources=[] is empty; give at least one source model")
        for m in models:
            check_compatible(base, m)
        self.base = base
        self.sources = [LiveSource(base, m, up_to_layer=up_to_layer) for m in models]

    @property
    def ft(self) -> LiveSource:
        return self.sources[0]

    def reset(self) -> None:
        for s in self.sources:
            s.reset()

    def __repr__(self) -> str:
        return f"Pair(base={model_info(self.base).name}, sources={self.sources})"

    def generate(self, prompts: Any = None, *, max_new_tokens: int, **options: Any) -> PairTracer:
        """Open a generation trace of the base with the sources in lockstep (use in a `with` block).

        Takes the prompt and sampling/stopping arguments of `lmn.generate` (`input_ids`, `attention_mask`,
        `padding_side`, `do_sample`, `temperature`, `top_p`, `top_k`, `seed`, `stop`, `eos_token_id`,
        `ignore_eos`). Loop `for step in tracer.iter[:]` in the block to act at every step; the result is
        `tracer.generation` after the block.
        """
        from latent_merge_nnsight.generate import prepare_run

        run = prepare_run(self.base, prompts, max_new_tokens=max_new_tokens, **options)
        return open_trace(self.base, self.sources, run, plan=None)


def pair(base: Any, sources: Any, *, up_to_layer: int | None = None) -> Pair:
    """Pair a base model with one source model (or a list, for RegMean) for lockstep generation traces.

    Inside `with pair.generate(...)`, `pair.ft` (or `pair.sources`) is the sources' live state, to pass
    as `source=` to `lmn.merge_into`. Sources loaded with `lmn.load(..., up_to_layer=L)` save memory.
    """
    return Pair(base, sources, up_to_layer=up_to_layer)


def _generate_kwargs(base: Any, live: list[LiveSource], run: Any, plan: Plan | None) -> dict[str, Any]:
    """What a trace of `base.generate` needs to use the package's sampler and stopping."""
    batch: Batch = run.batch
    for s in live:
        s.reset()
        s.budget = run.max_new_tokens + 2
    step = _Step(run.sampler, run.tracker, plan, live, run.pad_id)
    return dict(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        fn=functools.partial(_run_generate, base, run.pad_id),
        max_new_tokens=run.max_new_tokens,
        logits_processor=LogitsProcessorList([step]),
        stopping_criteria=StoppingCriteriaList([_Stop(run.tracker)]),
        pad_token_id=run.pad_id,
    )


def open_trace(base: Any, live: list[LiveSource], run: Any, plan: Plan | None) -> PairTracer:
    """A `PairTracer` over `base.generate` with the package's sampler and stopping (not yet entered)."""
    tracer = base.trace(tracer_cls=PairTracer, **_generate_kwargs(base, live, run, plan))

    def finish(ok: bool) -> Any:
        for s in live:
            s.reset()
        return run.result("nnsight") if ok else None

    tracer._lmn_finish = finish
    return tracer


def run_nnsight(base: Any, sources: list[Any], plan: Plan, run: Any) -> Any:
    """Run `plan` through nnsight's `base.generate`: one trace with a merge at every step (the
    `engine="nnsight"` path); without merges (base alone, ensemble) the same call runs untraced."""
    live = [LiveSource(base, m) for m in sources]
    merges = plan.merges if plan.mode == "merge" else []
    if not merges:
        try:
            with torch.no_grad():
                base.trace(trace=False, **_generate_kwargs(base, live, run, plan))
        finally:
            for s in live:
                s.reset()
        return run.result("nnsight")
    if plan.deltas is not None:
        source: Any = _StaticSource(plan.deltas)
    else:
        source = live if plan.op.multi_source else live[0]
    op, site, positions, params = plan.op, plan.site, plan.positions, plan.params
    extrapolate = plan.allow_extrapolation
    # explicit prompt positions select nothing while decoding: merge at the prompt step only (the mask
    # that would tell merge_into so is dropped by HF generate when the batch has no padding)
    every_step = bool(position_mask(torch.ones(1, 1, dtype=torch.long), positions, decoding=True).all())
    tracer = open_trace(base, live, run, plan)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*was never reached.*")
        with tracer:
            for _step in tracer.iter[:] if every_step else tracer.iter[:1]:
                for layer, alpha in merges:
                    merge_into(
                        layer,
                        source,
                        op,
                        alpha,
                        positions=positions,
                        site=site,
                        model=base,
                        allow_extrapolation=extrapolate,
                        **params,
                    )
    return tracer.generation


class _StaticSource:
    """Steering vectors (already on the base's device) as a `ResidSource`."""

    def __init__(self, vectors: dict[int, Tensor]):
        self.vectors = vectors

    def resid(self, layer: int, site: Site) -> Tensor:
        return self.vectors[layer]
