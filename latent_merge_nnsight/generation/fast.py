"""The fast paired engine: base and sources stepped together, block by block, with static KV caches.

One forward of `PairedEngine` runs, for each layer i: the merge into the base at (i, "pre"), base block
i, source block i (only while i is below the highest merged layer), the merge at (i, "post"); then the
final norm and the head on each row's last token. Each model runs on its own `generation.stepper.Stepper`
(its stack, KV cache and forward in progress). No nnsight trace and no hooks are involved, so a step
costs the modules' own work plus one small op per merged layer.

On CUDA the decode step is captured as a CUDA graph per batch size (static input buffers, caches written
at a device-side index, the attention bias built in the graph), so a step is one graph replay with no
per-module Python work. On CPU, or when capture fails, the same step runs eagerly.

Finished rows are dropped from the batch (their cache rows too): eagerly at once, under CUDA graphs
when at most half of the rows are left (each new batch size costs one capture).
"""

import contextlib
import functools
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from latent_merge_nnsight.generation.graphs import FixedStep, StepGraphs
from latent_merge_nnsight.generation.loop import GenerationResult, Run
from latent_merge_nnsight.generation.prefix import PromptReuse
from latent_merge_nnsight.generation.stack import Biases, KVCache, Stack, mask_positions, plain_forwards
from latent_merge_nnsight.generation.stepper import Stepper
from latent_merge_nnsight.models import hf_module
from latent_merge_nnsight.nouns import Model
from latent_merge_nnsight.plan import Plan

__all__ = ["PairedEngine", "release_engine", "run_fast"]


