"""Moved: CUDA-graph steps live in `latent_merge_nnsight.generation.graphs` (this path stays importable)."""

from latent_merge_nnsight.generation.graphs import CapturedStep as CapturedStep
from latent_merge_nnsight.generation.graphs import EagerStep as EagerStep
from latent_merge_nnsight.generation.graphs import StepGraphs as StepGraphs
from latent_merge_nnsight.generation.graphs import side_stream as side_stream

__all__ = ["CapturedStep", "EagerStep", "StepGraphs", "side_stream"]
