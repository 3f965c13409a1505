"""Weight-merge baselines: the static, parameter-space counterparts of the latent merges.

    merged = merge_weights("toy-base", "toy-reasoner", method="slerp", alpha=0.5).model
    out = lmn.generate(merged, None, prompts, max_new_tokens=64)   # the merged model alone

`alpha` means what it means for the latent ops: 0 gives the base's weights, 1 the source's.

- `lerp`: mergekit `linear` with weights `[1-alpha, alpha]` (bit-exact at 0 and 1).
- `slerp`: mergekit `slerp` with `t=alpha` and the base as `base_model` (mergekit slerps each tensor as
  one flattened vector and falls back to linear for nearly parallel tensors).
- `task_arithmetic`: mergekit `task_arithmetic`, `base + alpha * sum_i w_i (source_i - base)` (w_i default 1).
- `regmean`: RegMean (Jin et al. 2023), written here because mergekit has no such method: each `nn.Linear`
  weight is solved from the Gram matrices of its inputs, collected with nnsight on calibration prompts;
  every other tensor is averaged with the same coefficients. See `regmean_math.py` for the math.

mergekit works on checkpoints on disk: zoo names and local directories are used in place, in-memory
models are saved to a scratch directory first, and hub ids are handed to mergekit as they are (it
downloads them). Nothing here asks for remote code.
"""

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import torch
import transformers
from jaxtyping import Float
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from latent_merge_nnsight._nnsight import out_of_order_error
from latent_merge_nnsight.baselines.regmean_math import check_coefficients, regmean_state_dict
from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.inputs import encode
from latent_merge_nnsight.models import check_compatible, hf_module, load, model_info, wrap
from latent_merge_nnsight.nouns import Model, Prompts
from latent_merge_nnsight.ops import check_weight
from latent_merge_nnsight.zoo import ZOO, zoo_path

if TYPE_CHECKING:
    from mergekit.config import MergeConfiguration

__all__ = [
    "WEIGHT_METHODS",
    "Grams",
    "WeightMerge",
    "collect_grams",
    "linear_names",
    "merge_weights",
    "mergekit_config",
    "regmean_weights",
]

ModelRef: TypeAlias = Model | str | Path
"""A model to merge: a zoo name, a checkpoint directory or hub id, or a loaded model."""

WEIGHT_METHODS: tuple[str, ...] = ("lerp", "slerp", "task_arithmetic", "regmean")


@dataclass
class WeightMerge:
    """A weight-merged model.

    Attributes:
        method: one of `WEIGHT_METHODS`.
        alpha: weight of the source side (0 = base).
        model: the merged model wrapped for nnsight (None when `load=False`).
        path: the checkpoint directory written (None when merged without `out=`).
        config: the mergekit YAML, or a one-line description for RegMean.
    """

    method: str
    alpha: float
    model: Any = None
    path: Path | None = None
    config: str = ""

    @property
    def name(self) -> str:
        return f"weight-{self.method}(alpha={self.alpha:g})"


# ---------------------------------------------------------------------------------------------------
# Arguments


def _check_method(method: str) -> str:
    if method not in WEIGHT_METHODS:
        raise LatentMergeError(
            f"method={method!r} is not a weight-merge method; expected one of: {', '.join(WEIGHT_METHODS)}"
        )
    return method


def _as_list(sources: ModelRef | Sequence[ModelRef]) -> list[ModelRef]:
    items = list(sources) if isinstance(sources, (list, tuple)) else [sources]
    if not items:
        raise LatentMergeError("sources is empty; expected at least one fine-tuned model")
    return items


def _source_weights(weights: Sequence[float] | None, n: int, *, normalise: bool) -> list[float]:
    if weights is None:
        return [1.0 / n if normalise else 1.0] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise LatentMergeError(f"weights has {len(w)} entries for {n} sources; expected {n}")
    if any(not torch.isfinite(torch.tensor(x)) or x < 0 for x in w) or sum(w) <= 0:
        raise LatentMergeError(f"weights={w} must be finite, non-negative and not all zero")
    return [x / sum(w) for x in w] if normalise else w