class PairedEngine:
    """Runs a `Plan` on a base `Stack` and its source `Stack`s for one batch.

    Arguments:
        base, sources: the models as stacks (sources may hold fewer blocks: `up_to_layer`).
        plan: the resolved recipe.
        batch: number of rows its buffers hold (a run may use fewer: see `reuse`).
        capacity: KV slots per row (prompt width + new tokens).
        cuda_graphs: capture the decode step (CUDA only); None means "on CUDA".
        static_step: run the fixed-shape decode step that CUDA graphs capture, without capturing it
            (to check that path on CPU).
        compile_step: run the fixed-shape decode step through `torch.compile` (fuses the small elementwise
            kernels a step is mostly made of; costs a compilation per batch size). Implies the fixed-shape
            step; on CUDA the compiled step is then captured as a graph like the eager one.
    """

    def __init__(
        self,
        base: Stack,
        sources: list[Stack],
        plan: Plan,
        batch: int,
        capacity: int,
        cuda_graphs: bool | None = None,
        static_step: bool = False,
        compile_step: bool = False,
    ):
        self.base = base
        self.plan = plan
        self.sources = sources if plan.live_sources else []
        self.src_blocks = [plan.source_blocks(s.n_layers) for s in self.sources]
        self.depth = max([base.n_layers, *self.src_blocks])
        self.device = base.device
        self.capacity = capacity
        self.steppers = [Stepper(base, base.n_layers, capacity)] + [
            Stepper(s, blocks, capacity) for s, blocks in zip(self.sources, self.src_blocks, strict=True)
        ]  # the base, then each source
        self.caches: list[KVCache] = [s.cache for s in self.steppers]
        self.rows = batch  # rows of the current run (fewer once finished rows are dropped)
        self.max_rows = batch
        self.kv_mask = torch.zeros(batch, capacity, dtype=torch.long, device=self.device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=self.device)
        sites = plan.sites()
        self.pre = frozenset(layer for layer, site in sites if site == "pre")  # merged entering the block
        self.post = frozenset(layer for layer, site in sites if site == "post")  # and leaving it
        self.decode_merges = plan.merges_while_decoding
        use_graphs = self.device.type == "cuda" and (cuda_graphs is None or bool(cuda_graphs))
        self.fixed = FixedStep(self.device, use_graphs, static_step or compile_step, "the decode step")
        self.compiled = compile_step
        self._step_fn = torch.compile(self._graph_step, dynamic=False) if compile_step else self._graph_step
        if self.static or plan.groups:  # alphas as device tensors: a kept engine refills them in place
            wd = torch.float64 if base.dtype == torch.float64 else torch.float32
            self.plan = plan.on_device(self.device, wd, len(self.sources))
        self.layout = self._layout(base, self.sources, plan)

    @property
    def graphs(self) -> StepGraphs:
        """The paired decode step's captured (or eager) fixed-shape steps, one per batch size."""
        return self.fixed.graphs

    @property
    def static(self) -> bool:
        """Whether decode steps run as the fixed-shape step (a failed capture turns it off)."""
        return self.fixed.on

    @static.setter
    def static(self, on: bool) -> None:
        self.fixed.on = on

    @property
    def use_graphs(self) -> bool:
        """Whether decode steps are captured as CUDA graphs (turned off for good by a failed capture)."""
        return self.graphs.use_graphs

    # ------------------------------------------------------------------------------------------------
    # keeping an engine for the next call

    @staticmethod
    def _layout(base: Stack, sources: list[Stack], plan: Plan) -> tuple:
        """What a captured step depends on besides the values of alphas and deltas (which `reuse` swaps)
        and the batch size (each size has its own graph)."""
        models = (id(base.hf), *(id(s.hf) for s in sources))
        return (models, *plan.layout())

    def same_layout(self, base: Stack, sources: list[Stack], plan: Plan, compile_step: bool) -> bool:
        """Whether a run of `plan` could reuse this engine's captured steps, given room enough."""
        live = sources if plan.live_sources else []
        return self.static and compile_step == self.compiled and self._layout(base, live, plan) == self.layout

    def reuse(
        self, base: Stack, sources: list[Stack], plan: Plan, batch: int, capacity: int, compile_step: bool
    ) -> bool:
        """Make this engine ready for a new run of the same layout with at most `max_rows` rows and
        `capacity` slots (new alphas and deltas, fresh caches), keeping its buffers and captured graphs
        (a batch size it has not run before costs one capture). Returns False (and changes nothing) when
        it cannot."""
        if not self.same_layout(base, sources, plan, compile_step):
            return False
        if batch > self.max_rows or capacity > self.capacity:
            return False
        with torch.inference_mode():
            self.plan.refill(plan)
            self.kv_mask.zero_()
            self.next_pos.zero_()
        # self.plan stays: the new plan has the same layout (a compiled step guards on it)
        for cache in self.caches:
            cache.reset()
        return True

    # ------------------------------------------------------------------------------------------------
    # one forward of the pair

    def plain(self) -> contextlib.AbstractContextManager:
        """The pair's modules without nnsight's controllers while the block lasts (`plain_forwards`)."""
        return plain_forwards([m for stack in (self.base, *self.sources) for m in stack.modules])

    def _biases(self, kv_mask: Tensor, start: "int | Tensor", n_new: int) -> list[Biases]:
        """The attention biases of the base, then of each source (built once per device, dtype and set of
        windows)."""
        made: dict[Any, Biases] = {}
        out = []
        for stack in (self.base, *self.sources):
            key = (stack.device, stack.dtype, stack.distinct_windows)
            if key not in made:
                made[key] = stack.attention_bias(kv_mask, start, n_new)
            out.append(made[key])
        return out

    def _forward(
        self,
        ids: Int[Tensor, "batch new"],
        positions: Int[Tensor, "batch new"],
        kv_mask: Int[Tensor, "batch slots"],
        start: "int | Tensor",
        select: Bool[Tensor, "batch new"] | None,
        merge: bool,
        reuse: PromptReuse | None = None,
    ) -> tuple[Float[Tensor, "batch vocab"], Float[Tensor, "batch vocab"] | None]:
        """Both models over `ids`, written at slots `start...` of the caches; returns the logits at each
        row's last position (base, and the source's for the ensemble). With `reuse` (a prefill), each
        model reads back its blocks below `reuse.skip` instead of running them and stores the unmerged
        blocks it runs."""
        self._run_blocks(ids, positions, kv_mask, start, select, merge, reuse)
        base, sources = self.steppers[0], self.steppers[1:]
        logits = base.logits()
        if self.plan.mode == "ensemble":
            return logits, sources[0].logits().to(logits.device)
        return logits, None

    def _run_blocks(
        self,
        ids: Int[Tensor, "batch new"],
        positions: Int[Tensor, "batch new"],
        kv_mask: Int[Tensor, "batch slots"],
        start: "int | Tensor",
        select: Bool[Tensor, "batch new"] | None,
        merge: bool,
        reuse: PromptReuse | None = None,
    ) -> None:
        """Both models' blocks over `ids` with the merge in between; each stepper's `h` is its residual
        after its last block, at every position (`_forward` takes the last; `score_states` all)."""
        steppers = self.steppers
        base, sources = steppers[0], steppers[1:]
        for stepper, bias in zip(steppers, self._biases(kv_mask, start, ids.shape[1]), strict=True):
            stepper.start(ids, positions, bias)
        skip = [0] * len(steppers) if reuse is None else reuse.start()
        for i in range(self.depth):
            if merge and i in self.pre:
                base.h = self.plan.apply(i, "pre", base.h, [s.h for s in sources], select)
            for m, stepper in enumerate(steppers):
                if i < skip[m]:  # a prefill's unmerged block, computed before on these prompts
                    stepper.advance_to(reuse.output(m, i))
                elif i < stepper.depth:
                    stepper.advance()
                    if reuse is not None:
                        reuse.keep(m, i, stepper.h)
            if merge and i in self.post:
                base.h = self.plan.apply(i, "post", base.h, [s.h for s in sources], select)

    def score_states(
        self, ids: Int[Tensor, "batch seq"], mask: Int[Tensor, "batch seq"], select: Bool[Tensor, "batch seq"]
    ) -> tuple[Float[Tensor, "batch seq d_model"], Float[Tensor, "batch seq d_model"] | None]:
        """Teacher forcing (`lmn.score`): both models over whole rows (any padding) in one forward,
        merged where `select` says; the base's final residual at every position, and the source's for
        the logit ensemble (turn them into logits with each stack's `logits`). `mask` covers the slots
        the caches hold, then these tokens: rows that go on from earlier ones (`branch`) attend to them."""
        rows, new = ids.shape
        self.rows = rows
        start = self.caches[0].end
        for cache in self.caches:
            cache.begin(new)
        self._run_blocks(ids, mask_positions(mask)[:, start:], mask, start, select, bool(select.any()))
        base, sources = self.steppers[0], self.steppers[1:]
        return base.h, sources[0].h if self.plan.mode == "ensemble" else None

    def branch(self, index: Int[Tensor, " rows"], plan: Plan) -> None:
        """Go on from the cached rows as the rows `index` picks, a row picked once per continuation of
        its context (`lmn.score` shares a context's forward), merged by `plan`, those rows' plan (the
        same layout: per-row alphas picked the same way)."""
        for stepper in self.steppers:
            stepper.keep(index.to(self.device), in_place=False)
        self.rows = self.max_rows = len(index)
        if plan.groups:
            wd = torch.float64 if self.base.dtype == torch.float64 else torch.float32
            plan = plan.on_device(self.device, wd, len(self.sources))
        self.plan = plan

    # ------------------------------------------------------------------------------------------------
    # prefill and decode

    def prefill(
        self, ids: Int[Tensor, "batch prompt"], mask: Int[Tensor, "batch prompt"]
    ) -> tuple[Tensor, Tensor | None]:
        """Run the (left-padded) prompts; returns next-token logits."""
        rows, width = ids.shape
        self.rows = rows  # a reused engine may hold more rows than this run has
        self.kv_mask[:rows, :width] = mask
        self.next_pos = mask.sum(dim=-1)
        for cache in self.caches:
            cache.begin(width)
        select = self.plan.select(mask, decoding=False)
        merge = bool(select.any())
        stacks = [s.stack for s in self.steppers]
        reuse = PromptReuse(stacks, self.caches, self._clean(merge), ids, mask)
        return self._forward(ids, mask_positions(mask), mask, 0, select, merge, reuse)

    def _clean(self, merge: bool) -> list[int]:
        """Per model, the blocks of a prefill whose outputs do not depend on the merge (`PromptReuse`):
        the base's below its first merged layer (through it at site post), each source's all."""
        if not merge or not (self.pre or self.post):
            clean = self.base.n_layers
        else:
            clean = min(self.pre) if self.pre else min(self.post) + 1
        return [clean, *self.src_blocks]

    def decode(self, tokens: Int[Tensor, " batch"]) -> tuple[Tensor, Tensor | None]:
        """Feed one new token per row; returns next-token logits."""
        slot = self.caches[0].end
        self.kv_mask[:, slot] = 1
        positions = self.next_pos[: self.rows, None].clone()
        self.next_pos += 1
        for cache in self.caches:
            cache.begin(1)
        if self.static:
            out = self._decode_graph(tokens, positions, slot)
            if out is not None:
                return out
        kv_mask = self.kv_mask[:, : slot + 1]
        return self._forward(tokens[:, None], positions, kv_mask, slot, None, merge=self.decode_merges)

    def keep(self, index: Int[Tensor, " keep"]) -> bool:
        """Drop the rows not in `index` (positions in the current batch). Returns whether it dropped them."""
        n = len(index)
        if self.static and n > self.rows // 2:
            return False  # under graphs, shrink only when the batch halves (one capture per size)
        index = index.to(self.device)
        self.plan.keep_rows(index)  # per-row alphas follow their rows
        for stepper in self.steppers:
            stepper.keep(index, in_place=self.static)
        if self.static:
            self.kv_mask[:n] = self.kv_mask.index_select(0, index)
            self.next_pos[:n] = self.next_pos.index_select(0, index)
        else:
            self.kv_mask = self.kv_mask.index_select(0, index)
            self.next_pos = self.next_pos.index_select(0, index)
        self.rows = n
        return True

    # ------------------------------------------------------------------------------------------------
    # CUDA graphs

    def _decode_graph(
        self, tokens: Tensor, positions: Tensor, slot: int
    ) -> tuple[Tensor, Tensor | None] | None:
        rows = self.rows
        self.fixed.inputs_for(self.max_rows, self.device).load(tokens[:, None], positions, slot)
        out = self.fixed.replay(rows, functools.partial(self._step_fn, rows), self.caches)
        if out is None:  # capture failed: decode eagerly from here on
            self.kv_mask, self.next_pos = self.kv_mask[:rows], self.next_pos[:rows]
            return None
        base_logits, src_logits = out
        return base_logits.clone(), None if src_logits is None else src_logits.clone()

    def _graph_step(self, rows: int) -> tuple[Tensor, Tensor | None]:
        inputs = self.fixed.inputs
        return self._forward(
            inputs.ids[:rows],
            inputs.pos[:rows],
            self.kv_mask[:rows],
            inputs.slot,
            None,
            merge=self.decode_merges,
        )

    def release(self) -> None:
        """Drop the captured graphs, the caches and the step buffers now (a finished engine not kept for
        the next call), rather than whenever the garbage collector gets to them."""
        self.fixed.release()
        for stepper in self.steppers:
            stepper.reset()
        for cache in self.caches:
            cache.keys = [None] * cache.n_layers
            cache.values = [None] * cache.n_layers

    def cache_bytes(self) -> int:
        return sum(c.nbytes() for c in self.caches)


