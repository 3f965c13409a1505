"""`Recipe`: a latent merge written down (op, layers and alphas, positions, site, op params).

Recipes are pydantic models that round-trip YAML and JSON exactly; every field's description is the
single source of help text for the CLI. Layers and alphas come in three forms:

- `layers: {20: 0.5, 22: 0.3}` — one alpha per layer;
- `layers: [18, 20], alpha: 0.5` — one alpha for all listed layers;
- `layers: all, alpha: [0, 0.5, 1]` — a mergekit-style gradient, piecewise linear over relative depth
  (layer i of n sits at i/(n-1)); a gradient also works with a list of layers.
"""

import json
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.ops import check_alpha, get_op

__all__ = ["Recipe"]


class Recipe(BaseModel):
    """How to merge sources into a base model: which op, where, and how much."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    op: str = Field("slerp", description="merge operator: lerp, slerp, regmean, delta, or a registered one")
    layers: dict[int, float] | list[int] | Literal["all"] = Field(
        description="layer -> alpha mapping; or a list of layers (or 'all') that share `alpha`"
    )
    alpha: float | list[float] | None = Field(
        None, description="alpha for a list of layers, or a gradient list over relative depth (0 = base)"
    )
    positions: Literal["last", "all"] | list[int] | None = Field(
        None, description="'last' (paper), 'all', or real-token indices; default depends on the op"
    )
    site: Literal["pre", "post"] = Field(
        "pre", description="'pre': residual entering block L (hidden_states[L]); 'post': leaving it"
    )
    lam: float | None = Field(
        None, alias="lambda", description="RegMean lambda: beta = 1/(1+lambda) (instead of alpha)"
    )
    weights: list[float] | None = Field(None, description="RegMean weights over sources (normalised)")
    sources: list[str] | None = Field(None, description="names or paths of the source models")
    deltas: str | None = Field(None, description="safetensors file of steering deltas (op delta)")
    allow_extrapolation: bool = Field(False, description="allow alphas outside [0, 1]")
    name: str | None = Field(None, description="a label for results tables")

    def located(self, folder: str | Path | None) -> "Recipe":
        """This recipe as read from a file in `folder`: a relative `deltas` path that names a file there
        becomes that file's path (so it is read next to the YAML file, not the working directory)."""
        if folder is None or self.deltas is None or Path(self.deltas).is_absolute():
            return self
        beside = Path(folder) / self.deltas
        return self.model_copy(update={"deltas": str(beside)}) if beside.exists() else self

    @field_validator("op")
    @classmethod
    def _known_op(cls, op: str) -> str:
        try:
            get_op(op)
        except LatentMergeError as e:
            raise ValueError(str(e)) from None
        return op

    @field_validator("layers")
    @classmethod
    def _layers_nonnegative(cls, layers: dict[int, float] | list[int] | Literal["all"]) -> Any:
        keys = list(layers) if not isinstance(layers, str) else []
        if not isinstance(layers, str) and not keys:
            raise ValueError("layers is empty; give at least one layer")
        bad = [k for k in keys if k < 0]
        if bad:
            raise ValueError(f"layers {bad} are negative; expected 0 <= layer < n_layers")
        if isinstance(layers, list) and len(set(layers)) != len(layers):
            raise ValueError(f"layers={layers} repeats a layer")
        return layers

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        spec = get_op(self.op)
        try:
            if isinstance(self.layers, dict):
                if self.alpha is not None:
                    raise LatentMergeError("give alphas either in the layers mapping or in alpha, not both")
                for layer, a in self.layers.items():
                    check_alpha(
                        a, spec, allow_extrapolation=self.allow_extrapolation, what=f"layers[{layer}]"
                    )
            else:
                if self.alpha is None and self.lam is None:
                    raise LatentMergeError(
                        "alpha is required when layers is a list or 'all' (or give lambda for regmean)"
                    )
                alphas = self.alpha if isinstance(self.alpha, list) else [self.alpha]
                if isinstance(self.alpha, list) and not alphas:
                    raise LatentMergeError("alpha gradient is empty; give at least one value")
                for i, a in enumerate(alphas):
                    check_alpha(a, spec, allow_extrapolation=self.allow_extrapolation, what=f"alpha[{i}]")
            if self.lam is not None:
                if spec.name != "regmean" and "lam" not in spec.params:
                    raise LatentMergeError(f"lambda applies to regmean, not to op {self.op!r}")
                if self.alpha is not None or isinstance(self.layers, dict):
                    raise LatentMergeError("give either alpha (beta) or lambda for regmean, not both")
                if not (math.isfinite(self.lam) and self.lam >= 0):
                    raise LatentMergeError(f"lambda={self.lam} must be finite and >= 0")
            if self.weights is not None and "weights" not in spec.params:
                raise LatentMergeError(
                    f"weights apply to multi-source ops such as regmean, not to {self.op!r}"
                )
        except LatentMergeError as e:
            raise ValueError(str(e)) from None
        return self

    # ------------------------------------------------------------------------------------------------

    def layer_alphas(self, n_layers: int) -> dict[int, float | None]:
        """Resolve to {layer: alpha} for a model of `n_layers` blocks (None alpha: the op's own default,
        e.g. RegMean's lambda)."""
        if isinstance(self.layers, dict):
            layers = sorted(self.layers)
        elif self.layers == "all":
            layers = list(range(n_layers))
        else:
            layers = sorted(self.layers)
        out_of_range = [layer for layer in layers if layer >= n_layers]
        if out_of_range:
            raise LatentMergeError(
                f"recipe field 'layers': {out_of_range} out of range for a model with {n_layers} layers; "
                f"expected 0 <= layer < {n_layers}",
                param="layers",
                value=out_of_range,
                expected=f"0 <= layer < {n_layers}",
            )
        if isinstance(self.layers, dict):
            return {layer: float(self.layers[layer]) for layer in layers}
        if self.alpha is None:
            return {layer: None for layer in layers}
        if isinstance(self.alpha, list):
            anchors = np.linspace(0.0, 1.0, len(self.alpha))
            depth = lambda layer: layer / (n_layers - 1) if n_layers > 1 else 0.0  # noqa: E731
            return {layer: float(np.interp(depth(layer), anchors, self.alpha)) for layer in layers}
        return {layer: float(self.alpha) for layer in layers}

    def op_params(self) -> dict[str, Any]:
        """Keyword parameters for the op (RegMean's `lam` and `weights`)."""
        params: dict[str, Any] = {}
        if self.lam is not None:
            params["lam"] = self.lam
        if self.weights is not None:
            params["weights"] = self.weights
        return params

    def resolved_positions(self) -> Any:
        return self.positions if self.positions is not None else get_op(self.op).default_positions

    # ------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_defaults=True, mode="json") | {"op": self.op}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        return cls.model_validate(json.loads(text))

    @classmethod
    def from_yaml(cls, text: str) -> "Recipe":
        data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise LatentMergeError(f"a recipe must be a YAML mapping, got {type(data).__name__}")
        return cls.model_validate(data)

    @classmethod
    def from_file(cls, path: str | Path) -> "Recipe":
        """Read a `.yaml`/`.yml` or `.json` recipe file."""
        path = Path(path)
        text = path.read_text()
        recipe = cls.from_json(text) if path.suffix == ".json" else cls.from_yaml(text)
        return recipe.located(path.parent)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.write_text(self.to_json() if path.suffix == ".json" else self.to_yaml())

    def __str__(self) -> str:
        layers = self.layers if not isinstance(self.layers, dict) else dict(sorted(self.layers.items()))
        alpha = f", alpha={self.alpha}" if self.alpha is not None else ""
        lam = f", lambda={self.lam}" if self.lam is not None else ""
        where = f"site={self.site!r}, positions={self.resolved_positions()!r}"
        return f"Recipe(op={self.op!r}, layers={layers}{alpha}{lam}, {where})"
