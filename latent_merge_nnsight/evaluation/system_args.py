"""A `System` from the arguments an evaluation harness passes: a YAML path, or a base, sources and a recipe
file, with engine, dtype and device overrides (lm-eval's `model_args`, Inspect's `-M` model args)."""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.recipe import Recipe
from latent_merge_nnsight.systems.spec import System, explain_errors

__all__ = ["ENGINES", "system_from_args"]

ENGINES = ("auto", "fast", "nnsight", "vllm")
"""`engine=` values: the system's engine, or vllm (the system's backend becomes vllm)."""


def system_from_args(
    system: str | Path | None = None,
    base: str | None = None,
    source: str | Sequence[str] | None = None,
    recipe: str | Path | None = None,
    *,
    engine: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
) -> System:
    """The `System` that `model_args` name: a YAML file, or a base, sources and a recipe file."""
    sources = [source] if isinstance(source, str) else list(source or [])
    if system is not None:
        if base is not None or sources or recipe is not None:
            raise LatentMergeError("model_args: give system=PATH, or base=, source= and recipe=, not both")
        config = System.from_file(system)
    elif base is not None:
        if sources and recipe is None:
            raise LatentMergeError("model_args: source= needs recipe=PATH (a recipe YAML) to merge with")
        try:
            config = System(
                name=f"{base}+{'+'.join(sources)}" if sources else str(base),
                kind="latent" if sources else "single",
                base=str(base),
                sources=sources,
                recipe=Recipe.from_file(recipe) if sources else None,
            )
        except ValidationError as exc:
            raise LatentMergeError(f"model_args do not make a system:\n{explain_errors(exc)}") from None
    else:
        raise LatentMergeError("model_args: expected system=PATH (a system YAML) or base=MODEL")
    update: dict[str, Any] = {}
    if engine is not None:
        if engine not in ENGINES:
            raise LatentMergeError(f"model_args engine={engine!r}; expected one of {', '.join(ENGINES)}")
        update = {"backend": "vllm"} if engine == "vllm" else {"engine": engine}
    if dtype is not None:
        update["dtype"] = str(dtype)
    if device is not None:
        update["device_map"] = str(device)
    if not update:
        return config
    try:  # validated again, and keeping the YAML's directory for relative paths
        merged = System.model_validate(config.model_dump() | update)
    except ValidationError as exc:
        raise LatentMergeError(f"model_args:\n{explain_errors(exc)}") from None
    merged._base_dir = config._base_dir
    return merged
