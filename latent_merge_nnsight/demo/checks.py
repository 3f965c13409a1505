"""The demo's checks on its own generations: the identities the report states (latent RegMean = LERP at
alpha = beta, site `post` of layer L = `pre` of L+1, `post` of the last layer at alpha 1 vs the reasoner),
and the comparison of two runs of one grid (`differing_rows`, `margins`): the per-row passes against
one setup at a time, where a row may differ only where a float32 near-tie flips a token."""

from collections.abc import Mapping

import pandas as pd

from latent_merge_nnsight.demo.report import setup_label
from latent_merge_nnsight.evaluation.tasks import chat_messages
from latent_merge_nnsight.generation.score import score
from latent_merge_nnsight.nouns import Model
from latent_merge_nnsight.recipe import Recipe

__all__ = ["differing_rows", "identity_checks", "margins"]

Texts = Mapping[str, Mapping[str, list[str]]]


def identity_checks(texts: Texts, wide: pd.DataFrame, last: int) -> dict[str, list[int] | None]:
    """The run's identity checks for the report: latent RegMean vs LERP, post L vs pre L+1, and post at
    the last layer with alpha = 1 vs the reasoner."""
    return {
        "regmean_equals_lerp": _twin_check(texts, wide, "regmean"),
        "post_equals_next_pre": _twin_check(texts, wide, "post"),
        "post_alpha1_vs_reasoner": _agreement(
            texts,
            setup_label("latent", "lerp", last, 1.0, None, "post"),
            setup_label("reasoner", None, None, 1.0),
        ),
    }


def _twin_check(texts: Texts, wide: pd.DataFrame, kind: str) -> list[int] | None:
    """[equal, compared] (setup, category) pairs of generated texts for one identity of the grid:

    - "regmean": latent RegMean (lambda) against latent LERP at the same site, layer and alpha = beta;
    - "post": LERP at site `post` of layer L against LERP at site `pre` of layer L+1, same alpha."""
    latent = wide[(wide["system"] == "latent") & wide["schedule"].isna()]
    by_key = {
        (r.op, r.site, int(r.layer), round(float(r.alpha), 6), pd.notna(r.lam)): r.label
        for r in latent.itertuples()
        if pd.notna(r.layer)
    }
    equal = compared = 0
    for (op, site, layer, alpha, is_lambda), label in by_key.items():
        if kind == "regmean" and op == "regmean" and is_lambda:
            twin = by_key.get(("lerp", site, layer, alpha, False))
        elif kind == "post" and op == "lerp" and site == "post":
            twin = by_key.get(("lerp", "pre", layer + 1, alpha, False))
        else:
            continue
        if twin is None:
            continue
        for category, outs in texts[label].items():
            compared += 1
            equal += int(texts[twin].get(category) == outs)
    return [equal, compared] if compared else None


def _agreement(texts: Texts, a: str, b: str) -> list[int] | None:
    """[equal, compared] prompts whose generations by setups `a` and `b` are the same text."""
    if a not in texts or b not in texts:
        return None
    pairs = [(x, y) for c in texts[a] for x, y in zip(texts[a][c], texts[b].get(c, []), strict=False)]
    return [sum(x == y for x, y in pairs), len(pairs)]


def differing_rows(a: Texts, b: Texts) -> list[tuple[str, str, int]]:
    """Every (setup label, category, prompt index) whose generated text differs between two runs of one
    grid (setups or categories only one run has count as differing, prompt index -1)."""
    out = []
    for label in sorted(set(a) | set(b)):
        for category in sorted(set(a.get(label, {})) | set(b.get(label, {}))):
            x, y = a.get(label, {}).get(category), b.get(label, {}).get(category)
            if x is None or y is None or len(x) != len(y):
                out.append((label, category, -1))
                continue
            out.extend((label, category, i) for i, (p, q) in enumerate(zip(x, y, strict=True)) if p != q)
    return out


def margins(
    base: Model,
    source: Model,
    recipe: Recipe,
    prompt: str,
    texts: tuple[str, str],
) -> dict[str, object]:
    """Where two generations of one prompt under `recipe` part: the first differing token and the logit
    margin there (top-1 minus top-2 log-probability, teacher-forced on the common prefix, under the
    recipe run alone). A near-tie has a margin near 0: float32 rounding can flip it."""
    tok = base.tokenizer
    context = tok.apply_chat_template(chat_messages(prompt), add_generation_prompt=True, tokenize=True)
    ids = [tok.encode(t, add_special_tokens=False) + [tok.eos_token_id] for t in texts]
    at = next((i for i, (p, q) in enumerate(zip(*ids, strict=False)) if p != q), min(map(len, ids)) - 1)
    got = score(base, source, [list(context)], [ids[0][: at + 1]], recipe, top=2)
    (t1, lp1), (t2, lp2) = got.top[0][at][:2]
    return {"token": at, "margin": lp1 - lp2, "tokens": [ids[0][at], ids[1][at]], "top": [t1, t2]}


def near_ties(
    batched: Texts,
    single: Texts,
    recipes: Mapping[str, Recipe],
    prompts: Mapping[str, list[str]],
    base: Model,
    source: Model,
) -> list[dict[str, object]]:
    """Every (setup, category, prompt) whose text differs between a run in per-row passes (`batched`) and
    one setup at a time (`single`), with where the two part and the logit margin there under the setup
    alone (`margins`; `prompts`: the prompt texts per category). A setup that is not a per-row recipe
    has no margin (its two runs are the same call: it should never differ)."""
    out: list[dict[str, object]] = []
    for label, category, i in differing_rows(batched, single):
        row: dict[str, object] = {"setup": label, "category": category, "prompt": i}
        recipe = recipes.get(label)
        if recipe is not None and i >= 0:
            pair = (single[label][category][i], batched[label][category][i])
            row |= margins(base, source, recipe, prompts[category][i], pair)
        out.append(row)
    return out
