"""Systems: a model setup to evaluate or serve, written down in a YAML file.

A system is one of four kinds, all generating through `lmn.generate`:

- ``latent``: the base model with sources mixed into its residual stream by a `Recipe`;
- ``weight``: base and sources merged in weight space (`baselines.weights`), then generated alone;
- ``ensemble``: the paper's logit ensemble of the base and one source (`baselines.ensemble`);
- ``single``: one model alone (the base, or a fine-tune named as ``base``).

Example (``examples/systems/toy-latent-slerp.yaml``)::

    name: toy-latent-slerp
    kind: latent
    base: toy-base
    sources: [toy-reasoner]
    recipe: {op: slerp, layers: {3: 0.5}}
    dtype: float32
    sampling: {max_new_tokens: 64}

`System.load()` gives a `LoadedSystem` whose `generate(prompts)` returns texts and whose
`complete(prompts)` also returns finish reasons and token counts. A merge source is loaded only up to
the recipe's highest layer (its upper blocks are never needed). All generation of one loaded system
runs in one worker thread behind one lock: an nnsight model must not be traced from two threads.
`complete_fn()` wraps it as the async judge callable, batching concurrent calls (`serve.batching`), and
`judgebench_accuracy_system` runs JudgeBench's official protocol with a system as the judge.
"""

import asyncio
import importlib
import importlib.metadata
import json
import math
import platform
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.ops import check_weight
from latent_merge_nnsight.recipe import Recipe

__all__ = [
    "KINDS",
    "Completion",
    "Ensemble",
    "LoadedSystem",
    "Sampling",
    "System",
    "WeightMerge",
    "judge_model_id",
    "judgebench_accuracy_system",
    "load_system",
]

KINDS: tuple[str, ...] = ("latent", "weight", "ensemble", "single")
FINISH_REASONS: tuple[str, ...] = ("stop", "length")
_VERSIONED_PACKAGES = ("torch", "transformers", "nnsight", "latent_merge_nnsight", "pydantic")


# ---------------------------------------------------------------------------------------------------
# The YAML schema
# ---------------------------------------------------------------------------------------------------


class Sampling(BaseModel):
    """How to decode: greedy by default; temperature / top-p / top-k sampling with a seed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(256, ge=1, description="tokens to generate at most per answer")
    do_sample: bool = Field(False, description="sample (True) or decode greedily (False)")
    temperature: float = Field(1.0, ge=0.0, description="softmax temperature when sampling (0 = greedy)")
    top_p: float = Field(
        1.0, gt=0.0, le=1.0, description="nucleus sampling: keep the top tokens up to this mass"
    )
    top_k: int = Field(0, ge=0, description="keep only the k most likely tokens (0: all)")
    seed: int | None = Field(None, ge=0, description="random seed for sampling (None: unseeded)")
    stop: list[str] = Field(
        default_factory=list,
        description="stop strings: a row ends after the first one (kept at the end of the text)",
    )

    @field_validator("temperature", "top_p")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError(f"{value} is not a finite number")
        return value

    @field_validator("stop")
    @classmethod
    def _nonempty_stops(cls, stop: list[str]) -> list[str]:
        if any(s == "" for s in stop):
            raise ValueError("stop strings must be non-empty")
        return stop

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `lmn.generate`; temperature 0 means greedy."""
        kwargs = self.model_dump()
        if kwargs["temperature"] == 0.0:
            kwargs["do_sample"] = False
            kwargs["temperature"] = 1.0
        return kwargs


