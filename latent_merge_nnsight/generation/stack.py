"""Run a Hugging Face causal LM block by block, with a key/value cache this package owns.

`Stack` splits a causal LM into the four things a lockstep merge needs to call separately: embed the
tokens, run decoder block i, apply the final norm and the LM head. It calls the HF modules directly
(no nnsight trace, no hooks of its own), so a paired step costs only the modules' own work, and a source
can stop after any block and resume from there.

`KVCache` duck-types the one method HF attention layers call (`update`): it writes each forward's keys
and values at a cursor into buffers of fixed capacity, so the buffers keep their address from step to
step (what a CUDA graph needs). Slot i of the cache holds column i of the running attention mask, so
padding, causality and sliding windows all come from one additive bias per window, built by
`attention_bias` (HF builds its masks the same way: a window counts slots, pads included).
"""

import contextlib
import inspect
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from latent_merge_nnsight._nnsight import plain_forwards
from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.models import hf_module
from latent_merge_nnsight.nouns import Model
from latent_merge_nnsight.sites import Architecture, registered, resolve_path

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = [
    "Biases",
    "KVCache",
    "Stack",
    "attention_bias",
    "fast_support",
    "layer_windows",
    "mask_positions",
    "plain_forwards",
]

ATTENTION = ("sdpa", "eager")
"""Attention implementations that accept the additive `[batch, 1, new, slots]` bias built here."""
LAYER_TYPES = ("full_attention", "sliding_attention")

Biases = dict[int | None, Tensor]
"""One forward's additive attention biases, by attention window (None: full causal attention)."""
Rotary = tuple[Tensor, Tensor] | dict[str, tuple[Tensor, Tensor]] | None
"""One forward's rotary embeddings (cos, sin): one pair, or one per layer type; None without rotary."""


def layer_windows(config: "PretrainedConfig", n_layers: int) -> list[int | None]:
    """Each block's attention window, as HF masks it: None for full attention.

    With `layer_types` a block slides only when its type says so (Qwen2/3, Gemma 2/3); without, a
    `sliding_window` in the config slides every block (Mistral, Mixtral, Phi-3).
    """
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if isinstance(types, list):
        return [window if t == "sliding_attention" else None for t in types[:n_layers]]
    return [window] * n_layers


def fast_support(model: Model) -> str | None:
    """None when `Stack` can run `model`; otherwise the reason it cannot (for error messages and `auto`)."""
    hf = hf_module(model)
    config = hf.config
    model_type = getattr(config, "model_type", None)
    arch = registered(model_type)
    if arch is None or arch.embed is None:
        return (
            f"model_type={model_type!r} is not supported by the block-by-block engine: register it with "
            f"lmn.register_architecture({model_type!r}, layers=..., final_norm=..., embed=..., rotary=...)"
        )
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in ATTENTION:
        return (
            f"attention implementation {impl!r} is not supported (expected one of {ATTENTION}); "
            "load with attn_implementation='sdpa'"
        )
    if getattr(config, "use_bidirectional_attention", False):
        return "bidirectional attention is not supported by the block-by-block engine (it decodes causally)"
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and any(t not in LAYER_TYPES for t in layer_types):
        kinds = sorted(set(layer_types) - set(LAYER_TYPES))
        return f"layers of type {kinds} are not supported by the block-by-block engine (only {LAYER_TYPES})"
    return None


