"""Moved: `LiveSource` lives in `latent_merge_nnsight.generation.stepper` (this path stays importable)."""

from latent_merge_nnsight.generation.stepper import LiveSource as LiveSource

__all__ = ["LiveSource"]
