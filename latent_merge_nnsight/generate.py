"""Moved: `lmn.generate` lives in `latent_merge_nnsight.generation` (this path stays importable)."""

from latent_merge_nnsight.generation.fast import release_engine as release_engine
from latent_merge_nnsight.generation.loop import GenerationResult as GenerationResult
from latent_merge_nnsight.generation.loop import Run as Run
from latent_merge_nnsight.generation.loop import left_align as left_align
from latent_merge_nnsight.generation.loop import prepare_run as prepare_run
from latent_merge_nnsight.generation.run import ENGINES as ENGINES
from latent_merge_nnsight.generation.run import generate as generate

__all__ = ["ENGINES", "GenerationResult", "generate", "release_engine"]
