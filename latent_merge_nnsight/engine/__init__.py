"""Moved: the fast engine lives in `latent_merge_nnsight.generation` (`fast`, `stack`, `graphs`) and the
plan in `latent_merge_nnsight.plan`; these paths (`engine`, `engine.fast`, `engine.stack`,
`engine.graphs`, `engine.plan`) stay importable.
"""

from latent_merge_nnsight.generation.fast import PairedEngine as PairedEngine
from latent_merge_nnsight.generation.stack import KVCache as KVCache
from latent_merge_nnsight.generation.stack import Stack as Stack
from latent_merge_nnsight.generation.stack import fast_support as fast_support
from latent_merge_nnsight.plan import Plan as Plan
from latent_merge_nnsight.plan import resolve_plan as resolve_plan

__all__ = ["KVCache", "PairedEngine", "Plan", "Stack", "fast_support", "resolve_plan"]
