"""Moved: the logit ensemble lives in `latent_merge_nnsight.ensemble` (this path stays importable)."""

from latent_merge_nnsight.ensemble import Ensemble as Ensemble
from latent_merge_nnsight.ensemble import mix_logits as mix_logits

__all__ = ["Ensemble", "mix_logits"]
