"""Prompt states shared between fast-engine calls on the same prompts (opt-in, `share_prompt_states`).

A grid of merges (the demo, a sweep) prefills the same prompts once per setup. Below the first merged
layer the base computes exactly what it computed last time, and a source's own stream never changes at
all, so their blocks' outputs and keys/values on those prompts can be kept and read back instead of
recomputed: the outputs are the same tensors, so the generated tokens are identical.

Inside `with share_prompt_states(base, ft):` each listed model keeps, per prompt batch (same token ids
and mask), the hidden state leaving each of its blocks and each block's keys/values, as far as its
unmerged stream went; a prefill of the fast engine (`PairedEngine.prefill`) starts each model at the
deepest block it may reuse. The models' weights must not change inside the block (nothing checks it).
"""

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from jaxtyping import Float, Int
from torch import Tensor, nn

from latent_merge_nnsight.models import hf_module
from latent_merge_nnsight.nouns import Model

__all__ = ["PromptReuse", "PromptStates", "share_prompt_states"]

_STORES: "weakref.WeakKeyDictionary[Any, PromptStates]" = weakref.WeakKeyDictionary()
"""Each model's `PromptStates` while `share_prompt_states` lasts, keyed by its HF module (held weakly:
nothing is set on the module, and a dropped model takes its store with it)."""


@dataclass
class _Entry:
    """One prompt batch: `hidden[i]` leaves block i - 1 (enters block i), `kv[i]` are block i's keys and
    values over the prompt slots; both for blocks 0..n-1 of the model's unmerged stream."""

    ids: Int[Tensor, "batch prompt"]
    mask: Int[Tensor, "batch prompt"]
    hidden: dict[int, Float[Tensor, "batch prompt d_model"]] = field(default_factory=dict)
    kv: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)

    @property
    def n(self) -> int:
        """Blocks 0..n-1 are stored (their keys/values and the state leaving block n-1)."""
        n = 0
        while n in self.kv and n + 1 in self.hidden:
            n += 1
        return n


class PromptStates:
    """A model's stored prompt states, for the last `max_batches` prompt batches it prefilled."""

    def __init__(self, max_batches: int = 8) -> None:
        self.max_batches = max_batches
        self.entries: list[_Entry] = []

    def entry(self, ids: Tensor, mask: Tensor) -> _Entry:
        """The entry of these prompts (a new, empty one if they were not seen)."""
        for e in self.entries:
            if e.ids.shape == ids.shape and e.ids.device == ids.device:
                if bool((e.ids == ids).all()) and bool((e.mask == mask).all()):
                    return e
        new = _Entry(ids.clone(), mask.clone())
        self.entries = [*self.entries, new][-self.max_batches :]
        return new


def prompt_states(hf: nn.Module) -> PromptStates | None:
    """The store of a model's HF module, when `share_prompt_states` is active for it."""
    return _STORES.get(hf)


@contextlib.contextmanager
def share_prompt_states(*models: Model, max_batches: int = 8) -> Iterator[None]:
    """While the block runs, fast-engine prefills of `models` (base or source) on prompts they have
    prefilled before reuse the blocks their unmerged streams already computed (see the module doc).
    The stored states are dropped on exit."""
    modules = list({id(m): m for m in (hf_module(x) for x in models)}.values())
    outer = [_STORES.get(module) for module in modules]  # a nested block's stores give way to its own
    for module in modules:
        _STORES[module] = PromptStates(max_batches)
    try:
        yield
    finally:
        for module, store in zip(modules, outer, strict=True):
            if store is None:
                _STORES.pop(module, None)
            else:
                _STORES[module] = store


class PromptReuse:
    """One prefill's use of the stores: the blocks each model reads back instead of running (those
    below `skip`), and what it adds.

    Arguments:
        stacks, caches: the models (base first) and their KV caches, `begin` already called for the prompt.
        clean: per model, how many of its blocks compute what its unmerged stream computes (the base:
            up to its first merge; a source: all it runs).
        ids, mask: the prompts.
    """

    def __init__(self, stacks: list[Any], caches: list[Any], clean: list[int], ids: Tensor, mask: Tensor):
        self.caches, self.clean = caches, clean
        stores = [prompt_states(stack.hf) for stack in stacks]
        self.entries = [None if store is None else store.entry(ids, mask) for store in stores]
        self.skip = [0 if e is None else min(e.n, c) for e, c in zip(self.entries, clean, strict=True)]

    def start(self) -> list[int]:
        """Fill each model's caches of the blocks below its `skip` with their stored keys/values; returns
        `skip`."""
        for m, entry in enumerate(self.entries):
            for i in range(self.skip[m]):
                self.caches[m].update(*entry.kv[i], i)
        return self.skip

    def output(self, m: int, i: int) -> Tensor:
        """The stored output of model m's block i (for i below `skip[m]`: merges at the layers in
        between read the state there)."""
        return self.entries[m].hidden[i + 1].clone()

    def keep(self, m: int, i: int, h: Tensor) -> None:
        """Store block i's output `h` and keys/values of model m, if its stream is still unmerged there
        and the block is the next one its entry lacks."""
        entry = self.entries[m]
        if entry is None or i >= self.clean[m] or i != entry.n:
            return
        cache, rows = self.caches[m], h.shape[0]
        keys, values = cache.keys[i], cache.values[i]
        entry.kv[i] = (keys[:rows, :, : cache.end].clone(), values[:rows, :, : cache.end].clone())
        entry.hidden[i + 1] = h.clone()