class WeightMerge(BaseModel):
    """A weight-space merge of the base and its sources (`latent_merge_nnsight.baselines.weights`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str = Field("slerp", description="lerp, slerp, task_arithmetic or regmean")
    alpha: float = Field(0.5, description="weight of the source side (0 = base, 1 = source)")
    weights: list[float] | None = Field(None, description="per-source weights for several sources")
    out: str | None = Field(
        None, description="directory for the merged checkpoint; reused when it already holds one"
    )
    merge_dtype: str | None = Field(None, description="mergekit's compute dtype (e.g. float32)")
    merge_device: str = Field("cpu", description="where mergekit does the arithmetic (cpu, cuda)")
    allow_extrapolation: bool = Field(False, description="allow alpha outside [0, 1]")
    params: dict[str, Any] = Field(default_factory=dict, description="further method arguments (regmean)")

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        from latent_merge_nnsight.baselines.weights import WEIGHT_METHODS

        if method not in WEIGHT_METHODS:
            raise ValueError(
                f"{method!r} is not a weight-merge method; expected one of: {', '.join(WEIGHT_METHODS)}"
            )
        return method

    @model_validator(mode="after")
    def _alpha_range(self) -> "WeightMerge":
        check_weight(self.alpha, allow_extrapolation=self.allow_extrapolation)  # a ValueError for pydantic
        return self


class Ensemble(BaseModel):
    """The paper's logit ensemble `(1-b)*base + b*source` (`latent_merge_nnsight.baselines.ensemble`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    b: float | list[float] = Field(
        0.5, description="weight of the source's logits (0 = base alone), or one weight per generation step"
    )
    allow_extrapolation: bool = Field(False, description="allow b outside [0, 1]")

    @model_validator(mode="after")
    def _check(self) -> "Ensemble":
        self.build()
        return self

    def build(self) -> Any:
        """The `baselines.ensemble.Ensemble` that `lmn.generate` takes in place of a recipe."""
        from latent_merge_nnsight.baselines.ensemble import Ensemble as EnsembleSpec

        try:
            return EnsembleSpec(b=self.b, allow_extrapolation=self.allow_extrapolation)
        except LatentMergeError as exc:
            raise ValueError(str(exc)) from None


