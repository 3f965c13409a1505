"""Load, wrap and check models.

Every model the package works with is an nnsight `TransformersModel` around a Hugging Face causal LM.
`load` and `wrap` also install one plain forward-pre-hook on the HF module that remembers the ids and
attention mask of the latest forward, so `merge_into` can find the real tokens of whatever forward it
runs in (a trace, a generation step, a batch of invokes) without touching the envoy tree out of order.
What the package knows of a module (its `ModelInfo`, its latest inputs) is kept in this module's own
weak tables, keyed by the HF module, not as attributes on it.
"""

import contextlib
import difflib
import json
import logging
import os
import re
import socket
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import torch
import transformers
from huggingface_hub import constants, try_to_load_from_cache
from torch import nn

from latent_merge_nnsight._nnsight import is_wrapped, traced_roots, transformers_model, unwrap
from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.nouns import Model, Tokenizer
from latent_merge_nnsight.sites import architecture, get_layers, n_layers
from latent_merge_nnsight.zoo import ZOO, zoo_path

if TYPE_CHECKING:
    from transformers import PretrainedConfig
    from transformers.utils.quantization_config import QuantizationConfigMixin

__all__ = [
    "DroppedHead",
    "ModelInfo",
    "active_model",
    "check_compatible",
    "hf_module",
    "load",
    "model_info",
    "truncate",
    "wrap",
]

_INFOS: "weakref.WeakKeyDictionary[nn.Module, ModelInfo]" = weakref.WeakKeyDictionary()
"""The `ModelInfo` of each module wrapped by this package."""
_LAST_INPUTS: "weakref.WeakKeyDictionary[nn.Module, tuple[Any, Any, Any]]" = weakref.WeakKeyDictionary()
"""Per hooked module: (input_ids, attention_mask, tokens already cached) of its latest forward."""


@dataclass
class ModelInfo:
    """What the package knows about a wrapped model.

    Attributes:
        name: hub id, local path or zoo name it came from (or the class name for an in-memory model).
        n_layers: decoder blocks present in memory.
        full_n_layers: decoder blocks of the original model (differs when loaded `up_to_layer`).
    """

    name: str
    n_layers: int
    full_n_layers: int

    @property
    def truncated(self) -> bool:
        return self.n_layers < self.full_n_layers


def _past_length(kwargs: dict) -> int | torch.Tensor:
    """Tokens already in the KV cache of this forward (0 for a prompt forward).

    A static cache keeps its length in a device tensor that it updates in place: that length is kept as a
    copy and read only when asked for, so the recorder never waits for the GPU on a decode step.
    """
    for key in ("cache", "past_key_values"):
        cache = kwargs.get(key)
        if cache is not None and hasattr(cache, "get_seq_length"):
            length = cache.get_seq_length()
            return length.detach().clone() if isinstance(length, torch.Tensor) else int(length)
    position = kwargs.get("cache_position")
    return position[0].clone() if isinstance(position, torch.Tensor) and position.numel() else 0


def _record_inputs(module: nn.Module, args: tuple, kwargs: dict) -> None:
    if torch.compiler.is_compiling():
        return  # a compiled forward of the HF model (e.g. HF's static-cache generate) never runs a merge
    ids = kwargs.get("input_ids", args[0] if args else None)
    _LAST_INPUTS[module] = (ids, kwargs.get("attention_mask"), _past_length(kwargs))


def hf_module(model: Model) -> nn.Module:
    """The Hugging Face module under an nnsight wrapper (or the module itself)."""
    module = unwrap(model)
    if not isinstance(module, nn.Module):
        raise LatentMergeError(f"expected a model, got {type(model).__name__}")
    return module


def last_inputs(model: Model) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
    """The (input_ids, attention_mask) of the latest forward, if the model was wrapped by this package."""
    recorded = _LAST_INPUTS.get(hf_module(model))
    return None if recorded is None else recorded[:2]


def last_past_length(model: Model) -> int:
    """Tokens already cached before the latest forward (0 for a prompt forward or an unwrapped model)."""
    recorded = _LAST_INPUTS.get(hf_module(model))
    return 0 if recorded is None else int(recorded[2])


def model_info(model: Model) -> ModelInfo:
    """The `ModelInfo` of a wrapped model (built on the fly for a foreign one)."""
    module = hf_module(model)
    info = _INFOS.get(module)
    if info is None:
        n = n_layers(module)
        info = ModelInfo(name=type(module).__name__, n_layers=n, full_n_layers=n)
    return info


