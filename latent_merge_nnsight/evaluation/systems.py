"""Moved: the system spec lives in `latent_merge_nnsight.systems.spec` (this path stays importable, with
the old class names `Sampling`, `WeightMerge` and `Ensemble` for `SamplingSpec`, `WeightMergeSpec` and
`EnsembleSpec`)."""

from latent_merge_nnsight.evaluation.judge_system import judge_model_id as judge_model_id
from latent_merge_nnsight.evaluation.judge_system import (
    judgebench_accuracy_system as judgebench_accuracy_system,
)
from latent_merge_nnsight.systems.loaded import Completion as Completion
from latent_merge_nnsight.systems.loaded import LoadedSystem as LoadedSystem
from latent_merge_nnsight.systems.loaded import load_system as load_system
from latent_merge_nnsight.systems.spec import KINDS as KINDS
from latent_merge_nnsight.systems.spec import EnsembleSpec as EnsembleSpec
from latent_merge_nnsight.systems.spec import SamplingSpec as SamplingSpec
from latent_merge_nnsight.systems.spec import System as System
from latent_merge_nnsight.systems.spec import WeightMergeSpec as WeightMergeSpec
from latent_merge_nnsight.systems.spec import explain_errors as explain_errors

Sampling = SamplingSpec
WeightMerge = WeightMergeSpec
Ensemble = EnsembleSpec

__all__ = ["KINDS", "Ensemble", "Sampling", "System", "WeightMerge"]
