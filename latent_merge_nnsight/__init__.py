"""latent_merge_nnsight: compose a base LLM with its fine-tunes in representation space, as nnsight
interventions.

    import latent_merge_nnsight as lmn
    base, ft = lmn.load("toy-base"), lmn.load("toy-reasoner")
    ft_trace = lmn.capture(ft, prompt, layers=[4])
    with base.trace(prompt):
        lmn.merge_into(layer=4, source=ft_trace, op="slerp", alpha=0.5)
        logits = base.lm_head.output.save()

The public names and the submodules (`lmn.metrics`, `lmn.ops`, `lmn.analysis`, ...) are imported on first
use (a module `__getattr__`), so `import latent_merge_nnsight` and `lmn --help` do not import torch;
`from latent_merge_nnsight import generate` works as usual.
"""

import importlib
import pkgutil
from typing import TYPE_CHECKING, Any

from latent_merge_nnsight import _nnsight  # noqa: F401  (first: anyio must survive nnsight's .save mount)
from latent_merge_nnsight.errors import LatentMergeError as LatentMergeError

if TYPE_CHECKING:
    from latent_merge_nnsight.analysis import representations as representations
    from latent_merge_nnsight.analysis import sweep as sweep
    from latent_merge_nnsight.deltas import Deltas as Deltas
    from latent_merge_nnsight.deltas import compute_deltas as compute_deltas
    from latent_merge_nnsight.ensemble import Ensemble as Ensemble
    from latent_merge_nnsight.generation import GenerationResult as GenerationResult
    from latent_merge_nnsight.generation import generate as generate
    from latent_merge_nnsight.generation.score import ScoreResult as ScoreResult
    from latent_merge_nnsight.generation.score import score as score
    from latent_merge_nnsight.lockstep import pair as pair
    from latent_merge_nnsight.merge import merge_into as merge_into
    from latent_merge_nnsight.models import check_compatible as check_compatible
    from latent_merge_nnsight.models import load as load
    from latent_merge_nnsight.models import wrap as wrap
    from latent_merge_nnsight.ops import list_ops as list_ops
    from latent_merge_nnsight.ops import register_op as register_op
    from latent_merge_nnsight.recipe import Recipe as Recipe
    from latent_merge_nnsight.residuals import Capture as Capture
    from latent_merge_nnsight.residuals import capture as capture
    from latent_merge_nnsight.sites import register_architecture as register_architecture

__version__ = "0.1.0"

_LAZY: dict[str, tuple[str, str]] = {
    # public name: (module, attribute of it)
    "representations": ("latent_merge_nnsight.analysis", "representations"),
    "sweep": ("latent_merge_nnsight.analysis", "sweep"),
    "Ensemble": ("latent_merge_nnsight.ensemble", "Ensemble"),
    "Capture": ("latent_merge_nnsight.residuals", "Capture"),
    "capture": ("latent_merge_nnsight.residuals", "capture"),
    "Deltas": ("latent_merge_nnsight.deltas", "Deltas"),
    "compute_deltas": ("latent_merge_nnsight.deltas", "compute_deltas"),
    "GenerationResult": ("latent_merge_nnsight.generation", "GenerationResult"),
    "generate": ("latent_merge_nnsight.generation", "generate"),
    "merge_into": ("latent_merge_nnsight.merge", "merge_into"),
    "check_compatible": ("latent_merge_nnsight.models", "check_compatible"),
    "load": ("latent_merge_nnsight.models", "load"),
    "wrap": ("latent_merge_nnsight.models", "wrap"),
    "list_ops": ("latent_merge_nnsight.ops", "list_ops"),
    "register_op": ("latent_merge_nnsight.ops", "register_op"),
    "pair": ("latent_merge_nnsight.lockstep", "pair"),
    "Recipe": ("latent_merge_nnsight.recipe", "Recipe"),
    "ScoreResult": ("latent_merge_nnsight.generation.score", "ScoreResult"),
    "score": ("latent_merge_nnsight.generation.score", "score"),
    "register_architecture": ("latent_merge_nnsight.sites", "register_architecture"),
}


_SUBMODULES = frozenset(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def __getattr__(name: str) -> Any:
    """Import a public name, or a submodule (`lmn.metrics`), on first use and keep it in the namespace."""
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBMODULES})


__all__ = [
    "Capture",
    "Deltas",
    "Ensemble",
    "GenerationResult",
    "LatentMergeError",
    "Recipe",
    "ScoreResult",
    "capture",
    "check_compatible",
    "compute_deltas",
    "generate",
    "list_ops",
    "load",
    "merge_into",
    "pair",
    "register_architecture",
    "register_op",
    "representations",
    "score",
    "sweep",
    "wrap",
]