class System(BaseModel):
    """A model setup to generate with: which models, how they are combined, and how to decode."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="label of the system in responses, judgments and `/v1/models`")
    kind: Literal["latent", "weight", "ensemble", "single"] = Field(
        description="latent (recipe), weight (weight merge), ensemble (logit ensemble) or single (one model)"
    )
    base: str = Field(description="hub id, local directory (relative to the YAML file) or zoo name")
    sources: list[str] = Field(default_factory=list, description="fine-tuned models merged into the base")
    recipe: Recipe | None = Field(None, description="the latent merge (kind latent)")
    weight_merge: WeightMerge | None = Field(None, description="the weight merge (kind weight)")
    ensemble: Ensemble | None = Field(None, description="the logit ensemble (kind ensemble)")
    dtype: str = Field("auto", description="model dtype: auto, bfloat16, float16, float32, ...")
    device_map: str | dict[str, Any] | None = Field(None, description="passed to from_pretrained (e.g. auto)")
    quantization: Literal["4bit", "8bit"] | None = Field(None, description="bitsandbytes quantization")
    truncate_sources: bool = Field(
        True, description="load latent sources only up to the recipe's highest layer (saves memory)"
    )
    engine: Literal["auto", "fast", "nnsight"] | None = Field(
        None, description="lmn.generate engine: auto, fast or nnsight (None: lmn.generate's default)"
    )
    sampling: Sampling = Field(default_factory=Sampling, description="decoding settings")

    _base_dir: Path | None = PrivateAttr(default=None)

    @field_validator("name", "base")
    @classmethod
    def _nonempty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a non-empty string")
        return value

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, dtype: str) -> str:
        import torch

        if dtype != "auto" and not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(
                f"{dtype!r} is not a torch dtype; expected auto, bfloat16, float16, float32, ..."
            )
        return dtype

    @model_validator(mode="after")
    def _kind_fields(self) -> "System":
        parts = {"recipe": self.recipe, "weight_merge": self.weight_merge, "ensemble": self.ensemble}
        wanted = {"latent": "recipe", "weight": "weight_merge", "ensemble": "ensemble", "single": None}[
            self.kind
        ]
        extra = [k for k, v in parts.items() if v is not None and k != wanted]
        if extra:
            raise ValueError(f"kind={self.kind!r} takes no {', '.join(extra)}; remove it or change kind")
        if wanted is not None and parts[wanted] is None:
            raise ValueError(f"kind={self.kind!r} needs the field {wanted!r}")
        if self.kind == "single" and self.sources:
            raise ValueError(
                f"kind='single' runs one model, but sources={self.sources}; name the model as base"
            )
        if self.kind == "ensemble" and len(self.sources) != 1:
            raise ValueError(f"kind='ensemble' needs exactly one source, got sources={self.sources}")
        if self.kind == "weight" and not self.sources:
            raise ValueError("kind='weight' needs at least one source to merge into the base")
        if self.kind == "latent":
            assert self.recipe is not None
            if not self.sources and self.recipe.op != "delta":
                raise ValueError(f"kind='latent' with op {self.recipe.op!r} needs at least one source")
            if self.recipe.sources is not None and self.recipe.sources != self.sources:
                raise ValueError(
                    f"recipe.sources={self.recipe.sources} differs from sources={self.sources}; "
                    "give the sources once, in the system's sources field"
                )
        return self

    # ------------------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "system") -> "System":
        """Validate a mapping; errors name the field, the value received and what is expected."""
        if not isinstance(data, Mapping):
            raise LatentMergeError(f"{where}: a system must be a mapping, got {type(data).__name__}")
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            raise LatentMergeError(f"{where} is invalid:\n{_explain(exc)}") from None

    @classmethod
    def from_yaml(cls, text: str, *, base_dir: str | Path | None = None, where: str = "system") -> "System":
        """Parse YAML; relative model paths are resolved against ``base_dir`` when they exist there."""
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise LatentMergeError(f"{where} is not valid YAML: {exc}") from None
        system = cls.from_dict(data, where=where)
        system._base_dir = Path(base_dir) if base_dir is not None else None
        return system

    @classmethod
    def from_file(cls, path: str | Path) -> "System":
        """Read a system YAML file."""
        path = Path(path)
        if not path.is_file():
            raise LatentMergeError(f"system={str(path)!r} does not exist or is not a file")
        return cls.from_yaml(path.read_text(encoding="utf-8"), base_dir=path.parent, where=str(path))

    def to_dict(self) -> dict[str, Any]:
        """Every field that is set (None left out), JSON-able; the recipe in its own compact form."""
        data = self.model_dump(mode="json", exclude_none=True, by_alias=True)
        if self.recipe is not None:
            data["recipe"] = self.recipe.to_dict()
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml(), encoding="utf-8")

    def resolve(self, ref: str) -> str:
        """A model reference as `lmn.load` should see it: a path next to the YAML file wins."""
        if self._base_dir is not None and not Path(ref).is_absolute():
            candidate = self._base_dir / ref
            if candidate.exists():
                return str(candidate)
        return ref

    def source_up_to_layer(self, n_layers: int) -> int | None:
        """The highest layer a latent source must compute (None: the whole model)."""
        if self.kind != "latent" or not self.truncate_sources or self.recipe is None:
            return None
        top = max(self.recipe.layer_alphas(n_layers))
        return top if top < n_layers - 1 else None

    def load(self) -> "LoadedSystem":
        """Load the models (and build the weight merge) and return a `LoadedSystem`."""
        return LoadedSystem(self)


def _explain(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        if not err["loc"]:  # a check across fields: its message names them
            lines.append(f"  {msg}")
            continue
        loc = ".".join(str(p) for p in err["loc"])
        got = f" (got {err['input']!r:.80})" if "input" in err and err["type"] != "missing" else ""
        lines.append(f"  field {loc!r}: {msg}{got}")
    return "\n".join(lines)


def load_system(system: "str | Path | System | LoadedSystem") -> "LoadedSystem":
    """A `LoadedSystem` from a YAML path, a `System`, or one already loaded (returned as is)."""
    if isinstance(system, LoadedSystem):
        return system
    if isinstance(system, System):
        return system.load()
    if isinstance(system, str | Path):
        return System.from_file(system).load()
    raise LatentMergeError(
        f"system has type {type(system).__name__}; expected a YAML path, a System or a LoadedSystem"
    )


# ---------------------------------------------------------------------------------------------------
# A loaded system
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Completion:
    """One generated answer: its text, why it ended (``"stop"`` or ``"length"``) and token counts."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def _package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


