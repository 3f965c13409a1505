"""Systems: a model setup to evaluate or serve, written down in a YAML file.

A system is one of four kinds, all generating through `lmn.generate`:

- ``latent``: the base model with sources mixed into its residual stream by a `Recipe`;
- ``weight``: base and sources merged in weight space (`baselines.weights`), then generated alone;
- ``ensemble``: the paper's logit ensemble of the base and one source (`lmn.Ensemble`);
- ``single``: one model alone (the base, or a fine-tune named as ``base``).

Example (``examples/systems/toy-latent-slerp.yaml``)::

    name: toy-latent-slerp
    kind: latent
    base: toy-base
    sources: [toy-reasoner]
    recipe: {op: slerp, layers: {3: 0.5}}
    dtype: float32
    sampling: {max_new_tokens: 64}

`systems.loaded.load_system(system)` gives a `LoadedSystem`: the models in memory, ready to generate
and to judge (this module never imports the loading side). The parts of a system are `SamplingSpec`,
`WeightMergeSpec` and `EnsembleSpec` (named so that they do not shadow the library's `lmn.Ensemble`;
`EnsembleSpec.build()` gives one).
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from latent_merge_nnsight.baselines.weights import WEIGHT_METHODS
from latent_merge_nnsight.ensemble import Ensemble
from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.ops import check_weight
from latent_merge_nnsight.recipe import Recipe
from latent_merge_nnsight.sampling import SamplingConfig
from latent_merge_nnsight.sampling_rules import check_sampling

__all__ = [
    "KINDS",
    "EnsembleSpec",
    "SamplingSpec",
    "System",
    "WeightMergeSpec",
    "explain_errors",
]

KINDS: tuple[str, ...] = ("latent", "weight", "ensemble", "single")

# ---------------------------------------------------------------------------------------------------
# The YAML schema
# ---------------------------------------------------------------------------------------------------


class SamplingSpec(BaseModel):
    """How to decode: greedy by default; temperature / top-p / top-k sampling with a seed (temperature 0
    is greedy, as everywhere: `SamplingConfig.greedy`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(256, description="tokens to generate at most per answer (>= 1)")
    do_sample: bool = Field(False, description="sample (True) or decode greedily (False)")
    temperature: float = Field(1.0, description="softmax temperature when sampling (0 = greedy)")
    top_p: float = Field(1.0, description="nucleus sampling: keep the top tokens up to this mass, in (0, 1]")
    top_k: int = Field(0, description="keep only the k most likely tokens (0: all)")
    seed: int | None = Field(None, description="random seed for sampling (None: unseeded)")
    stop: list[str] = Field(
        default_factory=list,
        description="stop strings: a row ends at the first one (left out of the text, as OpenAI does)",
    )
    sampler: Literal["default", "paper"] = Field(
        "default",
        description="top-p rule: 'default' keeps the token crossing top_p, 'paper' drops it (the seed's)",
    )

    @field_validator("max_new_tokens", "temperature", "top_p", "top_k", "seed")
    @classmethod
    def _the_sampling_rule(cls, value: float | None, info: ValidationInfo) -> float | None:
        """The one rule per setting (`sampling_rules.check_sampling`), as `lmn.generate` and the CLI."""
        return check_sampling(info.field_name, value)

    @field_validator("stop")
    @classmethod
    def _nonempty_stops(cls, stop: list[str]) -> list[str]:
        if any(s == "" for s in stop):
            raise ValueError("stop strings must be non-empty")
        return stop

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `lmn.generate`, a greedy choice spelled `do_sample=False`
        (`SamplingConfig.canonical`)."""
        kwargs = self.model_dump()
        config = SamplingConfig(
            self.do_sample, self.temperature, self.top_p, self.top_k, self.seed, self.sampler
        )
        canonical = config.canonical()
        kwargs.update(do_sample=canonical.do_sample, temperature=canonical.temperature)
        return kwargs


class WeightMergeSpec(BaseModel):
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
        if method not in WEIGHT_METHODS:
            raise ValueError(
                f"{method!r} is not a weight-merge method; expected one of: {', '.join(WEIGHT_METHODS)}"
            )
        return method

    @model_validator(mode="after")
    def _alpha_range(self) -> "WeightMergeSpec":
        check_weight(self.alpha, allow_extrapolation=self.allow_extrapolation)  # a ValueError for pydantic
        return self


class EnsembleSpec(BaseModel):
    """The paper's logit ensemble `(1-b)*base + b*source` (`latent_merge_nnsight.ensemble`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    b: float | list[float] = Field(
        0.5, description="weight of the source's logits (0 = base alone), or one weight per generation step"
    )
    allow_extrapolation: bool = Field(False, description="allow b outside [0, 1]")

    @model_validator(mode="after")
    def _check(self) -> "EnsembleSpec":
        self.build()
        return self

    def build(self) -> Ensemble:
        """The `lmn.Ensemble` that `lmn.generate` takes in place of a recipe."""
        try:
            return Ensemble(b=self.b, allow_extrapolation=self.allow_extrapolation)
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
    weight_merge: WeightMergeSpec | None = Field(None, description="the weight merge (kind weight)")
    ensemble: EnsembleSpec | None = Field(None, description="the logit ensemble (kind ensemble)")
    dtype: str = Field("auto", description="model dtype: auto, bfloat16, float16, float32, ...")
    device_map: str | dict[str, Any] | None = Field(None, description="passed to from_pretrained (e.g. auto)")
    quantization: Literal["4bit", "8bit"] | None = Field(None, description="bitsandbytes quantization")
    truncate_sources: bool = Field(
        True, description="load latent sources only up to the recipe's highest layer (saves memory)"
    )
    engine: Literal["auto", "fast", "nnsight"] | None = Field(
        None, description="lmn.generate engine: auto, fast or nnsight (None: lmn.generate's default)"
    )
    backend: Literal["hf", "vllm"] = Field(
        "hf",
        description="hf (our engines) or vllm (vLLM runs the merge: lmn.generate(engine='vllm'); latent and "
        "single systems only; needs the vllm extra)",
    )
    sampling: SamplingSpec = Field(default_factory=SamplingSpec, description="decoding settings")

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
        if self.backend == "vllm" and self.kind not in ("latent", "single"):
            raise ValueError(
                f"backend='vllm' runs kind 'latent' or 'single'; kind={self.kind!r} (a weight merge or a "
                "logit ensemble) runs on backend 'hf'"
            )
        if self.backend == "vllm" and self.engine is not None:
            raise ValueError(f"backend='vllm' generates with vLLM; remove engine={self.engine!r}")
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
    def from_dict(cls, data: object, *, where: str = "system") -> "System":
        """Validate a mapping; errors name the field, the value received and what is expected."""
        if not isinstance(data, Mapping):
            raise LatentMergeError(f"{where}: a system must be a mapping, got {type(data).__name__}")
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            raise LatentMergeError(f"{where} is invalid:\n{explain_errors(exc)}") from None

    @classmethod
    def from_yaml(cls, text: str, *, base_dir: str | Path | None = None, where: str = "system") -> "System":
        """Parse YAML; relative model paths are resolved against ``base_dir`` when they exist there."""
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise LatentMergeError(f"{where} is not valid YAML: {exc}") from None
        system = cls.from_dict(data, where=where)
        if system.recipe is not None and base_dir is not None:  # a relative `deltas` file beside the YAML
            system = system.model_copy(update={"recipe": system.recipe.located(base_dir)})
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
        if data.get("backend") == "hf":  # the default: left out, so records and hashes stay as they were
            del data["backend"]
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
        """The highest layer a latent source is loaded with (None: the whole model): the plan's rule
        (`Plan.load_up_to`), which the CLI's loads follow too."""
        if self.kind != "latent" or not self.truncate_sources or self.recipe is None:
            return None
        from latent_merge_nnsight.plan import recipe_plan  # (torch: only when a system is loaded)

        return recipe_plan(self.recipe, n_layers).load_up_to(n_layers)


def explain_errors(exc: ValidationError) -> str:
    """A pydantic validation error as one indented line per field, naming the field and what it got."""
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
