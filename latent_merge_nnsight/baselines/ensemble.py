"""The logit ensemble baseline (the paper's `ensemble_generate`).

Both models run in full on the same tokens, each with its own KV cache, and the next token is chosen
from `(1 - b) * logits_base + b * logits_source`. Pass an `Ensemble` where `lmn.generate` takes a
recipe; sampling, batching and stopping are those of every other run:

    out = lmn.generate(base, ft, prompts, Ensemble(b=0.5), max_new_tokens=64)
    out = lmn.generate(base, ft, prompts, Ensemble(b=[1.0, 0.75, 0.5]), max_new_tokens=64)  # per step
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from latent_merge_nnsight.errors import LatentMergeError

__all__ = ["Ensemble", "mix_logits"]

Schedule = float | Sequence[float] | Callable[[int], float]


def _check_b(b: object, allow_extrapolation: bool, what: str) -> float:
    if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b):
        raise LatentMergeError(
            f"{what}={b!r}; expected a finite number (0 keeps the base, 1 takes the source)"
        )
    if not allow_extrapolation and not 0.0 <= b <= 1.0:
        raise LatentMergeError(
            f"{what}={b} is outside [0, 1] (0 keeps the base, 1 takes the source); "
            "pass allow_extrapolation=True to extrapolate"
        )
    return float(b)


@dataclass(frozen=True)
class Ensemble:
    """Next-token logits `(1-b)*base + b*source`.

    Attributes:
        b: the source weight: a number; a list with one value per generation step (the last value holds
            for later steps); or a function `step -> b` (step 0 chooses the first new token).
        allow_extrapolation: allow weights outside [0, 1] (e.g. contrastive `b < 0`).
        name: a label for results tables.
    """

    b: Schedule = 0.5
    allow_extrapolation: bool = False
    name: str | None = None

    def __post_init__(self) -> None:
        if callable(self.b):
            return
        if isinstance(self.b, Sequence) and not isinstance(self.b, str):
            if len(self.b) == 0:
                raise LatentMergeError("b=[] is an empty schedule; give at least one weight")
            for i, v in enumerate(self.b):
                _check_b(v, self.allow_extrapolation, f"b[{i}]")
            return
        _check_b(self.b, self.allow_extrapolation, "b")

    def weight(self, step: int) -> float:
        """The source weight at generation step `step` (0-based)."""
        if callable(self.b):
            return _check_b(self.b(step), self.allow_extrapolation, f"b({step})")
        if isinstance(self.b, Sequence):
            return float(self.b[min(step, len(self.b) - 1)])
        return float(self.b)

    def __str__(self) -> str:
        b = "schedule" if callable(self.b) else self.b
        return f"Ensemble(b={b})"


def mix_logits(
    base: Float[Tensor, "batch vocab"], source: Float[Tensor, "batch vocab"], b: float
) -> Float[Tensor, "batch vocab"]:
    """`(1-b)*base + b*source` in float32 (b=0 returns the base logits exactly)."""
    base = base.float()
    if b == 0:
        return base
    return (1 - b) * base + b * source.to(base.device, torch.float32)
