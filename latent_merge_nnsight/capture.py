"""Capture residual states of a model with one nnsight trace."""

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float, Int
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.inputs import Batch, TokenIds, encode
from latent_merge_nnsight.models import hf_module, model_info
from latent_merge_nnsight.nouns import Model, Prompts
from latent_merge_nnsight.sites import Site, check_layer, check_site, get_layers, read_resid, site_name

__all__ = ["Capture", "capture"]


def read_tagged(
    path: str | Path, fmt: str, what: str, device: str | torch.device
) -> tuple[dict[str, str], dict[str, Tensor]]:
    """The metadata and tensors of a safetensors file one of our `save` methods wrote (format tag `fmt`)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != fmt:
        raise LatentMergeError(f"{path} is not a {what} file (format={meta.get('format')!r})")
    return meta, load_file(str(path), device=str(device))


@dataclass
class Capture:
    """Residual states of one forward, per layer, with the tokens they belong to.

    Attributes:
        states: layer -> `[batch, pos, d_model]` residual at `site` of that layer.
        input_ids: the token ids the model saw, `[batch, pos]`.
        attention_mask: 1 for real tokens, 0 for padding, `[batch, pos]`.
        site: "pre" (entering block L) or "post" (leaving it).
        model_name: where the states came from.
        n_layers: decoder blocks of the model that produced them.
    """

    states: dict[int, Float[Tensor, "batch pos d_model"]]
    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    site: Site = "pre"
    model_name: str = "unknown"
    n_layers: int = 0
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted(self.states)

    def __getitem__(self, layer: int) -> Float[Tensor, "batch pos d_model"]:
        if layer not in self.states:
            raise LatentMergeError(
                f"layer={layer} was not captured from {self.model_name}; captured layers: {self.layers}"
            )
        return self.states[layer]

    def resid(self, layer: int, site: Site) -> Float[Tensor, "batch pos d_model"]:
        """The captured state for a merge at (layer, site); the site must match the capture's."""
        if site != self.site:
            raise LatentMergeError(
                f"site={site!r} but this capture holds site={self.site!r} states; capture with site={site!r}"
            )
        return self[layer]

    def __repr__(self) -> str:
        b, t = self.input_ids.shape
        any_state = next(iter(self.states.values()))
        names = ", ".join(site_name(layer, self.site) for layer in self.layers)
        return (
            f"Capture(model={self.model_name!r}, sites=[{names}], batch={b}, pos={t}, "
            f"d_model={any_state.shape[-1]}, dtype={str(any_state.dtype).removeprefix('torch.')}, "
            f"real_tokens={int(self.attention_mask.sum())})"
        )

    def save(self, path: str | Path) -> None:
        """Write to one safetensors file (no pickle); `Capture.load` reads it back."""
        tensors = {f"layer.{layer}": t.contiguous() for layer, t in self.states.items()}
        tensors["input_ids"] = self.input_ids.contiguous()
        tensors["attention_mask"] = self.attention_mask.contiguous()
        meta = {
            "format": "lmn.capture.v1",
            "site": self.site,
            "model_name": self.model_name,
            "n_layers": str(self.n_layers),
            "extra": json.dumps(self.metadata),
        }
        save_file({k: v.detach().cpu() for k, v in tensors.items()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "Capture":
        meta, tensors = read_tagged(path, "lmn.capture.v1", "capture", device)
        states = {int(k.split(".", 1)[1]): v for k, v in tensors.items() if k.startswith("layer.")}
        return cls(
            states=states,
            input_ids=tensors["input_ids"],
            attention_mask=tensors["attention_mask"],
            site=meta["site"],  # type: ignore[arg-type]
            model_name=meta["model_name"],
            n_layers=int(meta["n_layers"]),
            metadata=json.loads(meta.get("extra", "{}")),
        )


def _check_layers(layers: Iterable[int] | int, model: Model) -> list[int]:
    info = model_info(model)
    if isinstance(layers, int):
        layers = [layers]
    layers = sorted(set(layers))
    if not layers:
        raise LatentMergeError(f"layers=[] is empty; expected at least one layer in [0, {info.n_layers})")
    for layer in layers:
        check_layer(layer, info.n_layers, what="layers", model_name=info.name)
    return layers


def run_to_layers(model: Model, batch: Batch, layers: list[int], site: Site) -> dict[int, Tensor]:
    """One traced forward that clones the residual at each layer and stops after the highest one."""
    blocks = get_layers(model)
    saved: dict[int, Tensor] = {}
    with torch.no_grad():
        with model.trace(input_ids=batch.input_ids, attention_mask=batch.attention_mask) as tracer:
            for layer in layers:
                saved[layer] = read_resid(blocks[layer], site).clone()
            tracer.stop()
    return saved


def capture(
    model: Model,
    inputs: Prompts | TokenIds | None = None,
    layers: Iterable[int] | int = (),
    *,
    site: Site = "pre",
    input_ids: TokenIds | None = None,
    attention_mask: TokenIds | None = None,
    padding_side: str | None = None,
) -> Capture:
    """Save the residual stream at `layers` for `inputs`; the forward stops after the highest layer.

    Arguments:
        model: an nnsight model from `lmn.load` / `lmn.wrap`.
        inputs: a string, list of strings, chat messages, or token ids (see `lmn.inputs.encode`).
        layers: one layer or several; each in `[0, n_layers)`.
        site: "pre" (the residual entering block L, HF `hidden_states[L]`) or "post" (leaving it).
    """
    check_site(site)
    layers = _check_layers(layers, model)
    batch = encode(
        getattr(model, "tokenizer", None),
        inputs,
        input_ids=input_ids,
        attention_mask=attention_mask,
        padding_side=padding_side,  # type: ignore[arg-type]
    )
    device = next(hf_module(model).parameters()).device
    batch = batch.to(device)
    info = model_info(model)
    states = run_to_layers(model, batch, layers, site)
    return Capture(
        states=states,
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        site=site,
        model_name=info.name,
        n_layers=info.n_layers,
    )
