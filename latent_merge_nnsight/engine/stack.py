"""Moved: `Stack` lives in `latent_merge_nnsight.generation.stack` (this path stays importable)."""

from latent_merge_nnsight._nnsight import plain_forwards as plain_forwards
from latent_merge_nnsight.generation.stack import Biases as Biases
from latent_merge_nnsight.generation.stack import KVCache as KVCache
from latent_merge_nnsight.generation.stack import Stack as Stack
from latent_merge_nnsight.generation.stack import attention_bias as attention_bias
from latent_merge_nnsight.generation.stack import fast_support as fast_support
from latent_merge_nnsight.generation.stack import layer_windows as layer_windows
from latent_merge_nnsight.generation.stack import mask_positions as mask_positions
