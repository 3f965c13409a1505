"""Seeded sampling against an independent reference sampler, with rows that finish at different steps.

The reference follows the noise rule documented in `latent_merge_nnsight.sampling` (one seeded CPU
generator; at step t one `rand(n_rows, vocab)` over the original batch; row r takes
`argmax(filter(logits / T) + gumbel(u[r]))`), with top-k and both top-p rules written out here. Each row
is generated alone by the paper's hook loop, so a sampler that keyed the noise by batch slot (a finished
row dropped, the others moved up) or mixed rows would give other tokens.
"""

import pytest
import torch
from reference_generate import ensemble_generate, lockstep_generate
from tiny import pair

import latent_merge_nnsight as lmn
from latent_merge_nnsight.ensemble import Ensemble
from latent_merge_nnsight.models import hf_module

PROMPTS = ["hello there", "hi", "what is up with you"]
N_NEW = 8
SEED = 7
TEMPERATURE, TOP_K, TOP_P = 1.3, 40, 0.8


@pytest.fixture(scope="module")
def models():
    base, ft = pair("qwen2", n_layers=4, seed=0)
    _, ft2 = pair("qwen2", n_layers=4, seed=1)
    return base, ft, ft2


def reference_noise(n_rows: int, vocab: int) -> list[torch.Tensor]:
    """Gumbel noise per step for every original row: the documented draw order."""
    g = torch.Generator(device="cpu")
    g.manual_seed(SEED)
    out = []
    for _ in range(N_NEW):
        u = torch.rand(n_rows, vocab, generator=g).clamp(min=torch.finfo(torch.float32).tiny, max=1 - 1e-7)
        out.append(-torch.log(-torch.log(u)))
    return out


def reference_filter(scores: torch.Tensor, rule: str, top_p: float) -> torch.Tensor:
    """Top-k, then top-p: 'default' keeps a token while the mass ranked above it is < top_p, 'paper' while
    the mass up to and including it is <= top_p; the most likely token always stays."""
    scores = scores.clone()
    kth = scores.sort(descending=True).values[TOP_K - 1]
    scores[scores < kth] = float("-inf")
    probs = torch.softmax(scores, dim=-1)
    order = probs.argsort(descending=True, stable=True)
    mass = 0.0
    for rank, token in enumerate(order.tolist()):
        p = float(probs[token])
        keep = rank == 0 or (mass + p <= top_p if rule == "paper" else mass < top_p)
        if not keep:
            scores[token] = float("-inf")
        mass += p
    return scores


def chooser(noise: list[torch.Tensor], row: int, rule: str, temperature: float, top_p: float):
    def choose(step: int, logits: torch.Tensor) -> int:
        scores = reference_filter(logits.float() / temperature, rule, top_p)
        return int((scores + noise[step][row]).argmax())

    return choose


def reference_rows(
    models, kind: str, rule: str, temperature: float = TEMPERATURE, top_p: float = TOP_P
) -> list[list[int]]:
    base, ft, ft2 = models
    noise = reference_noise(len(PROMPTS), hf_module(base).config.vocab_size)
    rows = []
    for r, text in enumerate(PROMPTS):
        ids = base.tokenizer(text)["input_ids"]
        if kind == "ensemble":
            toks = ensemble_generate(
                hf_module(base),
                hf_module(ft),
                ids,
                0.5,
                max_new_tokens=N_NEW,
                choose=chooser(noise, r, rule, temperature, top_p),
            )
        else:
            toks = lockstep_generate(
                hf_module(base), [hf_module(ft), hf_module(ft2)], ids, {2: 0.5}, "regmean",
                max_new_tokens=N_NEW, choose=chooser(noise, r, rule, temperature, top_p),
            )  # fmt: skip
        rows.append(toks)
    return rows


def cut_at(rows: list[list[int]], eos: set[int]) -> list[list[int]]:
    """Each row up to and including its first token in `eos` (noise depends on row and step only, so a
    row that ends early is a prefix of its free run)."""
    out = []
    for toks in rows:
        ends = [i for i, t in enumerate(toks) if t in eos]
        out.append(toks[: ends[0] + 1] if ends else toks)
    return out


@pytest.fixture(scope="module")
def references(models):
    return {k: reference_rows(models, k, "default") for k in ("regmean", "ensemble")}


@pytest.mark.parametrize("kind", ["regmean", "ensemble"])
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("engine", ["fast", "nnsight"])
def test_sampled_tokens_equal_the_reference_sampler_with_rows_ending_early(
    models, references, kind, padding, engine
):
    base, ft, ft2 = models
    free = references[kind]
    eos = {free[0][1], free[2][4]}
    expected = cut_at(free, eos)
    lengths = [len(t) for t in expected]
    assert len(set(lengths)) >= 2 and min(lengths) < N_NEW, lengths  # rows do finish at different steps
    sources, recipe = (
        (ft, Ensemble(b=0.5))
        if kind == "ensemble"
        else ([ft, ft2], lmn.Recipe(op="regmean", layers={2: 0.5}))
    )
    out = lmn.generate(
        base, sources, PROMPTS, recipe, max_new_tokens=N_NEW, do_sample=True, temperature=TEMPERATURE,
        top_k=TOP_K, top_p=TOP_P, seed=SEED, eos_token_id=sorted(eos), padding_side=padding, engine=engine,
        chat=False,
    )  # fmt: skip
    assert out.engine == engine
    assert out.tokens == expected


@pytest.mark.parametrize("kind", ["regmean", "ensemble"])
def test_paper_sampler_drops_the_token_that_crosses_top_p(models, kind):
    """`sampler="paper"` equals the reference under the paper's rule, and at these settings that rule picks
    other tokens than the default one (so the option is not a no-op)."""
    base, ft, ft2 = models
    temperature, top_p = 1.0, 0.5
    paper_ref = reference_rows(models, kind, "paper", temperature, top_p)
    assert paper_ref != reference_rows(models, kind, "default", temperature, top_p)
    sources, recipe = (
        (ft, Ensemble(b=0.5))
        if kind == "ensemble"
        else ([ft, ft2], lmn.Recipe(op="regmean", layers={2: 0.5}))
    )
    kw = dict(do_sample=True, temperature=temperature, top_k=TOP_K, top_p=top_p, seed=SEED, chat=False)
    paper = lmn.generate(
        base, sources, PROMPTS, recipe, max_new_tokens=N_NEW, ignore_eos=True, sampler="paper", **kw
    )
    assert paper.tokens == paper_ref


def test_top_p_rules_on_a_known_distribution():
    """probs 0.5, 0.3, 0.2 at top_p 0.6: the default keeps the crossing token (0.3), the paper's drops it."""
    from latent_merge_nnsight.sampling import filter_logits

    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    assert torch.isfinite(filter_logits(logits, top_p=0.6)).tolist() == [[True, True, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.6, sampler="paper")).tolist() == [
        [True, False, False]
    ]
    assert torch.isfinite(filter_logits(logits, top_p=0.3, sampler="paper")).tolist() == [
        [True, False, False]
    ]
    with pytest.raises(lmn.LatentMergeError, match="sampler='nucleus'; expected one of: default, paper"):
        lmn.generate(*pair("qwen2", n_layers=2)[:1], None, "hi", None, max_new_tokens=1, sampler="nucleus")