def mask_positions(mask: Int[Tensor, "batch slots"]) -> Int[Tensor, "batch slots"]:
    """Position ids counted over real tokens (pads get 0), as HF `generate` computes them."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def attention_bias(
    kv_mask: Int[Tensor, "batch slots"],
    start: "int | Tensor",
    n_new: int,
    dtype: torch.dtype,
    window: int | None = None,
) -> Float[Tensor, "batch 1 new slots"]:
    """Additive attention bias for `n_new` queries written at slots `start..start+n_new-1`.

    A query may attend to a slot that holds a real token (`kv_mask == 1`) at or before its own slot,
    and, with a sliding `window`, fewer than `window` slots before it. Masked entries get the dtype's
    most negative finite value, so a query with nothing to attend to (a pad query) averages instead of
    producing NaN.
    """
    slots = kv_mask.shape[-1]
    device = kv_mask.device
    if isinstance(start, Tensor):
        start = start.to(device)
    query_slot = torch.arange(n_new, device=device) + start  # [new]
    slot = torch.arange(slots, device=device)[None, :]
    causal = slot <= query_slot[:, None]  # [new, slots]
    if window is not None:
        causal = causal & (slot > query_slot[:, None] - window)
    allowed = causal[None, None, :, :] & kv_mask.bool()[:, None, None, :]
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


class KVCache:
    """Keys and values of one model, `[batch, kv_heads, capacity, head_dim]` per layer, written at a cursor.

    Call `begin(n_new)` before each forward; attention layers then call `update`. In `graph_mode` the
    write slot comes from the tensor `write_index` and the full buffers are returned (fixed shapes for a
    CUDA graph); otherwise the new tokens go to `start..end-1` and only the used slots are returned.
    """

    def __init__(self, n_layers: int, capacity: int):
        self.n_layers = n_layers
        self.capacity = capacity
        self.keys: list[Tensor | None] = [None] * n_layers
        self.values: list[Tensor | None] = [None] * n_layers
        self.filled = [0] * n_layers
        self.start = 0
        self.end = 0
        self.graph_mode = False
        self.write_index: Tensor | None = None

    def begin(self, n_new: int) -> None:
        """Reserve slots for a forward of `n_new` tokens (grows the buffers if needed, outside graph mode)."""
        self.start, self.end = self.end, self.end + n_new
        if self.end > self.capacity:
            if self.graph_mode:
                raise LatentMergeError(f"KV cache full: {self.end} slots needed, capacity {self.capacity}")
            self._grow(max(self.end, 2 * self.capacity))

    def reset(self) -> None:
        """Start over at slot 0 (the buffers, and their addresses, stay)."""
        self.start = self.end = 0
        self.filled = [0] * self.n_layers

    def _grow(self, capacity: int) -> None:
        for store in (self.keys, self.values):
            for i, buf in enumerate(store):
                if buf is not None:
                    bigger = buf.new_zeros(*buf.shape[:2], capacity, buf.shape[-1])
                    bigger[:, :, : self.capacity] = buf
                    store[i] = bigger
        self.capacity = capacity

    def update(
        self, key: Tensor, value: Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[Tensor, Tensor]:
        """Store this forward's keys/values for `layer_idx` and return all keys/values to attend to."""
        if self.keys[layer_idx] is None:
            shape = (*key.shape[:2], self.capacity, key.shape[-1])
            self.keys[layer_idx] = key.new_zeros(shape)
            self.values[layer_idx] = value.new_zeros(*value.shape[:2], self.capacity, value.shape[-1])
        k, v = self.keys[layer_idx], self.values[layer_idx]
        rows = key.shape[0]
        if self.graph_mode:
            k[:rows].index_copy_(2, self.write_index, key)
            v[:rows].index_copy_(2, self.write_index, value)
            return k[:rows], v[:rows]
        if self.filled[layer_idx] != self.start:
            raise LatentMergeError(
                f"KV cache of layer {layer_idx} holds {self.filled[layer_idx]} tokens but this forward "
                f"starts at "
                f"slot {self.start}: the layer was skipped at an earlier step"
            )
        k[:rows, :, self.start : self.end] = key
        v[:rows, :, self.start : self.end] = value
        self.filled[layer_idx] = self.end
        return k[:rows, :, : self.end], v[:rows, :, : self.end]

    def keep_rows(self, index: Int[Tensor, " keep"], in_place: bool = False) -> None:
        """Keep only the batch rows `index` (finished rows stop costing compute).

        `in_place` moves them to the front of the same buffers (their addresses must not change under a
        CUDA graph); otherwise the buffers are replaced by smaller ones.
        """
        for store in (self.keys, self.values):
            for i, buf in enumerate(store):
                if buf is None:
                    continue
                picked = buf.index_select(0, index.to(buf.device))
                if in_place:
                    buf[: len(index)] = picked
                else:
                    store[i] = picked

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values) if t is not None)


def _cache_keyword(block: nn.Module) -> str:
    """The name under which a decoder block takes its cache (it changed across transformers versions)."""
    params = inspect.signature(type(block).forward).parameters
    for name in ("cache", "past_key_values", "layer_past", "past_key_value"):
        if name in params:
            return name
    raise LatentMergeError(
        f"{type(block).__name__}.forward takes no cache argument; cannot run it block by block"
    )


