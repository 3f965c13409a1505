"""The demo's grid: what it evaluates (`DemoGrid`, `Schedule`, the default and quick grids) and every setup
of a grid in order (`setups`: references, ensembles, weight merges, latent merges, schedules), plus the
finer alphas added where reasoning jumps (`refined`). A `Setup` says how to build what it runs; whether
it may share an engine pass with other setups as a per-row recipe (`Setup.rows`)."""

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from latent_merge_nnsight.baselines.weights import collect_grams, merge_weights
from latent_merge_nnsight.deltas import Deltas, compute_deltas
from latent_merge_nnsight.demo.report import GAINED, WEIGHT_OPS, setup_label
from latent_merge_nnsight.ensemble import Ensemble
from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.evaluation.tasks import (
    CATEGORIES,
    Example,
    chat_messages,
    direct_target,
    make_eval_set,
    make_train_set,
)
from latent_merge_nnsight.nouns import Model, Tokenizer
from latent_merge_nnsight.ops import regmean_beta
from latent_merge_nnsight.plan import Sources
from latent_merge_nnsight.recipe import Recipe

__all__ = [
    "DEFAULT_GRID",
    "QUICK_GRID",
    "DemoGrid",
    "Schedule",
    "Setup",
    "refine_alphas",
    "refined",
    "setups",
]


@dataclass(frozen=True)
class Schedule:
    """A multi-layer latent merge of the grid: `op` at `site` with per-layer alphas (`layers`), or one
    `alpha` (a number or a gradient list over depth) for a list of layers / "all"."""

    op: str
    site: str
    layers: dict[int, float] | tuple[int, ...] | str
    alpha: float | tuple[float, ...] | None = None

    def recipe(self) -> Recipe:
        layers = self.layers if isinstance(self.layers, (dict, str)) else list(self.layers)
        alpha = list(self.alpha) if isinstance(self.alpha, tuple) else self.alpha
        return Recipe(op=self.op, site=self.site, layers=layers, alpha=alpha)

    @property
    def text(self) -> str:
        """The schedule as the report shows it, e.g. `{4: 0.25, 5: 0.875}` or `[4, 5] x 0.75`."""
        if isinstance(self.layers, dict):
            return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(self.layers.items())) + "}"
        where = self.layers if isinstance(self.layers, str) else "[" + ", ".join(map(str, self.layers)) + "]"
        if isinstance(self.alpha, tuple):
            return f"{where} x [" + ", ".join(f"{a:g}" for a in self.alpha) + "]"
        return f"{where} x {self.alpha:g}"


DEFAULT_SCHEDULES: tuple[Schedule, ...] = tuple(
    s
    for op in ("lerp", "slerp")
    for s in (
        Schedule(op, "post", {4: 0.25, 5: 0.875}),
        Schedule(op, "post", (4, 5), 0.75),
        Schedule(op, "pre", (3, 4, 5), 0.5),
        Schedule(op, "pre", "all", (0.0, 1.0)),
    )
) + (Schedule("delta", "pre", (2, 3, 4), 0.5),)
"""Multi-layer schedules (layers refer to the toy pair's 6 blocks; the run drops any past the model)."""


@dataclass(frozen=True)
class DemoGrid:
    """What the demo evaluates.

    Attributes:
        n_per_category: held-out examples per category.
        layers: site-`pre` merge layers; None = every layer from 1 to the last (quick: the middle and last).
        post_layers: site-`post` merge layers; None = the last layer and the one before it (whose `post`
            equals `pre` of the last layer: the report checks the identity).
        alphas: latent LERP/SLERP alphas (coarse grid; 1.0 gives the limiting rows). At alpha = 1 SLERP and
            RegMean return the source state itself, as LERP does, so only LERP runs there.
        regmean_lambdas: latent RegMean lambdas (beta = 1/(1+lambda); lambda 0 is beta 1, left to LERP).
        limits: also run LERP alpha = 1 at site `pre` of layer 0 (the base's blocks on the source's
            embeddings), the other end from `post` of the last layer (the source's blocks under the base's
            final norm and head).
        delta_strengths: delta-steering strengths.
        schedules: multi-layer latent merges.
        refine: alphas inserted between two neighbouring alphas of a single-layer LERP/SLERP curve whose
            reasoning accuracies differ by at least `refine_jump` (0: no refinement).
        refine_jump: the jump in reasoning accuracy that counts as a transition.
        weight_alphas: weight-merge alphas (LERP, SLERP, RegMean).
        ensemble_bs: logit-ensemble weights of the fine-tune.
        n_calibration: training-like texts per model for weight RegMean and the steering deltas.
        off_diagonal: weight RegMean's factor on off-diagonal Gram entries (the paper's alpha).
        seed: seed of the evaluation and calibration sets.
    """

    n_per_category: int = 48
    layers: tuple[int, ...] | None = None
    post_layers: tuple[int, ...] | None = None
    alphas: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    regmean_lambdas: tuple[float, ...] = (3.0, 1.0 / 3.0)
    delta_strengths: tuple[float, ...] = (0.5, 1.0)
    limits: bool = True
    schedules: tuple[Schedule, ...] = DEFAULT_SCHEDULES
    refine: int = 4
    refine_jump: float = 0.25
    weight_alphas: tuple[float, ...] = (0.25, 0.5, 0.75)
    ensemble_bs: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9)
    n_calibration: int = 64
    off_diagonal: float = 0.9
    seed: int = 0