def wrap(hf_model: nn.Module, tokenizer: Tokenizer | None = None, *, name: str | None = None) -> Any:
    """Wrap an in-memory HF causal LM (and its tokenizer) as an nnsight model, with no hub access.

    nnsight sets the tokenizer's `padding_side` to "left" and gives it a pad token if it has none.
    """
    if not isinstance(hf_model, nn.Module):
        raise LatentMergeError(f"hf_model has type {type(hf_model).__name__}; expected a torch nn.Module")
    architecture(hf_model)  # fail early, with the registration hint, for an unknown architecture
    if tokenizer is None:
        raise LatentMergeError(
            "tokenizer is required to wrap a model (nnsight needs it); pass the model's tokenizer"
        )
    if hf_model not in _INFOS:
        n = n_layers(hf_model)
        full = getattr(hf_model.config, "_lmn_full_n_layers", n)
        _INFOS[hf_model] = ModelInfo(name or type(hf_model).__name__, n, full)
        hf_model.register_forward_pre_hook(_record_inputs, with_kwargs=True)
    elif name is not None:
        _INFOS[hf_model].name = name
    hf_model.eval()
    return transformers_model(hf_model, tokenizer)


_REPORT_ROW = re.compile(r"^\s*model\.layers\.(\{[\d, ]+\}|\d+)\.\S+\s*\|\s*UNEXPECTED\b")


class _TruncationReportFilter(logging.Filter):
    """Drops transformers' LOAD REPORT when all it reports is the checkpoint's blocks >= `kept` that a
    truncated load (`up_to_layer`) leaves out on purpose; any other finding is kept."""

    def __init__(self, kept: int):
        super().__init__()
        self.kept = kept

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return True
        rows = [line for line in message.splitlines() if "|" in line and not line.startswith(("Key", "-"))]
        for row in rows:
            m = _REPORT_ROW.match(row)
            if m is None or min(int(i) for i in re.findall(r"\d+", m.group(1))) < self.kept:
                return True
        return not rows


