"""The fast paired engine behind `lmn.generate(..., engine="fast")`.

- `stack.Stack`: a causal LM called block by block (embed, block i, norm + head) with a `KVCache` of
  fixed capacity that this package owns; `stack.fast_support(model)` says whether a model can run so.
- `plan.resolve_plan`: the user's (sources, recipe) checked and resolved into a `Plan`.
- `fast.PairedEngine`: the base and its sources stepped together on one batch, merging at the planned
  layers; the decode step is a CUDA graph on CUDA.
"""

from latent_merge_nnsight.generation.fast import PairedEngine as PairedEngine
from latent_merge_nnsight.plan import Plan as Plan
from latent_merge_nnsight.plan import resolve_plan as resolve_plan
from latent_merge_nnsight.generation.stack import KVCache as KVCache
from latent_merge_nnsight.generation.stack import Stack as Stack
from latent_merge_nnsight.generation.stack import fast_support as fast_support

__all__ = ["KVCache", "PairedEngine", "Plan", "Stack", "fast_support", "resolve_plan"]
