"""Systems: a model setup written in YAML, loaded, and asked for completions (used by serve, respond, judge).

- `spec.py`: the YAML schema (`System`, `SamplingSpec`, `WeightMergeSpec`, `EnsembleSpec`);
- `loaded.py`: `LoadedSystem` (the models in memory, one generation thread), `load_system`, a system as
  JudgeBench's judge;
- `batching.py`: `Batcher` and `SystemCompleteFn`, concurrent requests batched into one `complete` call,
  and `Completion`.

Arrows point down: `batching` imports neither, `loaded` imports both, `spec` imports neither.
"""

from latent_merge_nnsight.systems.batching import Batcher as Batcher
from latent_merge_nnsight.systems.batching import BatchStats as BatchStats
from latent_merge_nnsight.systems.batching import Completion as Completion
from latent_merge_nnsight.systems.batching import SystemCompleteFn as SystemCompleteFn
from latent_merge_nnsight.systems.loaded import LoadedSystem as LoadedSystem
from latent_merge_nnsight.systems.loaded import load_system as load_system
from latent_merge_nnsight.systems.spec import EnsembleSpec as EnsembleSpec
from latent_merge_nnsight.systems.spec import SamplingSpec as SamplingSpec
from latent_merge_nnsight.systems.spec import System as System
from latent_merge_nnsight.systems.spec import WeightMergeSpec as WeightMergeSpec

__all__ = [
    "BatchStats",
    "Batcher",
    "Completion",
    "EnsembleSpec",
    "LoadedSystem",
    "SamplingSpec",
    "System",
    "SystemCompleteFn",
    "WeightMergeSpec",
    "load_system",
]