def _checkpoint(model: ModelRef, scratch: Path, index: int) -> str:
    """A directory (or hub id) mergekit can read for `model`: zoo names and paths as they are, in-memory
    models saved to `scratch`."""
    if isinstance(model, (str, Path)):
        name = str(model)
        if Path(name).exists():
            return str(Path(name).resolve())
        return str(zoo_path(name)) if name in ZOO else name
    module = hf_module(model)
    if model_info(model).truncated:
        raise LatentMergeError(
            f"model {model_info(model).name} is loaded only up to a layer; weight merging needs every layer"
        )
    folder = scratch / f"model{index}"
    module.save_pretrained(folder)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return str(folder)


def _load_dir(path: Path, name: str) -> Any:
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return wrap(hf_model, tokenizer, name=name)


# ---------------------------------------------------------------------------------------------------
# mergekit methods


def mergekit_config(
    base: str,
    sources: Sequence[str],
    method: str,
    alpha: float,
    *,
    weights: Sequence[float] | None = None,
    dtype: str | None = None,
) -> Any:
    """The `mergekit.config.MergeConfiguration` of a lerp/slerp/task-arithmetic merge of checkpoints.

    Arguments:
        base, sources: checkpoint directories (or hub ids).
        method: "lerp" (mergekit linear), "slerp" or "task_arithmetic".
        alpha: 0 = base. lerp: the sources get `alpha * w_i` (w normalised), the base `1 - alpha`;
            slerp: mergekit's `t`; task arithmetic: mergekit's `lambda`.
        weights: per-source weights (lerp: normalised; task arithmetic: as given, default 1 each).
        dtype: mergekit's compute dtype ("float32", ...); None keeps mergekit's default.
    """
    from mergekit.config import MergeConfiguration

    sources = list(sources)
    # a mapping, not a string: mergekit reads "a+b" in a string as model+LoRA and "a@b" as a revision
    ref = lambda path: {"model": {"path": str(path)}}  # noqa: E731
    data: dict[str, Any]
    if method == "lerp":
        w = _source_weights(weights, len(sources), normalise=True)
        models = [{"model": ref(base), "parameters": {"weight": 1.0 - alpha}}]
        models += [
            {"model": ref(s), "parameters": {"weight": alpha * wi}} for s, wi in zip(sources, w, strict=True)
        ]
        data = {"merge_method": "linear", "models": models, "parameters": {"normalize": False}}
    elif method == "slerp":
        if len(sources) != 1:
            raise LatentMergeError(
                f"slerp merges exactly one source into the base; got {len(sources)} sources"
            )
        if weights is not None:
            raise LatentMergeError("weights apply to lerp, task_arithmetic and regmean, not to slerp")
        data = {
            "merge_method": "slerp",
            "base_model": ref(base),
            "models": [{"model": ref(base)}, {"model": ref(sources[0])}],
            "parameters": {"t": alpha},
        }
    elif method == "task_arithmetic":
        w = _source_weights(weights, len(sources), normalise=False)
        data = {
            "merge_method": "task_arithmetic",
            "base_model": ref(base),
            "models": [
                {"model": ref(s), "parameters": {"weight": wi}} for s, wi in zip(sources, w, strict=True)
            ],
            "parameters": {"lambda": alpha, "normalize": False},
        }
    else:
        raise LatentMergeError(
            f"method={method!r} is not a mergekit method here; expected one of: lerp, slerp, task_arithmetic"
        )
    if dtype is not None:
        data["dtype"] = dtype
    return MergeConfiguration.model_validate(data)


def _run_mergekit(config: "MergeConfiguration", out: Path, device: str) -> None:
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(
        device=device,
        copy_tokenizer=True,
        trust_remote_code=False,
        write_model_card=False,
        safe_serialization=True,
        quiet=True,
    )
    run_merge(config, str(out), options)


