"""`LiveSource`: a source model stepped in lockstep with a traced base, its residuals served on request.

Inside a trace of the base (`lmn.pair(...).generate(...)` or `engine="nnsight"`), `resid(layer, site)`
waits until the base reaches that site in the current forward, runs the source on exactly the tokens the
base is processing now and returns its residual there. The source runs on a `generation.stepper.Stepper`
(plain torch, block by block, with its own KV cache; on CUDA each decode step replays one captured CUDA
graph); this class only follows the base's recorded inputs and serves the states. The source's modules
run without nnsight's controllers, so the trace never sees their calls (the base can be its own source).
"""

import torch
from jaxtyping import Float
from torch import Tensor

from latent_merge_nnsight._nnsight import is_interleaving
from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.generation.graphs import FixedStep, StepGraphs
from latent_merge_nnsight.generation.stack import KVCache, Stack, mask_positions
from latent_merge_nnsight.generation.stepper import Stepper
from latent_merge_nnsight.models import last_inputs, model_info
from latent_merge_nnsight.nouns import Model
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
        base: Model,
        model: Model,
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
        device = self.stack.device
        use_graphs = device.type == "cuda" and (cuda_graphs is None or bool(cuda_graphs))
        fixed = FixedStep(device, use_graphs, static_step, "the source step")
        self.stepper = Stepper(self.stack, self.min_blocks, fixed=fixed)
        self.reset()

    @property
    def graphs(self) -> StepGraphs:
        """The source step's captured (or eager) fixed-shape steps."""
        return self.stepper.fixed.graphs

    @property
    def static(self) -> bool:
        """Whether decode steps run as the fixed-shape step (a failed capture turns it off)."""
        return self.stepper.fixed.on

    @static.setter
    def static(self, on: bool) -> None:
        self.stepper.fixed.on = on

    @property
    def cache(self) -> KVCache | None:
        """The source's KV cache for the generation in progress (None between generations)."""
        return self.stepper.cache

    @property
    def depth(self) -> int:
        """Blocks the source runs every step (grows with the deepest request at the prompt step)."""
        return self.stepper.depth

    def reset(self) -> None:
        """Forget the current generation (frees the KV cache and the captured steps)."""
        self.stepper.reset()
        self.stepper.depth = self.min_blocks
        self._ids: Tensor | None = None
        self._states: dict[int, Tensor] = {}
        self._replayed: list[Tensor] | None = None  # the fixed-shape step's outputs (states by blocks)

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
        stepper = self.stepper
        with self.stack.plain():
            stepper.finish()  # the previous step, up to the depth every step runs
        new = ids.shape[1]
        if mask is None:  # HF generate drops an all-ones mask: no padding, so the mask is all ones
            prompt = stepper.cache is None or new > 1  # decoding steps feed one token
            past = 0 if prompt else stepper.cache.end
            mask = torch.ones(ids.shape[0], past + new, dtype=torch.long, device=ids.device)
        width = mask.shape[1]
        if width == new:  # a prompt: a new generation starts
            self.reset()
            stepper.new_cache(width + self.budget)
        elif stepper.cache is None or stepper.cache.end != width - new:
            have = 0 if stepper.cache is None else stepper.cache.end
            raise LatentMergeError(
                f"the source is out of step with the base: it holds {have} tokens, the base {width - new}; "
                "a live source follows one generation from its prompt on"
            )
        dev = self.stack.device
        ids, mask = ids.to(dev), mask.to(dev)
        stepper.cache.begin(new)  # may grow the cache: the fixed step then recaptures on the new buffers
        self._replayed = None
        self._ids = recorded[0]
        if self.static and new == 1 and self.depth > 0:
            self._replayed = stepper.step_fixed(ids, mask)
            if self._replayed is not None:
                self._states = {}
                return
        bias = self.stack.attention_bias(mask, width - new, new)
        with self.stack.plain():
            self._states = {0: stepper.start(ids, mask_positions(mask)[:, -new:], bias)}

    def _state(self, blocks: int, layer: int) -> Tensor:
        """The residual after `blocks` blocks (asked for as a site of `layer`)."""
        stepper = self.stepper
        if blocks in self._states:
            return self._states[blocks]
        if self._replayed is not None and blocks <= self.depth:
            # a copy: the step's output buffers are overwritten by the next step (a user may save this)
            self._states[blocks] = self._replayed[blocks].clone()
            return self._states[blocks]
        if blocks < stepper.ran:
            raise LatentMergeError(
                f"asked for the source state after {blocks} blocks after it ran {stepper.ran}; "
                "ask in layer order"
            )
        if blocks > self.depth and stepper.cache.start > 0:
            raise LatentMergeError(
                f"asked for the source state after {blocks} blocks, but earlier steps ran only "
                f"{self.depth}, so "
                f"its deeper KV caches lack those tokens; pass up_to_layer={layer} to lmn.pair"
            )
        with self.stack.plain():
            self._states[blocks] = stepper.run_to(blocks)
        stepper.depth = max(stepper.depth, blocks)
        return self._states[blocks]
