"""Moved: request batching lives in `latent_merge_nnsight.systems.batching` (this path stays importable)."""

from latent_merge_nnsight.systems.batching import Batcher as Batcher
from latent_merge_nnsight.systems.batching import BatchStats as BatchStats
from latent_merge_nnsight.systems.batching import SystemCompleteFn as SystemCompleteFn

__all__ = ["BatchStats", "Batcher", "SystemCompleteFn"]
