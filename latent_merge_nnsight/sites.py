"""Where the residual stream lives in each architecture.

A site is `(layer, "pre" | "post")`: `"pre"` is the residual stream entering decoder block L (HF
`hidden_states[L]`, the paper's forward-pre-hook point), `"post"` is the block's output (HF
`hidden_states[L+1]`, except at the last layer, where HF applies the final norm first). The canonical
spelling of a site is `layers.{L}.resid_pre` / `layers.{L}.resid_post` (see `site_name`).

This module works on anything whose attributes mirror the HF module tree: a `torch.nn.Module` or an
nnsight `Envoy`. It imports nothing of the package except the error type.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from torch import Tensor

from latent_merge_nnsight.errors import LatentMergeError

if TYPE_CHECKING:
    from nnsight import Envoy
    from torch import nn

    ModelLike = nn.Module | Envoy
    """A Hugging Face module or an nnsight envoy of one (an `lmn.load` model is one)."""

__all__ = [
    "Architecture",
    "Site",
    "architecture",
    "get_layers",
    "n_layers",
    "read_resid",
    "register_architecture",
    "registered",
    "resolve_path",
    "site_name",
    "write_resid",
]

Site = Literal["pre", "post"]
SITES: tuple[str, ...] = ("pre", "post")


@dataclass(frozen=True)
class Architecture:
    """Where one architecture keeps its parts: the one registry every part of the package reads (captures
    and `merge_into` need `layers`; the engines' block-by-block `Stack` needs `embed` too).

    Attributes:
        model_type: the HF `config.model_type`.
        layers: dotted path from the causal-LM module to the `ModuleList` of decoder blocks.
        final_norm: dotted path to the norm applied after the last block (before the LM head).
        embed: dotted path to the token embedding (None: the engines cannot step this family block by
            block; captures and `merge_into` still work).
        rotary: dotted path to the rotary embedding whose `(cos, sin)` the blocks take as
            `position_embeddings` (with `position_ids`); None for a family without one (GPT-2).
        position_embedding: dotted path to a learned position embedding added to the token embedding.
        embed_dropout: dotted path to a dropout applied to the embedding sum.
    """

    model_type: str
    layers: str
    final_norm: str | None = None
    embed: str | None = None
    rotary: str | None = None
    position_embedding: str | None = None
    embed_dropout: str | None = None


_ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(
    model_type: str,
    layers: str,
    final_norm: str | None = None,
    *,
    embed: str | None = None,
    rotary: str | None = None,
    position_embedding: str | None = None,
    embed_dropout: str | None = None,
) -> Architecture:
    """Teach the package where an architecture's parts live (see `Architecture` for each path).

    With `layers` (and `final_norm`), captures and `merge_into` work; with `embed` too (and `rotary`,
    `position_embedding`, `embed_dropout` as the family has them), both generation engines run it block
    by block, so lockstep merges run on it as on the families the package ships with.

    Example:
        >>> register_architecture(
        ...     "my_llama", layers="model.layers", final_norm="model.norm",
        ...     embed="model.embed_tokens", rotary="model.rotary_emb",
        ... )
    """
    arch = Architecture(model_type, layers, final_norm, embed, rotary, position_embedding, embed_dropout)
    _ARCHITECTURES[model_type] = arch
    return arch


LLAMA_LIKE = (
    "qwen2",
    "qwen3",
    "llama",
    "mistral",
    "mixtral",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "olmo",
    "olmo2",
)
"""Families laid out like Llama: `model.layers` of blocks, `model.norm` before the LM head."""

for _t in LLAMA_LIKE:
    register_architecture(
        _t, "model.layers", "model.norm", embed="model.embed_tokens", rotary="model.rotary_emb"
    )
register_architecture(
    "gpt2",
    "transformer.h",
    "transformer.ln_f",
    embed="transformer.wte",
    position_embedding="transformer.wpe",
    embed_dropout="transformer.drop",
)
register_architecture(
    "gpt_neox",
    "gpt_neox.layers",
    "gpt_neox.final_layer_norm",
    embed="gpt_neox.embed_in",
    rotary="gpt_neox.rotary_emb",
    embed_dropout="gpt_neox.emb_dropout",
)


def resolve_path(root: object, path: str) -> Any:
    """The attribute at a dotted `path` below `root` (`"model.layers"` -> `root.model.layers`)."""
    return _resolve(root, path)


def registered(model_type: object) -> Architecture | None:
    """The registered `Architecture` of a `config.model_type`, or None."""
    return _ARCHITECTURES.get(model_type)


def _resolve(root: object, path: str) -> Any:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _config(model: "ModelLike") -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise LatentMergeError(f"{type(model).__name__} has no `config`; expected a Hugging Face causal LM")
    return config


def architecture(model: "ModelLike") -> Architecture:
    """The `Architecture` of an HF model (or an nnsight wrapper of one), by `config.model_type`."""
    model_type = getattr(_config(model), "model_type", None)
    if model_type in _ARCHITECTURES:
        return _ARCHITECTURES[model_type]
    known = ", ".join(sorted(_ARCHITECTURES))
    raise LatentMergeError(
        f"unknown architecture model_type={model_type!r} ({type(model).__name__}); known: {known}. "
        f"Register it with lmn.register_architecture({model_type!r}, layers='path.to.blocks', "
        f"final_norm='path.to.norm'), naming the ModuleList of decoder blocks."
    )


def get_layers(model: "ModelLike") -> Any:
    """The decoder blocks of `model` (a `ModuleList`, or the matching nnsight envoy list)."""
    arch = architecture(model)
    try:
        return _resolve(model, arch.layers)
    except AttributeError:
        raise LatentMergeError(
            f"{type(model).__name__} (model_type={arch.model_type!r}) has no attribute path {arch.layers!r}; "
            f"re-register the architecture with the right path"
        ) from None


def n_layers(model: "ModelLike") -> int:
    """Number of decoder blocks."""
    return len(get_layers(model))


def check_site(site: str) -> None:
    if site not in SITES:
        raise LatentMergeError(
            f"site={site!r}; expected one of: 'pre' (entering block L), 'post' (leaving it)"
        )


def check_layer(layer: object, total: int, *, what: str = "layer", model_name: str = "the model") -> int:
    """Validate one layer index against `[0, total)`; negative indices are refused (the paper clamped)."""
    expected = f"0 <= {what} < {total}"
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise LatentMergeError(
            f"{what}={layer!r} must be an int; expected {expected}",
            param=what,
            value=layer,
            expected=expected,
        )
    if not 0 <= layer < total:
        raise LatentMergeError(
            f"{what}={layer} is out of range for {model_name} ({total} layers); expected {expected}",
            param=what,
            value=layer,
            expected=expected,
        )
    return layer


def site_name(layer: int, site: Site = "pre") -> str:
    """Canonical name of a residual site: `layers.{L}.resid_pre` or `layers.{L}.resid_post`."""
    check_site(site)
    return f"layers.{layer}.resid_{site}"


def read_resid(block: "Envoy", site: Site) -> Tensor:
    """The residual stream at a block (an nnsight envoy, inside a trace): its input or its output.

    Handles both bare-tensor outputs (transformers 5) and tuple outputs (transformers 4).
    """
    check_site(site)
    if site == "pre":
        return block.input
    out = block.output
    return out[0] if isinstance(out, tuple) else out


def write_resid(block: "Envoy", site: Site, value: Tensor) -> None:
    """Replace the residual stream at a block (inside a trace), keeping any extra tuple outputs."""
    check_site(site)
    if site == "pre":
        block.input = value
        return
    out = block.output
    block.output = (value, *out[1:]) if isinstance(out, tuple) else value
