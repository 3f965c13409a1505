"""`LiveSource`: a source model stepped in lockstep with a traced base, its residuals served on request.

Inside a trace of the base (`lmn.pair(...).generate(...)` or `engine="nnsight"`), `resid(layer, site)`
waits until the base reaches that site in the current forward, runs the source on exactly the tokens the
base is processing now (plain torch, block by block, with its own KV cache) and returns its residual
there. On CUDA each decode step (the embedding and every block the source runs) replays one captured CUDA
graph instead. The source's modules run without nnsight's controllers, so the trace never sees their
calls (the base itself can be its own source).
"""

from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from latent_merge_nnsight._nnsight import is_interleaving
from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.generation.graphs import StepGraphs, StepInputs
from latent_merge_nnsight.generation.stack import Stack, mask_positions
from latent_merge_nnsight.models import last_inputs, model_info
from latent_merge_nnsight.sites import Site, check_layer, check_site, get_layers, read_resid

__all__ = ["LiveSource"]


class LiveSource:
    """A source model's residual stream at the step a traced base model is running (a `ResidSource`).

    Arguments:
        base: the traced base model (nnsight).
        model: the source model (a shallow one from `up_to_layer` works).
        up_to_layer: run the source through block `up_to_layer` every step, so any site up to that layer
            can be asked for at any step. Without it the source runs as deep as the deepest request at the
            prompt step; asking deeper at a later step is an error (its deeper caches would lack the
            earlier tokens).
        cuda_graphs: on CUDA, run each decode step of the source (embedding and every block it runs) as
            one captured CUDA graph instead of block by block from Python (default: yes on CUDA). A step
            that cannot be captured runs eagerly, with a warning.
        static_step: run that fixed-shape decode step without capturing it (to check the path on CPU).
    """

    def __init__(
        self,
        base: Any,
        model: Any,
        *,
        up_to_layer: int | None = None,
        cuda_graphs: bool | None = None,
        static_step: bool = False,
    ):
        self.base = base
        self.model = model
        self.info = model_info(model)
        self.stack = Stack(model)
        if up_to_layer is not None:
            check_layer(up_to_layer, self.info.n_layers, what="up_to_layer", model_name=self.info.name)
        self.min_blocks = 0 if up_to_layer is None else up_to_layer + 1
        self.budget = 64
        on_cuda = self.stack.device.type == "cuda"
        use_graphs = on_cuda and (cuda_graphs is None or bool(cuda_graphs))
        self.graphs = StepGraphs(self.stack.device, use_graphs, "the source step")
        self.static = use_graphs or static_step
        self._inputs: StepInputs | None = None  # the fixed-shape step's static inputs, made on first use
        self.reset()

    def reset(self) -> None:
        """Forget the current generation (frees the KV cache)."""
        self.cache = None
        self._ids: Tensor | None = None
        self._h: Tensor | None = None
        self._states: dict[int, Tensor] = {}
        self._replayed: list[Tensor] | None = None  # the fixed-shape step's outputs (states by blocks)
        self.graphs.clear()
        self._ran = 0
        self.depth = self.min_blocks

    def __repr__(self) -> str:
        return f"LiveSource({self.info.name}, blocks run per step={self.depth} of {self.info.n_layers})"

    # ------------------------------------------------------------------------------------------------

    def resid(self, layer: int, site: Site) -> Float[Tensor, "batch pos d_model"]:
        """The source's residual at (layer, site) for the tokens the base is processing now."""
        check_site(site)
        check_layer(layer, self.info.n_layers, model_name=self.info.name)
        if not is_interleaving(self.base):
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
        with self.stack.plain():
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
        self.cache.begin(new)  # may grow the cache: `_step_fixed` then recaptures on the new buffers
        self._replayed = None
        self._ids = recorded[0]
        if self.static and new == 1 and self.depth > 0 and self._step_fixed(ids, mask):
            self._states, self._ran = {}, self.depth
            return
        self._pos = mask_positions(mask)[:, -new:]
        self._bias = self.stack.attention_bias(mask, width - new, new)
        with self.stack.plain():
            self._h, self._ctx = self.stack.embed(ids, self._pos)
        self._ran = 0
        self._states = {0: self._h}

    def _run_to(self, blocks: int) -> None:
        with self.stack.plain():
            while self._ran < blocks:
                self._h = self.stack.block(self._ran, self._h, self._bias, self._pos, self._ctx, self.cache)
                self._ran += 1

    def _state(self, blocks: int, layer: int) -> Tensor:
        """The residual after `blocks` blocks (asked for as a site of `layer`)."""
        if blocks in self._states:
            return self._states[blocks]
        if self._replayed is not None and blocks <= self.depth:
            # a copy: the step's output buffers are overwritten by the next step (a user may save this)
            self._states[blocks] = self._replayed[blocks].clone()
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

    # ------------------------------------------------------------------------------------------------
    # decode steps as one fixed-shape step (a CUDA graph on CUDA)

    def _step_fixed(self, ids: Int[Tensor, "batch 1"], mask: Int[Tensor, "batch slots"]) -> bool:
        """Run this decode step, every block up to `depth`, as one fixed-shape step writing the cache slot
        just reserved. Returns False when capture failed: the step then runs eagerly in that slot."""
        rows, width = mask.shape
        cache = self.cache
        if self._inputs is None or self._inputs.kv_mask.shape != (rows, cache.capacity):
            self.graphs.clear()  # a step captured on other buffers (or a grown cache) is stale
            self._inputs = StepInputs(rows, ids.device, kv_slots=cache.capacity)
        inputs = self._inputs
        inputs.kv_mask[:, :width].copy_(mask)
        inputs.load(ids, mask.sum(dim=-1, keepdim=True) - 1, width - 1)  # the new token is real: its position
        self._replayed = inputs.replay(self.graphs, (rows, self.depth), self._fixed_step, [cache])
        written = self._replayed is not None
        if not written:  # capture failed: this step and the next run eagerly
            self.static = False
        return written

    def _fixed_step(self) -> list[Tensor]:
        """Embedding and blocks `0..depth-1` on the step buffers; the residual after each number of blocks."""
        inputs = self._inputs
        bias = self.stack.attention_bias(inputs.kv_mask, inputs.slot, 1)
        with self.stack.plain():
            h, context = self.stack.embed(inputs.ids, inputs.pos)
            states = [h]
            for i in range(self.depth):
                h = self.stack.block(i, h, bias, inputs.pos, context, self.cache)
                states.append(h)
        return states