class Stack:
    """A causal LM as `embed -> block 0..n-1 -> norm -> head`, each part called directly.

    Built from the model family's entry in the architecture registry (`lmn.register_architecture`: the
    paths of its embedding, rotary embedding, blocks and final norm); `fast_support(model)` says why a
    model is refused. Blocks above those loaded (a source from `lmn.load(..., up_to_layer=L)`) simply do
    not exist here.
    """

    def __init__(self, model: Model):
        reason = fast_support(model)
        if reason is not None:
            raise LatentMergeError(reason)
        hf = hf_module(model)
        arch: Architecture = registered(hf.config.model_type)
        self.hf, self.config, self.family = hf, hf.config, arch.model_type
        part = lambda path: None if path is None else resolve_path(hf, path)  # noqa: E731
        self._embed, self._rotary = part(arch.embed), part(arch.rotary)
        self._wpe, self._drop = part(arch.position_embedding), part(arch.embed_dropout)
        self.blocks, self.norm = part(arch.layers), part(arch.final_norm)
        self.head = hf.get_output_embeddings()  # `lm_head` (or GPT-NeoX's `embed_out` in transformers 4)
        self.n_layers = len(self.blocks)
        self._cache_kw = _cache_keyword(self.blocks[0])
        first = next(hf.parameters())
        self.device, self.dtype = first.device, first.dtype
        self.windows = layer_windows(self.config, self.n_layers)
        self.distinct_windows = tuple(dict.fromkeys(self.windows))  # one attention bias per forward each
        types = getattr(self.config, "layer_types", None)
        # Gemma 3 rotates sliding and full layers with different frequencies: one rotary per layer type
        per_type = (
            self._rotary is not None and "layer_type" in inspect.signature(self._rotary.forward).parameters
        )
        self.rotary_types = list(types[: self.n_layers]) if per_type else None
        self.softcap = getattr(self.config, "final_logit_softcapping", None)
        self.modules = list(hf.modules())

    def plain(self) -> contextlib.AbstractContextManager:
        """This model's modules without nnsight's controllers while the block lasts (`plain_forwards`)."""
        return plain_forwards(self.modules)

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(self.n_layers, capacity)

    def embed(
        self, ids: Int[Tensor, "batch new"], positions: Int[Tensor, "batch new"]
    ) -> tuple[Tensor, Rotary]:
        """Token embeddings, and what the blocks need per forward (rotary cos/sin), from the position ids."""
        h = self._embed(ids)
        if self._wpe is not None:  # learned positions (GPT-2)
            h = h + self._wpe(positions)
        if self._drop is not None:
            h = self._drop(h)
        if self._rotary is None:
            return h, None
        if self.rotary_types is not None:
            return h, {t: self._rotary(h, positions, t) for t in set(self.rotary_types)}
        return h, self._rotary(h, positions)

    def attention_bias(
        self, kv_mask: Int[Tensor, "batch slots"], start: "int | Tensor", n_new: int
    ) -> Biases:
        """The biases this model's blocks need for one forward (one per distinct attention window)."""
        kv_mask = kv_mask.to(self.device)
        return {w: attention_bias(kv_mask, start, n_new, self.dtype, w) for w in self.distinct_windows}

    def block(
        self,
        i: int,
        h: Float[Tensor, "batch new d_model"],
        bias: Biases,
        positions: Int[Tensor, "batch new"],
        context: Rotary,
        cache: KVCache,
    ) -> Float[Tensor, "batch new d_model"]:
        """Run decoder block i (its keys/values go into `cache`); `bias` from `attention_bias`."""
        kwargs: dict[str, Any] = {
            self._cache_kw: cache,
            "attention_mask": bias[self.windows[i]],
            "use_cache": True,
        }
        if self._rotary is not None:
            kwargs["position_ids"] = positions
            kwargs["position_embeddings"] = (
                context if self.rotary_types is None else context[self.rotary_types[i]]
            )
        out = self.blocks[i](h, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def logits(self, h: Float[Tensor, "batch d_model"]) -> Float[Tensor, "batch vocab"]:
        """Final norm and LM head on one hidden vector per row (soft-capped as the model's forward does)."""
        logits = self.head(self.norm(h))
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
