"""Moved: `LiveSource` lives in `latent_merge_nnsight.generation.live` (this path stays importable)."""

from latent_merge_nnsight.generation.live import LiveSource as LiveSource

__all__ = ["LiveSource"]
