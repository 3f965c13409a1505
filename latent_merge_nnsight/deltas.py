"""Static per-layer steering vectors: the mean difference between source and base residuals."""

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from safetensors.torch import save_file
from torch import Tensor

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.inputs import Batch, encode
from latent_merge_nnsight.models import check_compatible, hf_module
from latent_merge_nnsight.nouns import Model, Prompts
from latent_merge_nnsight.residuals import _check_layers, read_tagged, run_to_layers
from latent_merge_nnsight.sites import Site, check_site

__all__ = ["Deltas", "compute_deltas"]


@dataclass
class Deltas:
    """layer -> `[d_model]` mean of `h_source - h_base` over real tokens, at `site`."""

    vectors: dict[int, Float[Tensor, " d_model"]]
    site: Site = "pre"
    n_tokens: int = 0

    def resid(self, layer: int, site: Site) -> Float[Tensor, " d_model"]:
        if site != self.site:
            raise LatentMergeError(f"site={site!r} but these deltas were computed at site={self.site!r}")
        if layer not in self.vectors:
            raise LatentMergeError(f"layer={layer} has no delta; computed layers: {sorted(self.vectors)}")
        return self.vectors[layer]

    def __repr__(self) -> str:
        norms = ", ".join(f"{k}: |d|={float(v.norm()):.3g}" for k, v in sorted(self.vectors.items()))
        return f"Deltas(site={self.site!r}, n_tokens={self.n_tokens}, {{{norms}}})"

    def save(self, path: str | Path) -> None:
        """Write to a safetensors file (no pickle)."""
        tensors = {f"layer.{k}": v.detach().cpu().contiguous() for k, v in self.vectors.items()}
        meta = {"format": "lmn.deltas.v1", "site": self.site, "n_tokens": str(self.n_tokens)}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "Deltas":
        meta, tensors = read_tagged(path, "lmn.deltas.v1", "deltas", device)
        vectors = {int(k.split(".", 1)[1]): v for k, v in tensors.items()}
        return cls(vectors=vectors, site=meta["site"], n_tokens=int(meta["n_tokens"]))  # type: ignore[arg-type]


def compute_deltas(
    base: Model,
    source: Model,
    prompts: Prompts,
    layers: Iterable[int] | int,
    *,
    site: Site = "pre",
    batch_size: int = 8,
) -> Deltas:
    """Mean over all real tokens of `prompts` of `h_source - h_base` at each layer (float32 or wider)."""
    check_site(site)
    check_compatible(base, source)
    layers = _check_layers(layers, base)
    _check_layers(layers, source)
    if batch_size < 1:
        raise LatentMergeError(f"batch_size={batch_size}; expected >= 1")
    batch = encode(getattr(base, "tokenizer", None), prompts)
    sums: dict[int, Tensor] = {}
    n_tokens = 0
    device_b = next(hf_module(base).parameters()).device
    device_s = next(hf_module(source).parameters()).device
    for start in range(0, batch.input_ids.shape[0], batch_size):
        ids = batch.input_ids[start : start + batch_size]
        mask = batch.attention_mask[start : start + batch_size]
        hb = run_to_layers(base, Batch(ids, mask).to(device_b), layers, site)
        hs = run_to_layers(source, Batch(ids, mask).to(device_s), layers, site)
        real = mask.bool()
        n_tokens += int(real.sum())
        for layer in layers:
            wd = torch.float64 if hb[layer].dtype == torch.float64 else torch.float32
            diff = (hs[layer].to(device_b, wd) - hb[layer].to(wd))[real.to(device_b)]
            sums[layer] = sums.get(layer, 0) + diff.sum(dim=0)
    return Deltas({layer: (s / n_tokens) for layer, s in sums.items()}, site=site, n_tokens=n_tokens)
