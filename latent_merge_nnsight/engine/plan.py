"""Moved: the plan lives in `latent_merge_nnsight.plan` (this path stays importable)."""

from latent_merge_nnsight.plan import Plan as Plan
from latent_merge_nnsight.plan import device_of as device_of
from latent_merge_nnsight.plan import resolve_plan as resolve_plan

__all__ = ["Plan", "resolve_plan"]