class LoadedSystem:
    """A `System` with its models in memory, ready to generate.

    Attributes:
        config: the `System` it was loaded from.
        name: the system's name.
        base: the nnsight model that generates (the weight-merged model for kind ``weight``).
        sources: the source models (latent and ensemble kinds).
        tokenizer: the base model's tokenizer.
    """

    def __init__(self, config: System) -> None:
        from latent_merge_nnsight.models import load

        self.config = config
        self.name = config.name
        load_kwargs: dict[str, Any] = {"dtype": config.dtype}
        if config.device_map is not None:
            load_kwargs["device_map"] = config.device_map
        if config.quantization is not None:
            load_kwargs["quantization"] = config.quantization
        base_ref = config.resolve(config.base)
        source_refs = [config.resolve(s) for s in config.sources]
        self.sources: list[Any] = []
        if config.kind == "weight":
            assert config.weight_merge is not None
            self.base = _weight_merged(base_ref, source_refs, config.weight_merge, config, load_kwargs)
        else:
            self.base = load(base_ref, **load_kwargs)
        if config.kind in ("latent", "ensemble"):
            from latent_merge_nnsight.models import model_info

            up_to = config.source_up_to_layer(model_info(self.base).full_n_layers)
            extra = {"up_to_layer": up_to} if up_to is not None else {}
            self.sources = [load(ref, **load_kwargs, **extra) for ref in source_refs]
            recipe = config.recipe
            if recipe is not None and recipe.op == "delta" and not self.sources:
                if recipe.deltas is None:
                    raise LatentMergeError(
                        f"system {config.name!r}: op 'delta' without sources needs recipe.deltas "
                        "(a safetensors file from lmn.compute_deltas(...).save(path))"
                    )
                from latent_merge_nnsight.deltas import Deltas

                self.sources = [Deltas.load(config.resolve(recipe.deltas))]
        self.tokenizer = self.base.tokenizer
        self._counter = _token_counter(self.tokenizer)
        self._lock = threading.Lock()
        self._counter_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"lmn-{config.name}")
        self.generate_calls = 0

    def __repr__(self) -> str:
        return f"LoadedSystem(name={self.name!r}, kind={self.config.kind!r}, base={self.config.base!r})"

    # ------------------------------------------------------------------------------------------------

    @property
    def context_length(self) -> int | None:
        """The longest prompt the base model is meant for (config or tokenizer limit), if known."""
        from latent_merge_nnsight.models import hf_module

        limits = [getattr(hf_module(self.base).config, "max_position_embeddings", None)]
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tok_max, int) and tok_max < 10**7:  # transformers uses ~1e30 for "no limit"
            limits.append(tok_max)
        limits = [x for x in limits if isinstance(x, int) and x > 0]
        return min(limits) if limits else None

    def count_prompt_tokens(self, prompt: str | Sequence[Mapping[str, Any]]) -> int:
        """Tokens of one prompt as `generate` will see it (chat template applied to a chat).

        Safe to call from any thread while the model generates: it uses a private copy of the tokenizer.
        """
        from latent_merge_nnsight.inputs import is_chat

        if is_chat(prompt):
            text = self.tokenizer.apply_chat_template(
                list(prompt), add_generation_prompt=True, tokenize=False
            )
            special = False
        elif isinstance(prompt, str):
            text, special = prompt, True
        else:
            raise LatentMergeError(f"prompt has type {type(prompt).__name__}; expected a string or a chat")
        with self._counter_lock:
            return self._counter(text, special)

    def sampling(self, **overrides: Any) -> Sampling:
        """The system's sampling settings with ``overrides`` applied (validated)."""
        unknown = sorted(set(overrides) - set(Sampling.model_fields))
        if unknown:
            raise LatentMergeError(
                f"unknown sampling overrides {unknown}; expected some of {sorted(Sampling.model_fields)}"
            )
        try:
            return Sampling.model_validate(self.config.sampling.model_dump() | overrides)
        except ValidationError as exc:
            raise LatentMergeError(f"sampling overrides are invalid:\n{_explain(exc)}") from None

    def complete(self, prompts: Sequence[Any], **overrides: Any) -> list[Completion]:
        """Generate one answer per prompt (strings are used as is, chats get the chat template).

        ``overrides`` replace the system's sampling settings for this call (``max_new_tokens``,
        ``temperature``, ``seed``, ``stop``, ...). Thread-safe: calls run one at a time.
        """
        from latent_merge_nnsight.inputs import is_chat

        if isinstance(prompts, str) or is_chat(prompts):
            raise LatentMergeError(
                "prompts must be a list of prompts (strings or chats), not a single prompt"
            )
        prompts = list(prompts)
        if not prompts:
            return []
        sampling = self.sampling(**overrides)
        with self._lock:
            self.generate_calls += 1
            result = self._generate(prompts, sampling)
        texts, reasons = list(result.texts), list(result.finish_reasons)
        if len(texts) != len(prompts) or len(reasons) != len(prompts):
            raise RuntimeError(f"generate returned {len(texts)} texts for {len(prompts)} prompts")
        # prompt tokens: the real ones in the prompt columns; new tokens: each row's ids (with a final EOS)
        prompt_tokens = result.attention_mask[:, : result.prompt_width].sum(dim=-1).tolist()
        new_tokens = [len(t) for t in result.tokens]
        return [
            Completion(t, _finish_reason(r), int(p), n)
            for t, r, p, n in zip(texts, reasons, prompt_tokens, new_tokens, strict=True)
        ]

    def generate(self, prompts: Sequence[Any], **overrides: Any) -> list[str]:
        """The answer texts for `prompts` (see `complete` for finish reasons and token counts)."""
        return [c.text for c in self.complete(prompts, **overrides)]

    def _generate(self, prompts: list[Any], sampling: Sampling) -> Any:
        """One `lmn.generate` call in this system's mode."""
        from latent_merge_nnsight.generate import generate

        kwargs = sampling.generate_kwargs()
        if self.config.engine is not None:
            kwargs["engine"] = self.config.engine
        kind = self.config.kind
        if kind == "ensemble":
            assert self.config.ensemble is not None
            return generate(self.base, self.sources[0], prompts, self.config.ensemble.build(), **kwargs)
        if kind == "latent":
            sources = self.sources[0] if len(self.sources) == 1 else self.sources
            return generate(self.base, sources, prompts, self.config.recipe, **kwargs)
        return generate(self.base, None, prompts, None, **kwargs)

    # ------------------------------------------------------------------------------------------------

    def provenance(self) -> dict[str, Any]:
        """What produced an output: the system file's content, models, recipe, sampling, seed, versions."""
        from latent_merge_nnsight.models import model_info

        def describe(model: Any, ref: str | None) -> dict[str, Any]:
            if not hasattr(model, "_module") and not hasattr(model, "config"):  # e.g. steering Deltas
                return {"ref": ref, "type": type(model).__name__}
            info = model_info(model)
            return {"ref": ref, "n_layers": info.n_layers, "full_n_layers": info.full_n_layers}

        refs: list[str | None] = (
            list(self.config.sources) if self.config.kind in ("latent", "ensemble") else []
        )
        if self.config.recipe is not None and self.config.recipe.deltas is not None and not refs:
            refs = [self.config.recipe.deltas]
        return {
            "system": self.config.to_dict(),
            "name": self.name,
            "kind": self.config.kind,
            "models": {
                "base": self.config.base,
                "sources": list(self.config.sources),
                "loaded": [describe(self.base, self.config.base)]
                + [describe(m, r) for m, r in zip(self.sources, refs, strict=True)],
            },
            "recipe": self.config.recipe.to_dict() if self.config.recipe is not None else None,
            "weight_merge": self.config.weight_merge.model_dump() if self.config.weight_merge else None,
            "ensemble": self.config.ensemble.model_dump() if self.config.ensemble else None,
            "sampling": self.config.sampling.model_dump(),
            "seed": self.config.sampling.seed,
            "versions": _package_versions(),
        }

    # ------------------------------------------------------------------------------------------------

    def run_in_worker(self, fn: Callable[[], Any]) -> "asyncio.Future[Any]":
        """Run ``fn`` in this system's single generation thread (from a running event loop)."""
        return asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def complete_fn(self, *, max_batch_size: int = 8, max_wait_ms: float = 5.0, **overrides: Any) -> Any:
        """An async ``messages -> reply text`` callable (a judge's `CompleteFn`) that batches calls.

        Concurrent calls (e.g. `judgebench_accuracy` with ``concurrency=8``) are collected into one
        `generate` call of up to ``max_batch_size`` prompts. ``overrides`` set sampling for every call.
        """
        from latent_merge_nnsight.serve.batching import SystemCompleteFn

        self.sampling(**overrides)  # validate now, not on the first call
        return SystemCompleteFn(
            self, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, overrides=overrides
        )

    def close(self) -> None:
        """Stop the generation thread (the models stay in memory until the object is dropped)."""
        self._executor.shutdown(wait=True)


