"""`Stepper`: one model stepped block by block on a decode loop's tokens, the runner both engines share.

A `Stepper` holds a model's `Stack`, its `KVCache` and the forward in progress: `start` embeds the
step's tokens, `advance` / `run_to(n)` run blocks in order (`h` is the residual after those run), and
`finish` runs the blocks every step runs (`depth`: a source stops after the highest merged layer, and
each step must fill the same caches). `step_fixed` runs a whole decode step (embedding and `depth`
blocks) at fixed shapes, one CUDA graph replay on CUDA. `keep` drops finished rows from the cache.

- the fast engine (`generation.fast.PairedEngine`) steps its base and each source with a `Stepper`,
  block i of each in turn with the merge in between; its CUDA graph captures that whole paired step;
- a live source (`generation.live.LiveSource`, the nnsight engine and `lmn.pair`) steps its model with
  one, following a traced base, and serves the states to the trace.
"""

from jaxtyping import Float, Int
from torch import Tensor

from latent_merge_nnsight.generation.graphs import FixedStep
from latent_merge_nnsight.generation.stack import Biases, KVCache, Stack

__all__ = ["Stepper"]


class Stepper:
    """A model's forward, one decode step at a time, with its own KV cache.

    Arguments:
        stack: the model as a `Stack`.
        depth: blocks every step runs (`finish` runs up to there).
        capacity: KV slots per row of a cache made now (0: none yet, see `new_cache`).
        fixed: the fixed-shape step `step_fixed` runs on (its graphs, inputs and whether it is on); None
            for a stepper whose steps run inside another's fixed step (the fast engine's).
    """

    def __init__(self, stack: Stack, depth: int, capacity: int = 0, fixed: FixedStep | None = None):
        self.stack = stack
        self.depth = depth
        self.fixed = fixed
        self.cache: KVCache | None = stack.new_cache(capacity) if capacity else None
        self._forget()

    def new_cache(self, capacity: int) -> KVCache:
        """A fresh, empty cache of `capacity` slots per row (a new generation)."""
        self.cache = self.stack.new_cache(capacity)
        self._forget()
        return self.cache

    def reset(self) -> None:
        """Forget the generation: the cache, the forward in progress, and the fixed step's graphs."""
        self.cache = None
        self._forget()
        if self.fixed is not None:
            self.fixed.graphs.clear()

    def _forget(self) -> None:
        """Drop the forward in progress (its residual, positions, biases and rotary context)."""
        self.h: Tensor | None = None
        self.pos = self.bias = self.ctx = None
        self.ran = 0

    # ------------------------------------------------------------------------------------------------
    # one forward, block by block (the caller reserves its cache slots with `cache.begin`)

    def start(
        self, ids: Int[Tensor, "batch new"], positions: Int[Tensor, "batch new"], bias: Biases
    ) -> Float[Tensor, "batch new d_model"]:
        """Embed this forward's tokens; no block has run yet. `bias` from `Stack.attention_bias`."""
        device = self.stack.device
        self.pos, self.bias = positions.to(device), bias
        self.h, self.ctx = self.stack.embed(ids.to(device), self.pos)
        self.ran = 0
        return self.h

    def advance(self) -> Float[Tensor, "batch new d_model"]:
        """Run the next block."""
        self.h = self.stack.block(self.ran, self.h, self.bias, self.pos, self.ctx, self.cache)
        self.ran += 1
        return self.h

    def advance_to(self, h: Float[Tensor, "batch new d_model"]) -> Float[Tensor, "batch new d_model"]:
        """Take `h` as the next block's output instead of running it (computed before on the same
        tokens, its keys/values already in the cache: `generation.prefix`)."""
        self.h = h
        self.ran += 1
        return self.h

    def run_to(self, blocks: int) -> Float[Tensor, "batch new d_model"]:
        """Run blocks until `blocks` of them have run this forward."""
        while self.ran < blocks:
            self.advance()
        return self.h

    def finish(self) -> None:
        """Run the forward in progress up to `depth` (keeps every cache it fills in step)."""
        if self.h is not None:
            self.run_to(self.depth)

    def logits(self) -> Float[Tensor, "batch vocab"]:
        """Next-token logits at each row's last position (the whole model must have run)."""
        return self.stack.logits(self.h[:, -1])

    def keep(self, index: Int[Tensor, " keep"], in_place: bool) -> None:
        """Keep only the batch rows `index` of the cache (`in_place`: the same buffers, for a graph)."""
        self.cache.keep_rows(index, in_place=in_place)

    # ------------------------------------------------------------------------------------------------
    # a decode step at fixed shapes (a CUDA graph on CUDA)

    def step_fixed(
        self, ids: Int[Tensor, "batch 1"], mask: Int[Tensor, "batch slots"]
    ) -> list[Float[Tensor, "batch 1 d_model"]] | None:
        """This decode step (`mask` covers the cache's slots up to the one just reserved) as one
        fixed-shape step: the embedding and blocks `0..depth-1`. Returns the residual after each number
        of blocks (buffers the next step overwrites: copy what is kept), or None when capture failed
        (nothing ran: run the step eagerly; later steps run eagerly too)."""
        rows, width = mask.shape
        inputs = self.fixed.inputs_for(rows, ids.device, kv_slots=self.cache.capacity)
        inputs.kv_mask[:, :width].copy_(mask)
        inputs.load(ids, mask.sum(dim=-1, keepdim=True) - 1, width - 1)  # the new token is real: its position
        states = self.fixed.replay((rows, self.depth), self._fixed_states, [self.cache])
        if states is not None:
            self.h, self.ran = states[-1], self.depth
        return states

    def _fixed_states(self) -> list[Tensor]:
        """Embedding and blocks `0..depth-1` on the step buffers; the residual after each number of blocks."""
        inputs = self.fixed.inputs
        bias = self.stack.attention_bias(inputs.kv_mask, inputs.slot, 1)
        with self.stack.plain():
            states = [self.start(inputs.ids, inputs.pos, bias)]
            for _ in range(self.depth):
                states.append(self.advance())
        return states