# ---------------------------------------------------------------------------------------------------
# RegMean


def linear_names(model: Model) -> list[str]:
    """Names of the `nn.Linear` modules whose weight RegMean solves, in module order (which is their
    execution order in the supported architectures). An output head tied to the input embeddings is
    left out: it is the embedding matrix, and is averaged as one."""
    module = hf_module(model)
    embed = module.get_input_embeddings()
    tied = embed.weight if embed is not None else None
    return [
        name
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear) and (tied is None or m.weight is not tied)
    ]


@dataclass
class Grams:
    """Per module: the sum over real calibration tokens of `x x^T` for the module's input `x`."""

    grams: dict[str, Float[Tensor, "d_in d_in"]]
    n_tokens: int
    metadata: dict[str, str] = field(default_factory=dict)

    def mean(self) -> dict[str, Float[Tensor, "d_in d_in"]]:
        """Gram matrices per calibration token (so the size of a calibration set is no hidden weight)."""
        return {k: g / self.n_tokens for k, g in self.grams.items()}

    def save(self, path: str | Path) -> None:
        """Write to a safetensors file (no pickle)."""
        tensors = {k: g.contiguous() for k, g in self.grams.items()}
        save_file(tensors, str(path), metadata={"format": "lmn.grams.v1", "n_tokens": str(self.n_tokens)})

    @classmethod
    def load(cls, path: str | Path) -> "Grams":
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "lmn.grams.v1":
                raise LatentMergeError(f"{path} is not a Gram file (format={meta.get('format')!r})")
            grams = {k: f.get_tensor(k) for k in f.keys()}
        return cls(grams, int(meta["n_tokens"]))


def _envoy(model: Model, name: str) -> Any:
    envoy = model
    for part in name.split("."):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    return envoy


def collect_grams(
    model: Model,
    calibration: Prompts,
    *,
    names: Sequence[str] | None = None,
    batch_size: int = 8,
) -> Grams:
    """Gram matrices `X^T X` of each linear layer's inputs over the real tokens of `calibration`.

    One nnsight trace per batch reads `.input` of every module in `names` (default `linear_names`), in
    execution order, adds `x^T x` over non-pad positions (float64 on CPU, float32 elsewhere, summed on
    the CPU in float64), and stops the forward after the last one.

    Arguments:
        model: an nnsight model from `lmn.load` / `lmn.wrap`.
        calibration: prompts in any form `lmn.inputs.encode` accepts (strings, chats, token ids).
        names: module names (default: every `nn.Linear` except a tied output head).
        batch_size: prompts per forward.
    """
    if batch_size < 1:
        raise LatentMergeError(f"batch_size={batch_size}; expected >= 1")
    names = list(linear_names(model) if names is None else names)
    if not names:
        raise LatentMergeError("names is empty; expected at least one nn.Linear module name")
    module = hf_module(model)
    known = dict(module.named_modules())
    bad = [n for n in names if not isinstance(known.get(n), nn.Linear)]
    if bad:
        raise LatentMergeError(f"names {bad[:5]} are not nn.Linear modules of {model_info(model).name}")
    batch = encode(getattr(model, "tokenizer", None), calibration)
    device = next(module.parameters()).device
    wd = torch.float64 if device.type == "cpu" else torch.float32
    sums: dict[str, Tensor] = {}
    n_tokens = 0
    for start in range(0, batch.input_ids.shape[0], batch_size):
        ids = batch.input_ids[start : start + batch_size].to(device)
        mask = batch.attention_mask[start : start + batch_size].to(device)
        real = mask.bool()
        n_tokens += int(real.sum())
        try:
            with torch.no_grad(), model.trace(input_ids=ids, attention_mask=mask) as tracer:
                for name in names:
                    x = _envoy(model, name).input[real].to(wd)
                    g = (x.T @ x).to("cpu", torch.float64)
                    sums[name] = sums[name] + g if name in sums else g
                tracer.stop()
        except out_of_order_error() as e:
            raise LatentMergeError(
                f"names must follow the order in which the modules run; nnsight said: {e}"
            ) from None
    return Grams(sums, n_tokens, {"model": model_info(model).name})