DEFAULT_GRID = DemoGrid()
QUICK_GRID = DemoGrid(
    n_per_category=8,
    alphas=(0.5, 1.0),
    regmean_lambdas=(1.0,),
    delta_strengths=(1.0,),
    schedules=(Schedule("slerp", "post", {4: 0.25, 5: 0.875}), Schedule("lerp", "pre", (3, 4, 5), 0.5)),
    refine=1,
    refine_jump=0.5,
    weight_alphas=(0.5,),
    ensemble_bs=(0.5,),
    n_calibration=16,
)


Make = Callable[[], tuple[Model, Sources, Recipe | Ensemble | None]]


@dataclass(frozen=True)
class Setup:
    """One evaluated setup; `make()` returns (model, sources, recipe) for `lmn.generate`. `rows`: a latent
    merge of the pair's live states, which may share an engine pass with others as a per-row recipe."""

    system: str
    op: str | None
    layer: int | None
    alpha: float | None
    lam: float | None
    make: Make
    site: str | None = None
    schedule: str | None = None
    rows: bool = False

    @property
    def label(self) -> str:
        return setup_label(self.system, self.op, self.layer, self.alpha, self.lam, self.site, self.schedule)

    @property
    def recipe(self) -> Recipe | None:
        """The recipe of a per-row setup (None for the others: theirs is built when they run)."""
        return self.make()[2] if self.rows else None  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------
# Data


def eval_sets(n: int, seed: int) -> dict[str, list[Example]]:
    """The held-out examples, per category."""
    return {c: make_eval_set(c, n, seed) for c in CATEGORIES}