@contextlib.contextmanager
def _quiet_loading(progress: bool, kept_layers: int | None) -> Any:
    """Hide the loading bar (unless `progress`) and, for a truncated load, the report of its left-out
    blocks; both restored afterwards."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    loggers = [
        logging.getLogger(n) for n in ("transformers.modeling_utils", "transformers.utils.loading_report")
    ]
    filt = _TruncationReportFilter(kept_layers) if kept_layers is not None else None
    for lg in loggers if filt else []:
        lg.addFilter(filt)
    try:
        yield
    finally:
        for lg in loggers if filt else []:
            lg.removeFilter(filt)
        if bars and not progress:
            hf_logging.enable_progress_bar()


_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")


def _resolve_name(name_or_path: str | Path) -> str:
    """A local folder, a zoo model's folder, or a hub id worth asking the hub for.

    Fails at once, without waiting on the network, for a path that does not exist, a name close to a zoo
    model ("did you mean"), a string that cannot be a hub id, and a hub id that is not in the local cache
    while the hub is unreachable (or `HF_HUB_OFFLINE` is set).
    """
    name = str(name_or_path)
    if Path(name).exists():
        return name
    if name in ZOO:
        return str(zoo_path(name))
    where = f"{name!r} is not a local folder, a zoo model ({', '.join(sorted(ZOO))}) or a hub id"
    close = difflib.get_close_matches(name, list(ZOO), n=1, cutoff=0.75)
    if close:
        raise LatentMergeError(f"{where}; did you mean {close[0]!r}?")
    if name.startswith((".", "/", "~")) or name.endswith("/") or not _HUB_ID.match(name) or ".." in name:
        raise LatentMergeError(f"{where}: no such folder, and hub ids look like 'org/name'")
    reason = hub_unreachable(name)
    if reason:
        raise LatentMergeError(f"{name!r} is not a local folder or a zoo model, and {reason}")
    return name


def hub_unreachable(repo_id: str, filename: str = "config.json", repo_type: str = "model") -> str | None:
    """Why `repo_id` cannot be loaded from the hub right now (None: `filename` of it is cached, or the
    hub answers). Checked in well under a second, so a command without network fails at once."""
    if isinstance(try_to_load_from_cache(repo_id, filename, repo_type=repo_type), str):
        return None
    if constants.HF_HUB_OFFLINE:
        return "it is not in the Hugging Face cache while HF_HUB_OFFLINE is set"
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # the hub is reached through a proxy: let the hub client try
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError as e:
        return f"it is not in the Hugging Face cache and {host} cannot be reached ({e.strerror or e})"
    return None


def _dtype(dtype: "str | torch.dtype | None") -> "str | torch.dtype | None":
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise LatentMergeError(
            f"dtype={dtype!r}; expected 'auto', a torch dtype or its name ('bfloat16', ...)"
        )
    return value


def _quantization(quantization: "str | QuantizationConfigMixin | None") -> "QuantizationConfigMixin | None":
    """`"4bit"`/`"8bit"` become a `BitsAndBytesConfig`; a transformers quantization config passes through."""
    if quantization is None or not isinstance(quantization, str):
        return quantization
    if quantization not in ("4bit", "8bit"):
        raise LatentMergeError(
            f"quantization={quantization!r}; expected '4bit', '8bit' or a transformers quantization config"
        )
    if quantization == "4bit":
        return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    return transformers.BitsAndBytesConfig(load_in_8bit=True)


def _truncated_config(config: "PretrainedConfig", up_to_layer: int) -> "PretrainedConfig":
    full = config.num_hidden_layers
    if not 0 <= up_to_layer < full:
        raise LatentMergeError(
            f"up_to_layer={up_to_layer} is out of range for a model with {full} layers; "
            f"expected 0 <= up_to_layer < {full}"
        )
    config.num_hidden_layers = up_to_layer + 1
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[: up_to_layer + 1]
    config._lmn_full_n_layers = full
    return config


def load(
    name_or_path: str | Path,
    *,
    dtype: "str | torch.dtype" = "auto",
    device_map: "str | Mapping[str, int | str | torch.device] | None" = None,
    quantization: "str | QuantizationConfigMixin | None" = None,
    up_to_layer: int | None = None,
    keep_head: bool = False,
    tokenizer: Tokenizer | None = None,
    progress: bool = False,
    **hf_kwargs: object,
) -> Model:
    """Load a causal LM from the hub, a local directory or the shipped zoo, wrapped for nnsight.

    Arguments:
        name_or_path: a hub id (`"Qwen/Qwen2.5-7B-Instruct"`), a local directory, or a zoo name
            (`"toy-base"`, `"toy-reasoner"`).
        dtype: `"auto"`, a torch dtype or its name.
        device_map: passed to `from_pretrained` (e.g. `"auto"`, `"cuda:0"`).
        quantization: `"4bit"`, `"8bit"` (bitsandbytes) or any transformers quantization config.
        up_to_layer: keep only decoder blocks `0..up_to_layer` (a merge source needs nothing above the
            highest merged layer); the upper blocks are never materialised. Such a model's untied LM head
            is dropped too (its logits would mean nothing; it returns zero-width logits) unless
            `keep_head=True`.
        tokenizer: a tokenizer to use instead of the one saved with the model.
        progress: show transformers' "Loading weights" progress bar (off: it fills notebook outputs).

    A name that is not a local folder or a zoo model and cannot come from the hub (a typo of a zoo name,
    a missing path, no network and not cached) fails at once with a `LatentMergeError`.
    """
    path = _resolve_name(name_or_path)
    config = transformers.AutoConfig.from_pretrained(path)
    if up_to_layer is not None:
        config = _truncated_config(config, up_to_layer)
    kwargs: dict[str, Any] = {"config": config, **hf_kwargs}
    if dtype is not None:
        kwargs["dtype"] = _dtype(dtype)
    if device_map is not None:
        kwargs["device_map"] = device_map
    if quantization is not None:
        kwargs["quantization_config"] = _quantization(quantization)
    with _quiet_loading(progress, None if up_to_layer is None else up_to_layer + 1):
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if up_to_layer is not None and not keep_head:
        _drop_head(hf_model)
    if tokenizer is None:
        tokenizer = load_tokenizer(path)
    return wrap(hf_model, tokenizer, name=str(name_or_path))


_GENERIC_TOKENIZERS = {"PreTrainedTokenizerFast", "TokenizersBackend"}


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved with a model.

    A generic tokenizer (saved as `PreTrainedTokenizerFast` / `TokenizersBackend`, e.g. the toy zoo's
    character tokenizer) is loaded as exactly that class: `AutoTokenizer` would otherwise pick the model
    family's own class from `config.json` (`Qwen2Tokenizer` for a qwen2 model), which re-tokenizes text
    differently (it drops spaces of a character vocabulary).
    """
    config_file = Path(path) / "tokenizer_config.json"
    if config_file.is_file():
        if json.loads(config_file.read_text()).get("tokenizer_class") in _GENERIC_TOKENIZERS:
            return transformers.PreTrainedTokenizerFast.from_pretrained(str(path))
    return transformers.AutoTokenizer.from_pretrained(str(path))


