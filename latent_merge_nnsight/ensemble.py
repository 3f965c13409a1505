"""The logit ensemble baseline (the paper's `ensemble_generate`).

Both models run in full on the same tokens, each with its own KV cache, and the next token is chosen
from `(1 - b) * logits_base + b * logits_source`. Pass an `Ensemble` where `lmn.generate` takes a
recipe; sampling, batching and stopping are those of every other run:

    out = lmn.generate(base, ft, prompts, Ensemble(b=0.5), max_new_tokens=64)
    out = lmn.generate(base, ft, prompts, Ensemble(b=[1.0, 0.75, 0.5]), max_new_tokens=64)  # per step
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.ops import check_weight

__all__ = ["Ensemble", "mix_logits"]

Schedule = float | Sequence[float] | Callable[[int], float]


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
                check_weight(v, allow_extrapolation=self.allow_extrapolation, what=f"b[{i}]")
            return
        check_weight(self.b, allow_extrapolation=self.allow_extrapolation, what="b")

    def weight(self, step: int) -> float:
        """The source weight at generation step `step` (0-based)."""
        if callable(self.b):
            return check_weight(self.b(step), allow_extrapolation=self.allow_extrapolation, what=f"b({step})")
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
