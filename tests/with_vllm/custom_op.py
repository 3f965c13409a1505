"""A registered (non built-in) op for the vLLM tests: half a lerp. vLLM's workers import this module by the
name the export records (`op_modules`)."""

from latent_merge_nnsight.ops import lerp, register_op


@register_op("half_lerp", overwrite=True)
def half_lerp(hb, hs, alpha):
    """`lerp` at alpha / 2."""
    return lerp(hb, hs, alpha * 0.5)
