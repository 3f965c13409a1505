"""An independent plain-PyTorch reference for lockstep merged generation: the paper's algorithm.

One prompt at a time (batch 1, no padding), two (or more) HF models each with its own DynamicCache, the
models' own `forward`, and forward(-pre)-hooks: each step the source runs up to the highest merged layer
(a hook raises to stop it), its residual is captured, and a hook on the base mixes it in at the last
token at prefill ("last") or at every token ("all"), then at each new token. Greedy argmax of the float32
logits, as HF `generate` does. Written without the package's engine, positions or op code (the ops come
from tests/reference.py, written from DESIGN.md).
"""

import inspect

import torch
from reference import block, ref_op
from transformers import DynamicCache


class _Stop(Exception):
    """Raised by a hook to end a source forward after the highest merged layer."""


def _cache_kwarg(hf_model) -> str:
    params = inspect.signature(type(hf_model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _source_states(hf_src, ids, cache, layers: list[int], site: str) -> dict[int, torch.Tensor]:
    """Run the source on `ids` with its cache, capture the residual at each layer, stop after the last."""
    got: dict[int, torch.Tensor] = {}
    top = max(layers)
    handles = []
    for layer in layers:

        def grab(h, layer=layer):
            got[layer] = h.detach().clone()
            if layer == top:
                raise _Stop

        b = block(hf_src, layer)
        if site == "pre":
            handles.append(b.register_forward_pre_hook(lambda m, args, grab=grab: grab(args[0])))
        else:
            handles.append(
                b.register_forward_hook(
                    lambda m, args, out, grab=grab: grab(out[0] if isinstance(out, tuple) else out)
                )
            )
    try:
        hf_src(input_ids=ids, use_cache=True, **{_cache_kwarg(hf_src): cache})
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return got


def _base_logits(hf_base, ids, cache, mixes: dict, site: str, chosen: list[int]) -> torch.Tensor:
    """Base forward with `mixes = {layer: fn(h_row_token, t) -> new}` applied at token indices `chosen`."""
    handles = []
    for layer, fn in mixes.items():

        def apply(h, fn=fn):
            h = h.clone()
            for t in chosen:
                h[0, t] = fn(h[0, t], t)
            return h

        b = block(hf_base, layer)
        if site == "pre":
            handles.append(
                b.register_forward_pre_hook(lambda m, args, apply=apply: (apply(args[0]), *args[1:]))
            )
        else:
            handles.append(
                b.register_forward_hook(
                    lambda m, args, out, apply=apply: (
                        (apply(out[0]), *out[1:]) if isinstance(out, tuple) else apply(out)
                    )
                )
            )
    try:
        out = hf_base(input_ids=ids, use_cache=True, **{_cache_kwarg(hf_base): cache})
    finally:
        for h in handles:
            h.remove()
    return out.logits[0, -1].float()


def lockstep_generate(
    hf_base,
    hf_sources: list,
    prompt_ids: list[int],
    merges: dict[int, float | None],
    op: str,
    *,
    max_new_tokens: int,
    site: str = "pre",
    positions: str | list[int] = "last",
    lam: float | None = None,
    weights: list[float] | None = None,
    deltas: dict[int, torch.Tensor] | None = None,
    eos_id: int | None = None,
    choose=None,
) -> list[int]:
    """Greedy new tokens of the merged base for one unpadded prompt (the paper's hook loop).
    `choose(step, logits) -> token` replaces the argmax (a reference sampler)."""
    params = {k: v for k, v in (("lam", lam), ("weights", weights)) if v is not None}
    layers = sorted(merges)
    base_cache = DynamicCache()
    src_caches = [DynamicCache() for _ in hf_sources]
    device = next(hf_base.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    new: list[int] = []
    with torch.no_grad():
        for step in range(max_new_tokens):
            n = ids.shape[1]
            if deltas is not None:
                states = None
            else:
                states = [
                    _source_states(s, ids, c, layers, site)
                    for s, c in zip(hf_sources, src_caches, strict=True)
                ]
            # prefill: the last token ("last"), every token ("all") or the listed real-token indices;
            # decoding: the one new token ("last", "all") or none (indices name prompt tokens only)
            if isinstance(positions, list):
                chosen = sorted({p % n for p in positions}) if step == 0 else []
            else:
                chosen = [n - 1] if (positions == "last" and step == 0) else list(range(n))
            mixes = {}
            for layer in layers:
                a = merges[layer]
                if deltas is not None:
                    mixes[layer] = lambda h, t, a=a, layer=layer: ref_op("delta", h, [deltas[layer]], a)
                else:
                    mixes[layer] = lambda h, t, a=a, layer=layer, states=states: ref_op(
                        op, h, [st[layer][0, t] for st in states], a, **params
                    )
            logits = _base_logits(hf_base, ids, base_cache, mixes, site, chosen)
            token = int(logits.argmax()) if choose is None else choose(step, logits)
            new.append(token)
            if eos_id is not None and token == eos_id:
                break
            ids = torch.tensor([[token]], device=device)
    return new


def ensemble_generate(
    hf_base, hf_source, prompt_ids: list[int], b: float | list[float], *, max_new_tokens: int, choose=None
) -> list[int]:
    """The paper's logit ensemble: greedy on (1-b)*logits_base + b*logits_source, two full models.
    `b` may be a list: one weight per step, the last one held. `choose(step, logits)` replaces the argmax."""
    caches = [DynamicCache(), DynamicCache()]
    device = next(hf_base.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    new: list[int] = []
    weights = b if isinstance(b, list) else [b]
    with torch.no_grad():
        for step in range(max_new_tokens):
            b = weights[min(step, len(weights) - 1)]
            lb = (
                hf_base(input_ids=ids, use_cache=True, **{_cache_kwarg(hf_base): caches[0]})
                .logits[0, -1]
                .float()
            )
            ls = (
                hf_source(input_ids=ids, use_cache=True, **{_cache_kwarg(hf_source): caches[1]})
                .logits[0, -1]
                .float()
            )
            mixed = (1 - b) * lb + b * ls
            token = int(mixed.argmax()) if choose is None else choose(step, mixed)
            new.append(token)
            ids = torch.tensor([[token]], device=device)
    return new
