"""Moved: loaded systems live in `latent_merge_nnsight.systems.loaded` (this path stays importable)."""

from latent_merge_nnsight.evaluation.judge_system import judge_model_id as judge_model_id
from latent_merge_nnsight.evaluation.judge_system import (
    judgebench_accuracy_system as judgebench_accuracy_system,
)
from latent_merge_nnsight.systems.loaded import Completion as Completion
from latent_merge_nnsight.systems.loaded import LoadedSystem as LoadedSystem
from latent_merge_nnsight.systems.loaded import TokenLogprob as TokenLogprob
from latent_merge_nnsight.systems.loaded import load_system as load_system

__all__ = [
    "Completion",
    "LoadedSystem",
    "TokenLogprob",
    "judge_model_id",
    "judgebench_accuracy_system",
    "load_system",
]