# ----------------------------------------------------------------------------------------------------
# the fast engine's decode loop (the loop skeleton of `generation.loop`, its step a paired forward)


_KEPT = "_lmn_kept_engine"
"""Attribute of the base's HF module holding the engine kept by `generate(..., keep_engine=True)`."""


def release_engine(base: Model) -> bool:
    """Free the engine kept on `base` by `generate(..., keep_engine=True)` (its caches, graphs and its
    hold on the sources). Returns whether there was one."""
    kept = hf_module(base).__dict__.pop(_KEPT, None)
    if kept is not None:
        kept.release()
    return kept is not None


def _engine_for(
    base: Model, sources: list[Model], plan: Plan, run: Run, options: dict[str, Any]
) -> PairedEngine:
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


def run_fast(
    base: Model, sources: list[Model], plan: Plan, run: Run, options: dict[str, Any]
) -> GenerationResult:
    ids, mask = run.batch.input_ids, run.batch.attention_mask
    n_rows = ids.shape[0]
    engine = _engine_for(base, sources, plan, run, options)
    tracker = run.tracker
    with torch.inference_mode(), engine.plain():
        base_logits, src_logits = engine.prefill(ids, mask)  # 1. both models over the prompts
        rows = torch.arange(n_rows)  # which original rows the engine's batch rows are
        while True:
            tokens, finished = run.choose_next(base_logits, src_logits, rows)  # 2. mix, sample, track
            if tracker.all_done:  # 3. EOS / stop / length on every row
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