def _as_model(model: ModelRef) -> Model:
    if isinstance(model, (str, Path)):
        return load(model, dtype="auto")
    if model_info(model).truncated:
        raise LatentMergeError(
            f"model {model_info(model).name} is loaded only up to a layer; weight merging needs every layer"
        )
    return model if hasattr(model, "trace") else wrap(model, getattr(model, "tokenizer", None))


def _collect_all_grams(
    models: list[Model],
    calibration: Prompts | None,
    source_calibration: Sequence[Prompts] | None,
    names: list[str],
    batch_size: int,
) -> list[Grams]:
    """Each model's Gram matrices over its calibration prompts (the base's for every source by default)."""
    if calibration is None:
        raise LatentMergeError("calibration is required to collect Gram matrices (or pass grams=)")
    n_sources = len(models) - 1
    cals = [calibration] * n_sources if source_calibration is None else list(source_calibration)
    if len(cals) != n_sources:
        raise LatentMergeError(
            f"source_calibration has {len(cals)} entries for {n_sources} sources; expected one per source"
        )
    return [
        collect_grams(m, cal, names=names, batch_size=batch_size)
        for m, cal in zip(models, [calibration, *cals], strict=True)
    ]


def regmean_weights(
    base: ModelRef,
    sources: ModelRef | Sequence[ModelRef],
    calibration: Prompts | None = None,
    alpha: float = 0.5,
    *,
    weights: Sequence[float] | None = None,
    source_calibration: Sequence[Prompts] | None = None,
    grams: Sequence[Grams] | None = None,
    off_diagonal: float = 0.9,
    ridge: float = 1e-6,
    out: str | Path | None = None,
    load: bool = True,
    batch_size: int = 8,
) -> WeightMerge:
    """RegMean-merge `sources` into `base` in weight space (Jin et al. 2023).

    Each model's Gram matrices come from its own forward over calibration prompts (`calibration` for the
    base, `source_calibration[i]` for source i, default the same prompts), divided by its token count.
    The model coefficients are `[1 - alpha, alpha * w_1, ...]` (w normalised): alpha 0 gives the base,
    1 the sources, and 0.5 with one source the paper's RegMean.

    Arguments:
        base, sources: zoo names, checkpoint directories or loaded models (one source or a list).
        calibration: prompts for the base's Gram matrices (any form `lmn.inputs.encode` accepts).
        grams: precomputed `Grams`, one per model (base first); skips the collection.
        off_diagonal: the paper's alpha, the factor on off-diagonal Gram entries (1 = plain RegMean).
        ridge: relative ridge on each Gram's diagonal.
        out: directory to write the merged checkpoint (with the base's tokenizer) to.
        load: return the merged model wrapped for nnsight in `.model`.
    """
    alpha = check_weight(alpha, allow_extrapolation=True)
    if not 0.0 <= alpha <= 1.0:
        raise LatentMergeError(
            f"alpha={alpha} is outside [0, 1]; weight RegMean weighs each model's Gram matrices by "
            "1 - alpha and alpha, which must be non-negative (use task_arithmetic to extrapolate)"
        )
    if out is None and not load:
        raise LatentMergeError("out=None and load=False leave nothing to return; give out= or load=True")
    base_model = _as_model(base)
    source_models = [_as_model(s) for s in _as_list(sources)]
    for s in source_models:
        check_compatible(base_model, s)
    models = [base_model, *source_models]
    w = _source_weights(weights, len(source_models), normalise=True)
    coeffs = check_coefficients([1.0 - alpha, *(alpha * wi for wi in w)], len(models))
    names = linear_names(base_model)
    if grams is None:
        grams = _collect_all_grams(models, calibration, source_calibration, names, batch_size)
    if len(grams) != len(models):
        raise LatentMergeError(
            f"grams has {len(grams)} entries for {len(models)} models (base first); expected one each"
        )
    means = [g.mean() for g in grams]
    per_module = {name: [m[name] for m in means] for name in names}
    state_dicts = [hf_module(m).state_dict() for m in models]
    merged_sd = regmean_state_dict(state_dicts, per_module, coeffs, off_diagonal=off_diagonal, ridge=ridge)
    base_hf = hf_module(base_model)
    merged = transformers.AutoModelForCausalLM.from_config(base_hf.config).to(base_hf.dtype).eval()
    merged.load_state_dict(merged_sd)
    result = WeightMerge(
        "regmean",
        alpha,
        config=f"regmean alpha={alpha:g} off_diagonal={off_diagonal:g} ridge={ridge:g} "
        f"coeffs={[round(c, 6) for c in coeffs]} modules={len(names)}",
    )
    tokenizer = getattr(base_model, "tokenizer", None)
    if out is not None:
        result.path = Path(out)
        merged.save_pretrained(result.path)
        if tokenizer is not None:
            tokenizer.save_pretrained(result.path)
    if load:
        result.model = wrap(merged, tokenizer, name=result.name)
    return result