def _token_counter(tokenizer: Any) -> Callable[[str, bool], int]:
    """A token-counting function over a private copy of the tokenizer's backend (rebuilt from its JSON,
    so counting never touches the padding state that batched encoding sets on the shared tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        from tokenizers import Tokenizer

        private = Tokenizer.from_str(backend.to_str())
        private.no_padding()
        private.no_truncation()
        return lambda text, special: len(private.encode(text, add_special_tokens=special).ids)
    lock = threading.Lock()

    def count(text: str, special: bool) -> int:  # a slow tokenizer: serialise its use
        with lock:
            return len(tokenizer(text, add_special_tokens=special)["input_ids"])

    return count


def _finish_reason(reason: str) -> str:
    """`lmn.generate`'s "eos" / "stop" (a stop string) / "length" as OpenAI's "stop" / "length"."""
    return "length" if reason == "length" else "stop"


def _weight_merged(
    base_ref: str, source_refs: list[str], spec: WeightMerge, config: System, load_kwargs: dict[str, Any]
) -> Any:
    """Merge in weight space (mergekit or RegMean) and load the merged checkpoint like any model.

    With ``spec.out`` the checkpoint is kept there and reused by later loads; without it the merge goes
    to a temporary directory that is removed once the model is in memory.
    """
    import tempfile

    from latent_merge_nnsight.baselines.weights import merge_weights
    from latent_merge_nnsight.models import load

    def merge(out: Path) -> None:
        merge_weights(
            base_ref,
            source_refs,
            spec.method,
            spec.alpha,
            weights=spec.weights,
            out=out,
            load=False,
            dtype=spec.merge_dtype,
            device=spec.merge_device,
            allow_extrapolation=spec.allow_extrapolation,
            **spec.params,
        )

    if spec.out is not None:
        out = Path(spec.out)
        out = out if out.is_absolute() or config._base_dir is None else config._base_dir / out
        if not (out / "config.json").is_file():
            merge(out)
        return load(out, **load_kwargs)
    with tempfile.TemporaryDirectory(prefix="lmn-system-merge-") as scratch:
        merge(Path(scratch) / "merged")
        return load(Path(scratch) / "merged", **load_kwargs)


# ---------------------------------------------------------------------------------------------------
# A system as the judge of JudgeBench's official protocol (no API needed)
# ---------------------------------------------------------------------------------------------------


def judge_model_id(system: "LoadedSystem", overrides: Mapping[str, Any] | None = None) -> str:
    """``name-<hash>``: the system's name plus a hash of its settings, so a judgment cache never mixes
    judgments of two different setups that share a name."""
    import hashlib

    blob = json.dumps([system.config.to_dict(), dict(overrides or {})], sort_keys=True)
    return f"{system.name}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"


def judgebench_accuracy_system(
    pairs: Sequence[Any],
    system: "str | Path | System | LoadedSystem",
    template: Any,
    *,
    cache_path: str | Path | None = None,
    batch_size: int = 8,
    both_orders: bool = True,
    progress: bool = True,
    **overrides: Any,
) -> list[dict[str, Any]]:
    """JudgeBench's official protocol with a local system as the judge (`lmn judgebench-accuracy
    --judge-system`): returns records in JudgeBench's output format, for `official_accuracy`.

    Judge requests are batched ``batch_size`` at a time (twice that many are kept in flight so the next
    batch gathers while one generates). ``overrides`` set the judge's sampling (e.g. ``max_new_tokens``).
    """
    from latent_merge_nnsight.evaluation.judge import judgebench_accuracy_sync

    loaded = load_system(system)
    fn = loaded.complete_fn(max_batch_size=batch_size, **overrides)
    model_id = judge_model_id(loaded, overrides)
    return judgebench_accuracy_sync(
        pairs,
        fn,
        template,
        cache_path=cache_path,
        judge_model=model_id,
        judge_name=loaded.name,
        both_orders=both_orders,
        concurrency=2 * batch_size,
        progress=progress,
    )
