"""An independent plain-PyTorch reference for latent merging: forward pre-hooks, as in the paper's code.

Deliberately written without the package's positions/merge code: per row, per token, with explicit
loops, so that the tests compare two independent implementations.
"""

import math

import torch


def ref_slerp(hb: torch.Tensor, hs: torch.Tensor, a: float) -> torch.Tensor:
    """The paper's slerp on one vector, written from DESIGN.md with Python scalars."""
    nb, ns = float(hb.norm()), float(hs.norm())
    u, v = hb / (nb + 1e-9), hs / (ns + 1e-9)
    theta = math.acos(max(-1.0, min(1.0, float((u * v).sum()))))
    if theta < 1e-3 or math.pi - theta < 1e-3:
        d = (1 - a) * u + a * v
    else:
        d = math.sin((1 - a) * theta) / math.sin(theta) * u + math.sin(a * theta) / math.sin(theta) * v
    d = d / (float(d.norm()) + 1e-9)
    return d * ((1 - a) * nb + a * ns)


def ref_op(op: str, hb, sources, a, lam=None, weights=None):
    if op == "lerp":
        return (1 - a) * hb + a * sources[0]
    if op == "slerp":
        return ref_slerp(hb, sources[0], a)
    if op == "regmean":
        beta = a if lam is None else 1.0 / (1.0 + lam)
        w = [1.0 / len(sources)] * len(sources) if weights is None else [x / sum(weights) for x in weights]
        return (1 - beta) * hb + beta * sum(wi * s for wi, s in zip(w, sources, strict=True))
    if op == "delta":
        return hb + a * sources[0]
    raise ValueError(op)


def real_positions(mask_row: torch.Tensor) -> list[int]:
    return [i for i, m in enumerate(mask_row.tolist()) if m]


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens (what HF generate and nnsight pass for padded batches)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def block(hf_model, layer: int):
    for path in ("model.layers", "transformer.h", "gpt_neox.layers"):
        obj = hf_model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj[layer]
    raise ValueError(type(hf_model))


def hidden_states(hf_model, ids, mask, layer: int, site: str = "pre") -> torch.Tensor:
    """Residual at (layer, site) by a plain hook (no nnsight)."""
    got = {}
    b = block(hf_model, layer)
    if site == "pre":
        h = b.register_forward_pre_hook(lambda m, a: got.setdefault("h", a[0].clone()))
    else:
        h = b.register_forward_hook(
            lambda m, a, o: got.setdefault("h", (o[0] if isinstance(o, tuple) else o).clone())
        )
    try:
        with torch.no_grad():
            hf_model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask))
    finally:
        h.remove()
    return got["h"]


def merged_logits(hf_base, ids, mask, merges: dict, site: str = "pre", positions="last") -> torch.Tensor:
    """Logits of the base with `merges = {layer: (op, [source states], alpha, params)}` applied by hooks.

    positions: "last" (last real token of each row), "all" (every real token) or a list of real-token
    indices.
    """
    handles = []

    def make(layer, op, sources, a, params):
        def apply(h):
            h = h.clone()
            for row in range(h.shape[0]):
                real = real_positions(mask[row])
                if positions == "last":
                    chosen = [real[-1]]
                elif positions == "all":
                    chosen = real
                else:
                    chosen = [real[i] for i in positions]
                for t in chosen:
                    h[row, t] = ref_op(op, h[row, t], [s[row, t] for s in sources], a, **params)
            return h

        b = block(hf_base, layer)
        if site == "pre":
            return b.register_forward_pre_hook(lambda m, args: (apply(args[0]), *args[1:]))
        return b.register_forward_hook(
            lambda m, args, out: (apply(out[0]), *out[1:]) if isinstance(out, tuple) else apply(out)
        )

    for layer, (op, sources, a, params) in merges.items():
        handles.append(make(layer, op, sources, a, params))
    try:
        with torch.no_grad():
            return hf_base(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
    finally:
        for h in handles:
            h.remove()
