"""Moved: the fast engine lives in `latent_merge_nnsight.generation.fast` (this path stays importable)."""

from latent_merge_nnsight.generation.fast import PairedEngine as PairedEngine

__all__ = ["PairedEngine"]