# ---------------------------------------------------------------------------------------------------
# Entry point


def merge_weights(
    base: ModelRef,
    sources: ModelRef | Sequence[ModelRef],
    method: str = "lerp",
    alpha: float = 0.5,
    *,
    weights: Sequence[float] | None = None,
    out: str | Path | None = None,
    load: bool = True,
    dtype: str | None = None,
    device: str = "cpu",
    allow_extrapolation: bool = False,
    **regmean: object,
) -> WeightMerge:
    """Merge `sources` into `base` in parameter space; `alpha=0` is the base, `alpha=1` the source(s).

    Arguments:
        base, sources: zoo names, checkpoint directories, hub ids, or loaded models (one or a list).
        method: "lerp", "slerp", "task_arithmetic" (through mergekit) or "regmean" (see `regmean_weights`,
            which takes the extra keyword arguments: `calibration`, `grams`, `off_diagonal`, ...).
        weights: per-source weights for several sources.
        out: directory for the merged checkpoint; None merges in a temporary directory that is removed
            once the model is loaded (then `path` is None).
        load: load the merged model (wrapped for nnsight) into `.model`.
        dtype: mergekit's compute dtype (e.g. "float32"); None keeps mergekit's default.
        device: where mergekit does the arithmetic ("cpu", "cuda").
        allow_extrapolation: allow alpha outside [0, 1] (lerp, slerp, task arithmetic; not regmean).
    """
    method = _check_method(method)
    if method == "regmean":
        return regmean_weights(base, sources, alpha=alpha, weights=weights, out=out, load=load, **regmean)
    if regmean:
        raise LatentMergeError(
            f"unexpected arguments {sorted(regmean)} for method={method!r}; they apply to regmean"
        )
    alpha = check_weight(alpha, allow_extrapolation=allow_extrapolation)
    if out is None and not load:
        raise LatentMergeError("out=None and load=False leave nothing to return; give out= or load=True")
    items = _as_list(sources)
    with tempfile.TemporaryDirectory(prefix="lmn-merge-") as scratch:
        base_dir = _checkpoint(base, Path(scratch), 0)
        source_dirs = [_checkpoint(s, Path(scratch), i + 1) for i, s in enumerate(items)]
        config = mergekit_config(base_dir, source_dirs, method, alpha, weights=weights, dtype=dtype)
        target = Path(out) if out is not None else Path(scratch) / "merged"
        _run_mergekit(config, target, device)
        result = WeightMerge(
            method, alpha, path=Path(out) if out is not None else None, config=config.to_yaml()
        )
        if load:
            result.model = _load_dir(target, result.name)
    return result
