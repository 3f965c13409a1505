"""Which token positions a merge touches: pure tensor code over attention masks.

`positions` may be:
- `"last"` (the paper's `last_token_only=True`): at prefill only each row's last real token; during
  decoding (a forward with a KV cache behind it) every new token.
- `"all"`: every real token.
- a list of ints or a `slice`: indices that count *real* tokens of each row (0 is the first real token,
  -1 the last), so they mean the same thing under left and right padding. They select prompt positions
  at prefill; nothing is mixed during decoding.
- a boolean mask `[batch, pos]` or `[pos]` over the raw positions of the forward.
Pad positions are never selected.
"""

from collections.abc import Sequence

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from latent_merge_nnsight.errors import LatentMergeError

__all__ = ["Positions", "check_positions", "last_real_index", "position_mask"]

Positions = str | Sequence[int] | slice | Tensor


def check_positions(positions: Positions) -> Positions:
    """Validate the form of `positions` (not its fit to a batch, which needs the mask)."""
    if isinstance(positions, str):
        if positions not in ("last", "all"):
            raise LatentMergeError(
                f"positions={positions!r}; expected 'last', 'all', a list of ints, a slice or a boolean mask"
            )
        return positions
    if isinstance(positions, slice):
        return positions
    if isinstance(positions, Tensor):
        if positions.dtype != torch.bool or positions.ndim not in (1, 2):
            raise LatentMergeError(
                f"positions tensor has dtype {positions.dtype} and shape {tuple(positions.shape)}; "
                "expected a boolean mask of shape [pos] or [batch, pos]"
            )
        return positions
    if isinstance(positions, Sequence) and all(
        isinstance(p, int) and not isinstance(p, bool) for p in positions
    ):
        if len(positions) == 0:
            raise LatentMergeError("positions=[] selects nothing; expected at least one index")
        return list(positions)
    raise LatentMergeError(
        f"positions={positions!r}; expected 'last', 'all', a list of ints, a slice or a boolean mask"
    )


def last_real_index(attention_mask: Int[Tensor, "batch pos"]) -> Int[Tensor, " batch"]:
    """Index of each row's last real token (works for left and right padding; -1 for an empty row)."""
    pos = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    real = attention_mask.bool()
    return torch.where(real, pos, torch.full_like(pos, -1)).amax(dim=-1)


def position_mask(
    attention_mask: Int[Tensor, "batch pos"], positions: Positions, *, decoding: bool = False
) -> Bool[Tensor, "batch pos"]:
    """The positions of this forward to merge at.

    Arguments:
        attention_mask: the mask of the tokens *in this forward* (1 real, 0 pad), `[batch, pos]`.
        positions: see the module docstring.
        decoding: True for a forward that extends a KV cache (generation steps after the prefill).
    """
    positions = check_positions(positions)
    real = attention_mask.bool()
    if isinstance(positions, str):
        if positions == "all" or decoding:
            return real
        last = last_real_index(attention_mask)
        pos = torch.arange(real.shape[-1], device=real.device)
        return (pos[None, :] == last[:, None]) & real
    if isinstance(positions, Tensor):
        if decoding:
            return torch.zeros_like(real)
        sel = positions.to(real.device)
        if sel.ndim == 1 and sel.shape[0] == real.shape[1]:
            sel = sel[None, :].expand_as(real)
        if sel.shape != real.shape:
            raise LatentMergeError(
                f"positions mask has shape {tuple(positions.shape)}; expected [{real.shape[1]}] or "
                f"[{real.shape[0]}, {real.shape[1]}] to match the forward's tokens"
            )
        return sel & real
    if decoding:
        return torch.zeros_like(real)
    # indices over real tokens: rank of each real token within its row
    rank = torch.cumsum(real.long(), dim=-1) - 1
    n_real = real.sum(dim=-1, keepdim=True)
    if isinstance(positions, slice):
        sel = torch.zeros_like(real)
        for row in range(real.shape[0]):  # the slice is taken over each row's own real tokens
            for i in range(int(n_real[row]))[positions]:
                sel[row] |= (rank[row] == i) & real[row]
        if not bool(sel.any()):
            raise LatentMergeError(
                f"positions={positions!r} selects no token in any row (the rows have "
                f"{sorted({int(n) for n in n_real.flatten()})} real tokens); the merge would do nothing"
            )
        return sel
    longest = int(n_real.max()) if n_real.numel() else 0
    bad = [p for p in positions if not -longest <= p < longest]
    if bad:  # an index no row has would merge nothing, silently (a shorter row may lack one: allowed)
        raise LatentMergeError(
            f"positions={positions!r}: {bad} out of range for prompts of at most {longest} real tokens; "
            f"expected -{longest} <= position < {longest} (positions count each row's real tokens)"
        )
    sel = torch.zeros_like(real)
    for p in positions:
        idx = n_real + p if p < 0 else torch.full_like(n_real, p)
        sel |= (rank == idx) & real
    return sel
