"""RegMean in weight space (Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language
Models"), the tensor math only.

For one linear layer `y = x @ W.T` (torch's `[d_out, d_in]` layout) and models `i = 0..m-1`, RegMean picks
the weight that best reproduces every model's outputs on its own inputs `X_i`:

    W* = argmin_W sum_i c_i |X_i W^T - X_i W_i^T|^2   =>   W*^T = (sum_i c_i G_i)^-1 sum_i c_i G_i W_i^T

with `G_i = X_i^T X_i` the Gram matrix of the layer's inputs. Before solving, the off-diagonal entries of
every `G_i` are multiplied by `off_diagonal` (the paper's "alpha"; 1 = plain RegMean, 0 = a per-input-
feature weighted average), and each `G_i` gets a small ridge `ridge * mean(diag G_i) * I` so the sum is
invertible even where a model never activates an input feature. Both act per model, so identical Gram
matrices still give exactly the coefficient-weighted average.

`c_i` are the model coefficients: `c = [1-alpha, alpha*w_1, ..., alpha*w_m]` for a base and m sources (see
`latent_merge_nnsight.baselines.weights.regmean_weights`); with `alpha=0.5` and one source this is the
paper's two-model RegMean, since a common scale of the coefficients cancels.

This module imports nothing of the package except the error type.
"""

from collections.abc import Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from latent_merge_nnsight.errors import LatentMergeError

__all__ = ["check_coefficients", "regmean_solve", "regmean_state_dict", "scale_off_diagonal"]


def check_coefficients(coeffs: Sequence[float], n_models: int) -> list[float]:
    """Validate model coefficients: one per model, finite, non-negative, not all zero; returns them
    normalised to sum to 1."""
    c = [float(x) for x in coeffs]
    if len(c) != n_models:
        raise LatentMergeError(f"coeffs has {len(c)} entries for {n_models} models; expected {n_models}")
    if any(not torch.isfinite(torch.tensor(x)) or x < 0 for x in c) or sum(c) <= 0:
        raise LatentMergeError(f"coeffs={c} must be finite, non-negative and not all zero")
    total = sum(c)
    return [x / total for x in c]


def scale_off_diagonal(gram: Float[Tensor, "d_in d_in"], off_diagonal: float) -> Float[Tensor, "d_in d_in"]:
    """`off_diagonal * G + (1 - off_diagonal) * diag(G)`: shrink the cross-feature terms of a Gram matrix."""
    if not 0.0 <= off_diagonal <= 1.0:
        raise LatentMergeError(
            f"off_diagonal={off_diagonal} is outside [0, 1]; expected 0 <= off_diagonal <= 1"
        )
    if off_diagonal == 1.0:
        return gram
    diag = torch.diag_embed(torch.diagonal(gram, dim1=-2, dim2=-1))
    return off_diagonal * gram + (1.0 - off_diagonal) * diag


def regmean_solve(
    weights: Sequence[Float[Tensor, "d_out d_in"]],
    grams: Sequence[Float[Tensor, "d_in d_in"]],
    coeffs: Sequence[float],
    *,
    off_diagonal: float = 0.9,
    ridge: float = 1e-6,
) -> Float[Tensor, "d_out d_in"]:
    """RegMean-merge one linear layer's weights: `(sum_i c_i W_i G_i)(sum_i c_i G_i)^-1` (float64 solve).

    Arguments:
        weights: each model's `[d_out, d_in]` weight.
        grams: each model's `[d_in, d_in]` Gram matrix of the layer's inputs (any common scale).
        coeffs: one non-negative coefficient per model (normalised here).
        off_diagonal: the paper's alpha, the factor on the Gram matrices' off-diagonal entries.
        ridge: added to each Gram's diagonal, relative to its mean diagonal entry.

    Returns the merged weight in the dtype of `weights[0]`. When only one coefficient is non-zero, that
    model's weight is returned unchanged (so alpha 0 and 1 are exact).
    """
    if len(weights) != len(grams):
        raise LatentMergeError(
            f"got {len(weights)} weights but {len(grams)} Gram matrices; expected one per model"
        )
    c = check_coefficients(coeffs, len(weights))
    if ridge < 0:
        raise LatentMergeError(f"ridge={ridge} must be >= 0")
    d_out, d_in = weights[0].shape
    for i, (w, g) in enumerate(zip(weights, grams, strict=True)):
        if tuple(w.shape) != (d_out, d_in) or tuple(g.shape) != (d_in, d_in):
            raise LatentMergeError(
                f"model {i}: weight {tuple(w.shape)} and Gram {tuple(g.shape)}; expected ({d_out}, {d_in}) "
                f"and ({d_in}, {d_in}) like model 0"
            )
    nonzero = [i for i, x in enumerate(c) if x > 0]
    if len(nonzero) == 1:
        return weights[nonzero[0]].clone()
    eye = torch.eye(d_in, dtype=torch.float64, device=weights[0].device)
    lhs = torch.zeros(d_in, d_in, dtype=torch.float64, device=weights[0].device)
    rhs = torch.zeros(d_in, d_out, dtype=torch.float64, device=weights[0].device)
    for ci, w, g in zip(c, weights, grams, strict=True):
        if ci == 0:
            continue
        g = scale_off_diagonal(g.to(lhs), off_diagonal)
        g = g + ridge * torch.diagonal(g).mean().clamp_min(1e-12) * eye
        lhs += ci * g
        rhs += ci * (g @ w.to(lhs).T)
    merged_t = torch.linalg.solve(lhs, rhs)  # [d_in, d_out] = W*^T
    return merged_t.T.to(weights[0].dtype).contiguous()


def regmean_state_dict(
    state_dicts: Sequence[Mapping[str, Tensor]],
    grams: Mapping[str, Sequence[Float[Tensor, "d_in d_in"]]],
    coeffs: Sequence[float],
    *,
    off_diagonal: float = 0.9,
    ridge: float = 1e-6,
) -> dict[str, Tensor]:
    """Merge whole state dicts: RegMean for each `"{module}.weight"` whose module has Gram matrices in
    `grams` (keyed by module name), the coefficient-weighted average for every other floating tensor
    (embeddings, norms, biases), and model 0's value for integer buffers.
    """
    c = check_coefficients(coeffs, len(state_dicts))
    keys = list(state_dicts[0])
    for i, sd in enumerate(state_dicts[1:], start=1):
        if set(sd) != set(keys):
            diff = sorted(set(sd) ^ set(keys))[:5]
            raise LatentMergeError(f"model {i} has different parameter names from model 0 (e.g. {diff})")
    unknown = sorted(f"{name}.weight" for name in grams if f"{name}.weight" not in keys)
    if unknown:
        raise LatentMergeError(f"grams name modules with no weight in the state dict: {unknown[:5]}")
    nonzero = [i for i, x in enumerate(c) if x > 0]
    merged: dict[str, Tensor] = {}
    for key in keys:
        tensors = [sd[key] for sd in state_dicts]
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and module in grams:
            merged[key] = regmean_solve(tensors, grams[module], c, off_diagonal=off_diagonal, ridge=ridge)
        elif not tensors[0].is_floating_point():
            merged[key] = tensors[0].clone()
        elif len(nonzero) == 1:
            merged[key] = tensors[nonzero[0]].clone()
        else:
            wd = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
            total = sum(ci * t.to(wd) for ci, t in zip(c, tensors, strict=True))
            merged[key] = total.to(tensors[0].dtype)  # type: ignore[union-attr]
    return merged
