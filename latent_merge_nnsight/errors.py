"""The one exception type the package raises for bad input."""


class LatentMergeError(ValueError):
    """Bad input to latent_merge_nnsight: the message names the parameter, the value and the valid range."""
