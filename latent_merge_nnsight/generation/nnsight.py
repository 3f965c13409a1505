"""The nnsight engine (`lmn.generate(..., engine="nnsight")`) and the traced generation under `lmn.pair`.

One nnsight trace of the base's `base.generate` (HF's decode loop) runs the plan: at every step the
sources (`generation.live.LiveSource`) follow the base on exactly its tokens, and each merged layer is
mixed by `merge.apply_plan` (hence `Plan.apply`) inside the trace. Token choice and stopping come from
the loop's own choose-next step (`Run.choose_next`: ensemble mix, the package's sampler, the tracker),
installed as a logits processor that leaves HF's argmax exactly one choice, so a seed gives the same
tokens here as with `engine="fast"`. Beam search is not offered: it reorders the base's cache between
steps, and nothing reorders the sources' in step with it.
"""

import functools
import warnings
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from latent_merge_nnsight._nnsight import model_generate, tracer_class
from latent_merge_nnsight.generation.live import LiveSource
from latent_merge_nnsight.generation.loop import GenerationResult, Run
from latent_merge_nnsight.inputs import Batch
from latent_merge_nnsight.merge import apply_plan
from latent_merge_nnsight.models import hf_module
from latent_merge_nnsight.nouns import Model
from latent_merge_nnsight.plan import Plan
from latent_merge_nnsight.sampling import Tracker

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["PairTracer", "open_trace", "run_nnsight"]


class _Step(LogitsProcessor):
    """The loop's choose-next step (`Run.choose_next`) inside HF's decode loop; HF's argmax then picks
    exactly the chosen tokens."""

    def __init__(self, run: Run, live: list[LiveSource]):
        self.run, self.live = run, live
        self.source_logits = run.plan is not None and run.plan.mode == "ensemble"

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        run = self.run
        if run.tracker.all_done:  # a step HF runs after the end (deferred stop check): keep padding
            tokens = torch.full((scores.shape[0],), run.pad_id, device=scores.device)
        else:
            source = self.live[0].logits() if self.source_logits else None
            tokens, _ = run.choose_next(scores, source, torch.arange(scores.shape[0]))
            done = torch.tensor(run.tracker.done, device=tokens.device)
            tokens = torch.where(done, torch.full_like(tokens, run.pad_id), tokens)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, tokens[:, None].to(scores.device), 0.0)
        return out


class _Stop(StoppingCriteria):
    def __init__(self, tracker: Tracker):
        self.tracker = tracker

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs: object) -> Tensor:
        return torch.tensor(self.tracker.done, device=input_ids.device)


def _neutral_config(hf: "PreTrainedModel", pad_id: int) -> GenerationConfig:
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


def _run_generate(base: Model, pad_id: int, *args: object, **kwargs: object) -> Any:
    """nnsight's own `generate` under a neutral generation config (restored afterwards)."""
    hf = hf_module(base)
    saved = hf.generation_config
    hf.generation_config = _neutral_config(hf, pad_id)
    try:
        return model_generate(base, *args, **kwargs)
    finally:
        hf.generation_config = saved


class PairTracer(tracer_class()):  # type: ignore[misc]
    """The tracer `Pair.generate` returns; after the block, `.generation` holds the `GenerationResult`."""

    generation: Any = None
    _lmn_finish: Any = None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        ok = False
        try:
            with torch.no_grad():
                suppress = super().__exit__(exc_type, exc_value, traceback)
            ok = True  # the body and the generation ran to the end
            return suppress
        finally:
            if self._lmn_finish is not None:
                self.generation = self._lmn_finish(ok=ok)


def _generate_kwargs(base: Model, live: list[LiveSource], run: Run) -> dict[str, Any]:
    """What a trace of `base.generate` needs to use the package's sampler and stopping."""
    batch: Batch = run.batch
    for s in live:
        s.reset()
        s.budget = run.max_new_tokens + 2
    step = _Step(run, live)
    return dict(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        fn=functools.partial(_run_generate, base, run.pad_id),
        max_new_tokens=run.max_new_tokens,
        logits_processor=LogitsProcessorList([step]),
        stopping_criteria=StoppingCriteriaList([_Stop(run.tracker)]),
        pad_token_id=run.pad_id,
    )


def _finish_sources(run: Run, live: list[LiveSource]) -> None:
    """Record whether the sources' steps ran as CUDA graphs, then free their caches and graphs."""
    if live:
        run.info["cuda_graphs"] = all(s.graphs.use_graphs for s in live)
        run.info["cuda_graph_error"] = next((s.graphs.error for s in live if s.graphs.error), None)
    for s in live:
        s.reset()


def open_trace(base: Model, live: list[LiveSource], run: Run) -> PairTracer:
    """A `PairTracer` over `base.generate` with the package's sampler and stopping (not yet entered)."""
    tracer = base.trace(tracer_cls=PairTracer, **_generate_kwargs(base, live, run))

    def finish(ok: bool) -> Any:
        _finish_sources(run, live)
        return run.result("nnsight") if ok else None

    tracer._lmn_finish = finish
    return tracer


def run_nnsight(
    base: Model, sources: list[Model], plan: Plan, run: Run, options: dict[str, Any]
) -> GenerationResult:
    """Run `plan` through nnsight's `base.generate`: one trace with the plan's merges at every step (the
    `engine="nnsight"` path); without merges (base alone, ensemble) the same call runs untraced.
    `options["cuda_graphs"]` captures the sources' decode steps on CUDA (the rest is the fast engine's)."""
    live = [LiveSource(base, m, cuda_graphs=options.get("cuda_graphs")) for m in sources]
    run.plan = plan
    if not plan.sites():
        try:
            with torch.no_grad():
                base.trace(trace=False, **_generate_kwargs(base, live, run))
        finally:
            _finish_sources(run, live)
        return run.result("nnsight")
    # steering deltas live in the plan; explicit prompt positions select nothing while decoding, so
    # those merges run at the prompt step only (HF generate drops the mask that would tell so)
    steps = (
        (lambda tracer: tracer.iter[:]) if plan.merges_while_decoding else (lambda tracer: tracer.iter[:1])
    )
    tracer = open_trace(base, live, run)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*was never reached.*")
        with tracer:
            for _step in steps(tracer):
                for layer, site in plan.sites():
                    apply_plan(plan, layer, [] if plan.deltas is not None else live, base, site=site)
    return tracer.generation
