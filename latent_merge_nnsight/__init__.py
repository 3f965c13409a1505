"""latent_merge_nnsight: compose a base LLM with its fine-tunes in representation space, as nnsight
interventions.

    import latent_merge_nnsight as lmn
    base, ft = lmn.load("toy-base"), lmn.load("toy-reasoner")
    ft_trace = lmn.capture(ft, prompt, layers=[4])
    with base.trace(prompt):
        lmn.merge_into(layer=4, source=ft_trace, op="slerp", alpha=0.5)
        logits = base.lm_head.output.save()
"""

from latent_merge_nnsight import _nnsight  # noqa: F401  (first: anyio must survive nnsight's .save mount)
from latent_merge_nnsight.analysis import representations as representations
from latent_merge_nnsight.analysis import sweep as sweep
from latent_merge_nnsight.baselines.ensemble import Ensemble as Ensemble
from latent_merge_nnsight.capture import Capture as Capture
from latent_merge_nnsight.capture import capture as capture
from latent_merge_nnsight.deltas import Deltas as Deltas
from latent_merge_nnsight.deltas import compute_deltas as compute_deltas
from latent_merge_nnsight.errors import LatentMergeError as LatentMergeError
from latent_merge_nnsight.generate import GenerationResult as GenerationResult
from latent_merge_nnsight.generate import generate as generate
from latent_merge_nnsight.merge import merge_into as merge_into
from latent_merge_nnsight.models import check_compatible as check_compatible
from latent_merge_nnsight.models import load as load
from latent_merge_nnsight.models import wrap as wrap
from latent_merge_nnsight.ops import list_ops as list_ops
from latent_merge_nnsight.ops import register_op as register_op
from latent_merge_nnsight.pair import pair as pair
from latent_merge_nnsight.recipe import Recipe as Recipe
from latent_merge_nnsight.sites import register_architecture as register_architecture

__version__ = "0.1.0"

__all__ = [
    "Capture",
    "Deltas",
    "Ensemble",
    "GenerationResult",
    "LatentMergeError",
    "Recipe",
    "capture",
    "check_compatible",
    "compute_deltas",
    "generate",
    "list_ops",
    "load",
    "merge_into",
    "pair",
    "register_architecture",
    "register_op",
    "representations",
    "sweep",
    "wrap",
]
