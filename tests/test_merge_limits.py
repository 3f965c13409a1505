"""The demo's limiting rows on the shipped pair, against independent references (HF `generate`, float32).

- `pre` L=0 alpha=0 leaves the base untouched: its tokens are the base's own greedy tokens.
- `post` L=5 (the last block's output) alpha=1 replaces the base's whole stack by the reasoner's; what
  still runs of the base is its final norm and LM head. Its tokens are those of the reasoner with the
  base's final norm and (tied) head put in. On this pair those two layers differ between the models, so
  that model, not the reasoner itself, is the reference; the test also counts how often it matches the
  reasoner, as the demo's report does.
"""

import copy

import pytest
import torch
from torch import nn

import latent_merge_nnsight as lmn
from latent_merge_nnsight.evaluation.tasks import CATEGORIES, MAX_NEW_TOKENS, chat_messages, make_eval_set
from latent_merge_nnsight.models import hf_module

N = 4  # prompts per category


def _hf_tokens(module: nn.Module, tokenizer, chats, max_new_tokens: int) -> list[list[int]]:
    """Greedy new tokens of a plain HF model, left-padded, up to and including the EOS that ends a row."""
    rows = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    ids = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in rows]
    width, pad, eos = max(map(len, ids)), tokenizer.pad_token_id, tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in ids])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])
    with torch.no_grad():
        gen = module.generate(
            input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=eos, pad_token_id=pad,
        )  # fmt: skip
    out = []
    for row in gen[:, width:].tolist():
        out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out


def _reasoner_under_base_head(base, ft) -> nn.Module:
    """The reasoner's embeddings and blocks, then the base's final norm and LM head (untied from the
    reasoner's input embeddings)."""
    ref = copy.deepcopy(hf_module(ft))
    b = hf_module(base)
    ref.model.norm.weight = nn.Parameter(b.model.norm.weight.detach().clone())
    ref.lm_head.weight = nn.Parameter(b.lm_head.weight.detach().clone())
    assert ref.lm_head.weight is not ref.model.embed_tokens.weight
    return ref.eval()


@pytest.mark.parametrize("category", CATEGORIES)
def test_post_last_layer_alpha_one_is_the_reasoner_under_the_base_head(pair, category):
    base, ft = pair
    chats = [chat_messages(e.prompt) for e in make_eval_set(category, N, seed=0)]
    budget = MAX_NEW_TOKENS[category]
    recipe = lmn.Recipe(op="lerp", site="post", layers={5: 1.0})
    got = lmn.generate(base, ft, chats, recipe, max_new_tokens=budget).tokens
    assert got == _hf_tokens(_reasoner_under_base_head(base, ft), base.tokenizer, chats, budget)
    slerp = lmn.generate(base, ft, chats, recipe.model_copy(update={"op": "slerp"}), max_new_tokens=budget)
    assert slerp.tokens == got  # both ops return the source state itself at alpha = 1


@pytest.mark.parametrize("category", CATEGORIES)
def test_pre_layer_zero_alpha_zero_is_the_base(pair, category):
    base, ft = pair
    chats = [chat_messages(e.prompt) for e in make_eval_set(category, N, seed=0)]
    budget = MAX_NEW_TOKENS[category]
    got = lmn.generate(base, ft, chats, lmn.Recipe(op="lerp", layers={0: 0.0}), max_new_tokens=budget)
    assert got.tokens == _hf_tokens(hf_module(base), base.tokenizer, chats, budget)


def test_post_last_layer_alpha_one_and_the_reasoner_itself_differ_only_by_the_head(pair):
    """With the reasoner's own norm and head the same merge would be the reasoner: check that the two
    layers are the only difference between the reference and the reasoner."""
    base, ft = pair
    ref, own = _reasoner_under_base_head(base, ft).state_dict(), hf_module(ft).state_dict()
    differ = {k for k in own if not torch.equal(own[k], ref[k])}
    assert differ == {"model.norm.weight", "lm_head.weight"}
