"""The fast paired engine: base and sources stepped together, block by block, with static KV caches.

One forward of `PairedEngine` runs, for each layer i: the merge into the base at (i, "pre"), base block
i, source block i (only while i is below the highest merged layer), the merge at (i, "post"); then the
final norm and the head on each row's last token. No nnsight trace and no hooks are involved, so a step
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

from latent_merge_nnsight.generation.graphs import StepGraphs
from latent_merge_nnsight.plan import Plan
from latent_merge_nnsight.generation.stack import Biases, KVCache, Stack, mask_positions, plain_forwards
from latent_merge_nnsight.ops import regmean_weights
from latent_merge_nnsight.positions import position_mask

__all__ = ["PairedEngine"]


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
        self.caches: list[KVCache] = [base.new_cache(capacity)] + [
            s.new_cache(capacity) for s in self.sources
        ]
        self.rows = batch  # rows of the current run (fewer once finished rows are dropped)
        self.max_rows = batch
        self.kv_mask = torch.zeros(batch, capacity, dtype=torch.long, device=self.device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=self.device)
        merges = dict(plan.merges) if plan.mode == "merge" else {}
        self.pre = {layer: a for layer, a in merges.items() if plan.site == "pre"}
        self.post = {layer: a for layer, a in merges.items() if plan.site == "post"}
        self.params = dict(plan.params)
        self.deltas = plan.deltas
        # during decoding "last"/"all" select every new token, explicit prompt indices select none
        probe = position_mask(torch.ones(1, 1, dtype=torch.long), plan.positions, decoding=True)
        self.decode_merges = bool(probe.all())
        use_graphs = self.device.type == "cuda" and (cuda_graphs is None or bool(cuda_graphs))
        self.graphs = StepGraphs(self.device, use_graphs, "the decode step")
        self.static = use_graphs or static_step or compile_step
        self.compiled = compile_step
        self._step_fn = torch.compile(self._graph_step, dynamic=False) if compile_step else self._graph_step
        if self.static:
            # alphas as device scalars, so a kept engine takes new alphas without a new capture
            wd = torch.float64 if base.dtype == torch.float64 else torch.float32
            as_dev = lambda a: None if a is None else torch.tensor(a, dtype=wd, device=self.device)  # noqa: E731
            self.pre = {layer: as_dev(a) for layer, a in self.pre.items()}
            self.post = {layer: as_dev(a) for layer, a in self.post.items()}
            if self.deltas is not None:  # own copies: `reuse` writes the next run's deltas into them
                self.deltas = {layer: v.clone() for layer, v in self.deltas.items()}
            if self.params.get("weights") is not None:  # checked on the host, once: no sync in the step
                self.params["weights"] = regmean_weights(self.params["weights"], len(self.sources)).to(
                    self.device
                )
        self.layout = self._layout(base, self.sources, plan)

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
        alphas = tuple((layer, a is None) for layer, a in plan.merges) if plan.mode == "merge" else ()
        deltas = None if plan.deltas is None else tuple((k, tuple(v.shape)) for k, v in plan.deltas.items())
        params = tuple(sorted((k, repr(v)) for k, v in plan.params.items()))
        op = None if plan.op is None else plan.op.name
        models = (id(base.hf), *(id(s.hf) for s in sources))
        return (models, plan.mode, op, plan.site, repr(plan.positions), alphas, deltas, params)

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
        merges = dict(plan.merges) if plan.mode == "merge" else {}
        with torch.inference_mode():
            for table in (self.pre, self.post):
                for layer, value in table.items():
                    if value is not None:
                        value.fill_(merges[layer])
            if plan.deltas is not None:
                for layer, vector in plan.deltas.items():
                    self.deltas[layer].copy_(vector)
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

    def _biases(self, kv_mask: Tensor, start: "int | Tensor", n_new: int) -> tuple[Biases, list[Biases]]:
        """The base's attention biases and each source's (built once per device, dtype and set of windows)."""
        made: dict[Any, Biases] = {}
        out = []
        for stack in (self.base, *self.sources):
            key = (stack.device, stack.dtype, stack.distinct_windows)
            if key not in made:
                made[key] = stack.attention_bias(kv_mask, start, n_new)
            out.append(made[key])
        return out[0], out[1:]

    def _mix(
        self, layer: int, alpha: float | None, hb: Tensor, hs: list[Tensor], select: Tensor | None
    ) -> Tensor:
        plan = self.plan
        if self.deltas is not None:
            src = self.deltas[layer]
        elif plan.op.multi_source:
            src = torch.stack([h.to(hb.device) for h in hs])
        else:
            src = hs[0].to(hb.device)
        merged = plan.op(hb, src, alpha, **self.params)
        return merged if select is None else torch.where(select[..., None], merged, hb)

    def _forward(
        self,
        ids: Int[Tensor, "batch new"],
        positions: Int[Tensor, "batch new"],
        kv_mask: Int[Tensor, "batch slots"],
        start: "int | Tensor",
        select: Bool[Tensor, "batch new"] | None,
        merge: bool,
    ) -> tuple[Float[Tensor, "batch vocab"], Float[Tensor, "batch vocab"] | None]:
        """Both models over `ids`, written at slots `start...` of the caches; returns the logits at each
        row's last position (base, and the source's for the ensemble)."""
        base, caches = self.base, self.caches
        bias, bias_s = self._biases(kv_mask, start, ids.shape[1])
        hb, ctx_b = base.embed(ids, positions)
        hs, ctx_s = [], []
        for s in self.sources:
            h, c = s.embed(ids.to(s.device), positions.to(s.device))
            hs.append(h)
            ctx_s.append(c)
        for i in range(self.depth):
            if merge and i in self.pre:
                hb = self._mix(i, self.pre[i], hb, hs, select)
            if i < base.n_layers:
                hb = base.block(i, hb, bias, positions, ctx_b, caches[0])
            for j, s in enumerate(self.sources):
                if i < self.src_blocks[j]:
                    hs[j] = s.block(i, hs[j], bias_s[j], positions.to(s.device), ctx_s[j], caches[j + 1])
            if merge and i in self.post:
                hb = self._mix(i, self.post[i], hb, hs, select)
        logits = base.logits(hb[:, -1])
        if self.plan.mode == "ensemble":
            return logits, self.sources[0].logits(hs[0][:, -1]).to(logits.device)
        return logits, None

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
        select = position_mask(mask, self.plan.positions, decoding=False)
        return self._forward(ids, mask_positions(mask), mask, 0, select, merge=bool(select.any()))

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
        for cache in self.caches:
            cache.keep_rows(index, in_place=self.static)
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
        if not hasattr(self, "_g_ids"):
            size = self.kv_mask.shape[0]
            self._g_ids = torch.zeros(size, 1, dtype=torch.long, device=self.device)
            self._g_pos = torch.zeros(size, 1, dtype=torch.long, device=self.device)
            self._g_slot = torch.zeros(1, dtype=torch.long, device=self.device)
        self._g_ids[:rows, 0].copy_(tokens)
        self._g_pos[:rows].copy_(positions)
        self._g_slot.fill_(slot)
        for cache in self.caches:
            cache.graph_mode, cache.write_index = True, self._g_slot
        written = False
        try:
            out = self.graphs.replay(rows, functools.partial(self._step_fn, rows))
            if out is None:  # capture failed: decode eagerly from here on
                self.static = False
                self.kv_mask, self.next_pos = self.kv_mask[:rows], self.next_pos[:rows]
                return None
            written = True
            base_logits, src_logits = out
            return base_logits.clone(), None if src_logits is None else src_logits.clone()
        finally:
            for cache in self.caches:
                cache.graph_mode = False
                cache.filled = [cache.end if written else cache.start] * cache.n_layers

    def _graph_step(self, rows: int) -> tuple[Tensor, Tensor | None]:
        ids, positions = self._g_ids[:rows], self._g_pos[:rows]
        return self._forward(
            ids, positions, self.kv_mask[:rows], self._g_slot, None, merge=self.decode_merges
        )

    def release(self) -> None:
        """Drop the captured graphs, the caches and the step buffers now (a finished engine not kept for
        the next call), rather than whenever the garbage collector gets to them."""
        self.graphs.clear()
        for cache in self.caches:
            cache.keys = [None] * cache.n_layers
            cache.values = [None] * cache.n_layers
        for name in ("_g_ids", "_g_pos", "_g_slot"):
            self.__dict__.pop(name, None)

    def cache_bytes(self) -> int:
        return sum(c.nbytes() for c in self.caches)