class DroppedHead(nn.Module):
    """Stands in for the LM head of a model cut after a block: logits of a middle layer mean nothing to a
    merge source, and an untied head of a 7B model is over a gigabyte. Returns zero-width logits."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.new_zeros(*hidden.shape[:-1], 0)

    def extra_repr(self) -> str:
        shape = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"dropped: {shape} (loaded up_to_layer)"


def _drop_head(module: nn.Module) -> None:
    """Replace an untied LM head by a `DroppedHead` (a head tied to the embeddings costs nothing: kept)."""
    head, embed = module.get_output_embeddings(), module.get_input_embeddings()
    if not isinstance(head, nn.Linear) or head.weight is getattr(embed, "weight", None):
        return
    module.set_output_embeddings(DroppedHead(head.in_features, head.out_features))


def truncate(model: Model, up_to_layer: int, *, keep_head: bool = False) -> Any:
    """Drop the decoder blocks above `up_to_layer` from an in-memory model (frees their memory), and its
    untied LM head unless `keep_head` (the engines never use a cut source's head).

    Works on an HF module or an nnsight wrapper; returns a freshly wrapped model when given a wrapper.
    """
    module = hf_module(model)
    info = model_info(model)
    _truncated_config(module.config, up_to_layer)
    module.config._lmn_full_n_layers = info.full_n_layers
    layers = get_layers(module)
    del layers[up_to_layer + 1 :]
    if not keep_head:
        _drop_head(module)
    if module not in _INFOS:  # a module never wrapped: record its inputs from now on too
        module.register_forward_pre_hook(_record_inputs, with_kwargs=True)
    _INFOS[module] = ModelInfo(info.name, up_to_layer + 1, info.full_n_layers)
    if module is model:
        return module
    return wrap(module, model.tokenizer)


@dataclass(frozen=True)
class Compatibility:
    """Result of `check_compatible`: the shared sizes and each model's layer count."""

    hidden_size: int
    vocab_size: int
    base_layers: int
    source_layers: int

    def __str__(self) -> str:
        return (
            f"compatible: hidden_size={self.hidden_size}, vocab_size={self.vocab_size}, "
            f"layers base={self.base_layers} source={self.source_layers}"
        )


def _vocab(tokenizer: Tokenizer) -> dict[str, int] | None:
    return None if tokenizer is None else tokenizer.get_vocab()


def check_compatible(base: Model, source: Model) -> Compatibility:
    """Check that `source` can be merged into `base`: same hidden size, same vocabulary.

    Raises `LatentMergeError` naming both values on a mismatch; returns the shared sizes and layer counts.
    """
    bm, sm = hf_module(base), hf_module(source)
    bc, sc = bm.config, sm.config
    bi, si = model_info(base), model_info(source)
    if bc.hidden_size != sc.hidden_size:
        raise LatentMergeError(
            f"hidden_size differs: base {bi.name} has {bc.hidden_size}, "
            f"source {si.name} has {sc.hidden_size}; "
            "latent merging needs the same residual width"
        )
    if bc.vocab_size != sc.vocab_size:
        raise LatentMergeError(
            f"vocab_size differs: base {bi.name} has {bc.vocab_size}, source {si.name} has {sc.vocab_size}; "
            "both models must read the same token ids"
        )
    bv, sv = _vocab(getattr(base, "tokenizer", None)), _vocab(getattr(source, "tokenizer", None))
    if bv is not None and sv is not None and bv != sv:
        only_b = sorted(set(bv) - set(sv))[:5]
        only_s = sorted(set(sv) - set(bv))[:5]
        changed = sorted(k for k in set(bv) & set(sv) if bv[k] != sv[k])[:5]
        raise LatentMergeError(
            f"tokenizer vocabularies differ between base {bi.name} ({len(bv)} tokens) and source {si.name} "
            f"({len(sv)} tokens): only in base {only_b}, only in source {only_s}, different ids {changed}"
        )
    return Compatibility(bc.hidden_size, bc.vocab_size, bi.n_layers, si.n_layers)


def active_model() -> Any:
    """The nnsight model whose trace is running now (for helpers called inside a `with model.trace()`)."""
    envoys = traced_roots("merge_into")
    if envoys is None:
        raise LatentMergeError(
            "no active trace: call merge_into inside `with model.trace(...)` (or `model.generate(...)`), "
            "or pass model= explicitly"
        )
    roots = [e for e in envoys if is_wrapped(e) and isinstance(unwrap(e), nn.Module)]
    if len(roots) != 1:
        raise LatentMergeError(
            f"could not tell which model is being traced ({len(roots)} candidates); pass model="
        )
    return roots[0]


@contextlib.contextmanager
def quiet_hf_progress(quiet: bool = True) -> Any:
    """Hide transformers' own progress bars (loading, writing shards) inside the block when `quiet`:
    a command with its own bar, or run with --no-progress, shows none of them."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()
