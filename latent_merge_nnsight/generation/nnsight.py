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
be loaded: `lmn.load(ft_id, up_to_layer=20)`). On CUDA each decode step of a source (its embedding and
all the blocks it runs) replays one captured CUDA graph, so the source costs no per-block Python work.

Token choice and stopping come from the package's own sampler (`lmn.sampling`), so a seed gives the same
tokens here as with `lmn.generate(..., engine="fast")`. Beam search is not offered: it reorders the
base's cache between steps, and nothing reorders the source's in step with it.
"""

import functools
import warnings
from typing import Any

import torch
from nnsight.intervention.tracer import InterleavingTracer
from torch import Tensor
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from latent_merge_nnsight.ensemble import mix_logits
from latent_merge_nnsight.plan import Plan
from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.inputs import Batch
from latent_merge_nnsight.generation.stepper import LiveSource
from latent_merge_nnsight.merge import merge_into
from latent_merge_nnsight.models import check_compatible, hf_module, model_info
from latent_merge_nnsight.positions import position_mask
from latent_merge_nnsight.sampling import Sampler, Tracker
from latent_merge_nnsight.sites import Site

__all__ = ["LiveSource", "Pair", "PairTracer", "pair"]


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

    def __init__(
        self, base: Any, sources: Any, *, up_to_layer: int | None = None, cuda_graphs: bool | None = None
    ):
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
        self.sources = [LiveSource(base, m, up_to_layer=up_to_layer, cuda_graphs=cuda_graphs) for m in models]

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
        from latent_merge_nnsight.generation.run import prepare_run

        run = prepare_run(self.base, prompts, max_new_tokens=max_new_tokens, **options)
        return open_trace(self.base, self.sources, run, plan=None)


def pair(base: Any, sources: Any, *, up_to_layer: int | None = None, cuda_graphs: bool | None = None) -> Pair:
    """Pair a base model with one source model (or a list, for RegMean) for lockstep generation traces.

    Inside `with pair.generate(...)`, `pair.ft` (or `pair.sources`) is the sources' live state, to pass
    as `source=` to `lmn.merge_into`. Sources loaded with `lmn.load(..., up_to_layer=L)` save memory.
    On CUDA each source's decode step runs as a captured CUDA graph unless `cuda_graphs=False`.
    """
    return Pair(base, sources, up_to_layer=up_to_layer, cuda_graphs=cuda_graphs)


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


def _finish_sources(run: Any, live: list[LiveSource]) -> None:
    """Record whether the sources' steps ran as CUDA graphs, then free their caches and graphs."""
    if live:
        run.info["cuda_graphs"] = all(s.graphs.use_graphs for s in live)
        run.info["cuda_graph_error"] = next((s.graphs.error for s in live if s.graphs.error), None)
    for s in live:
        s.reset()


def open_trace(base: Any, live: list[LiveSource], run: Any, plan: Plan | None) -> PairTracer:
    """A `PairTracer` over `base.generate` with the package's sampler and stopping (not yet entered)."""
    tracer = base.trace(tracer_cls=PairTracer, **_generate_kwargs(base, live, run, plan))

    def finish(ok: bool) -> Any:
        _finish_sources(run, live)
        return run.result("nnsight") if ok else None

    tracer._lmn_finish = finish
    return tracer


def run_nnsight(
    base: Any, sources: list[Any], plan: Plan, run: Any, *, cuda_graphs: bool | None = None
) -> Any:
    """Run `plan` through nnsight's `base.generate`: one trace with a merge at every step (the
    `engine="nnsight"` path); without merges (base alone, ensemble) the same call runs untraced."""
    live = [LiveSource(base, m, cuda_graphs=cuda_graphs) for m in sources]
    merges = plan.merges if plan.mode == "merge" else []
    if not merges:
        try:
            with torch.no_grad():
                base.trace(trace=False, **_generate_kwargs(base, live, run, plan))
        finally:
            _finish_sources(run, live)
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