def calibration(tokenizer: Tokenizer, n: int, seed: int) -> tuple[list[str], list[str]]:
    """Training-like chats (prompt and reference response) for each model: the base's mix of the four
    categories (reasoning answered directly, as the base was taught) and the reasoner's scratchpad
    reasoning."""

    def render(prompt: str, target: str) -> str:
        chat = [*chat_messages(prompt), {"role": "assistant", "content": target}]
        return tokenizer.apply_chat_template(chat, tokenize=False)

    per = max(1, n // len(CATEGORIES))
    base_texts = [
        render(e.prompt, direct_target(e.answer) if c == GAINED else e.target)
        for c in CATEGORIES
        for e in make_train_set(c, per, seed)
    ]
    ft_texts = [render(e.prompt, e.target) for e in make_train_set(GAINED, n, seed + 1)]
    return base_texts, ft_texts


def default_layers(n_layers: int, quick: bool) -> list[int]:
    """Site-`pre` layers when the grid names none: every layer from 1 (quick: the middle and last)."""
    if n_layers < 2:
        return [0]
    if quick:
        return sorted({n_layers // 2, n_layers - 1})
    return list(range(1, n_layers))


# ---------------------------------------------------------------------------------------------------
# The setups


def _latent(
    op: str, site: str, layer: int, alpha: float, sources: Sources, base: Model, lam: float | None = None
) -> Setup:
    if lam is not None:
        recipe = Recipe(op=op, site=site, layers=[layer], **{"lambda": lam})
    else:
        recipe = Recipe(op=op, site=site, layers={layer: alpha})
    return Setup("latent", op, layer, alpha, lam, lambda: (base, sources, recipe), site=site, rows=True)


def _weight_setups(
    base: Model, ft: Model, paths: tuple[str, str], grid: DemoGrid, texts: tuple[list[str], list[str]]
) -> Iterator[Setup]:
    """The weight merges of the grid (RegMean's Gram matrices collected once, when its first setup runs)."""
    grams: list[object] = []

    def weight(op: str, alpha: float) -> tuple[Model, None, None]:
        if op == "regmean":
            if not grams:
                grams.extend([collect_grams(base, texts[0]), collect_grams(ft, texts[1])])
            merged = merge_weights(base, ft, "regmean", alpha, grams=grams, off_diagonal=grid.off_diagonal)
        else:
            merged = merge_weights(paths[0], paths[1], op, alpha)
        return merged.model, None, None

    for op in WEIGHT_OPS:
        for a in grid.weight_alphas:
            yield Setup("weight", op, None, a, None, lambda op=op, a=a: weight(op, a))


def setups(
    base: Model,
    ft: Model,
    paths: tuple[str, str],
    grid: DemoGrid,
    n_layers: int,
    texts: tuple[list[str], list[str]],
) -> Iterator[Setup]:
    """Every setup of the coarse grid, in order: references, ensembles, weight merges, latent merges layer
    by layer and site by site, then the multi-layer schedules. Weight merges, Gram matrices and deltas
    are built only when their setup runs (`texts`: the calibration texts of each model)."""
    yield Setup("base", None, None, 0.0, None, lambda: (base, None, None))
    yield Setup("reasoner", None, None, 1.0, None, lambda: (ft, None, None))
    for b in grid.ensemble_bs:
        yield Setup("ensemble", None, None, b, None, lambda b=b: (base, ft, Ensemble(b=b)))
    yield from _weight_setups(base, ft, paths, grid, texts)

    deltas: dict[str, Deltas] = {}

    def steering(site: str, recipe: Recipe) -> Make:
        def make() -> tuple[Model, Sources, Recipe]:
            if site not in deltas:
                deltas[site] = compute_deltas(base, ft, texts[0] + texts[1], list(range(n_layers)), site=site)
            return base, deltas[site], recipe

        return make

    post_mid = set(grid.post_layers or ()) - {n_layers - 1}
    if grid.limits and 0 not in (grid.layers or ()):
        yield _latent("lerp", "pre", 0, 1.0, ft, base)
    cells = [("pre", layer) for layer in grid.layers or ()]
    cells += [("post", layer) for layer in grid.post_layers or ()]
    for site, layer in cells:
        for op in ("lerp", "slerp"):
            if site == "post" and layer in post_mid and op != "lerp":
                continue  # one op suffices for the post L = pre L+1 check
            for a in grid.alphas:
                if op == "lerp" or a < 1:  # at alpha = 1 every live op is the source state: LERP's row
                    yield _latent(op, site, layer, a, ft, base)
        if site == "post" and layer in post_mid:
            continue
        for lam in grid.regmean_lambdas:
            if lam <= 0:
                continue  # beta = 1: LERP's alpha = 1 row
            yield _latent("regmean", site, layer, regmean_beta(lam), [ft], base, lam=lam)
        for s in grid.delta_strengths:
            recipe = Recipe(op="delta", site=site, layers={layer: s})
            yield Setup("latent", "delta", layer, s, None, steering(site, recipe), site=site)

    for sched in grid.schedules:
        try:
            recipe = sched.recipe()
            recipe.layer_alphas(n_layers)
        except (LatentMergeError, ValueError):
            continue  # a schedule past this model's depth
        alpha = sched.alpha if isinstance(sched.alpha, float) else None
        if sched.op == "delta":
            yield Setup(
                "latent", "delta", None, alpha, None, steering(sched.site, recipe), sched.site, sched.text
            )
        else:
            make: Make = lambda r=recipe: (base, ft, r)  # noqa: E731
            yield Setup("latent", sched.op, None, alpha, None, make, sched.site, sched.text, rows=True)


def refine_alphas(curve: Sequence[tuple[float, float]], n: int, jump: float) -> list[float]:
    """Alphas to add to one curve of (alpha, reasoning accuracy) points: `n` evenly spaced between each
    pair of neighbours (by alpha) whose accuracies differ by at least `jump`.

    Example: `refine_alphas([(0, .04), (.75, .02), (1, .94)], 4, .25)` is `[0.8, 0.85, 0.9, 0.95]`."""
    if n < 1:
        return []
    pts = sorted(curve)
    new: list[float] = []
    known = {round(a, 9) for a, _ in pts}
    for (a0, r0), (a1, r1) in zip(pts, pts[1:], strict=False):
        if abs(r1 - r0) >= jump - 1e-12:
            for a in np.linspace(a0, a1, n + 2)[1:-1]:
                a = round(float(a), 6)
                if round(a, 9) not in known:
                    known.add(round(a, 9))
                    new.append(a)
    return new


def refined(
    rows: list[dict[str, object]], base: Model, ft: Model, grid: DemoGrid, base_reasoning: float, last: int
) -> list[Setup]:
    """The finer alpha grid: single-layer LERP/SLERP curves (from alpha 0 = the base) where reasoning
    jumps by at least `grid.refine_jump` between neighbouring alphas."""
    curves: dict[tuple, list[tuple[float, float]]] = {}
    for r in rows:
        mid_post = r["site"] == "post" and r["layer"] != last  # equals pre L+1: refined there
        if r["system"] == "latent" and r["op"] in ("lerp", "slerp") and r["schedule"] is None:
            if r["category"] == GAINED and not mid_post:
                curves.setdefault((r["op"], r["site"], r["layer"]), [(0.0, base_reasoning)])
                curves[(r["op"], r["site"], r["layer"])].append((float(r["alpha"]), float(r["accuracy"])))  # type: ignore[arg-type]
    for (op, site, layer), curve in curves.items():
        if op == "slerp" and not any(a >= 1 for a, _ in curve):
            # slerp at alpha = 1 is the source state, LERP's alpha = 1 row: the curve ends there too
            curve += [p for p in curves.get(("lerp", site, layer), []) if p[0] >= 1]
    out = []
    for (op, site, layer), curve in curves.items():
        for a in refine_alphas(curve, grid.refine, grid.refine_jump):
            out.append(_latent(op, site, layer, a, ft, base))
    return out
