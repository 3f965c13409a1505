"""Sites: layer discovery per architecture, tuple outputs (transformers 4 style), unknown architectures."""

import pytest
import torch
from tiny import ROTARY_ARCHS, hf_pair
from torch import nn

import latent_merge_nnsight as lmn
from latent_merge_nnsight import LatentMergeError
from latent_merge_nnsight.sites import get_layers, n_layers, read_resid, site_name, write_resid


@pytest.mark.parametrize(
    "arch, path",
    [(a, "model.layers") for a in ROTARY_ARCHS]
    + [("gpt2", "transformer.h"), ("gpt_neox", "gpt_neox.layers")],
)
def test_layers_found_per_architecture(arch, path):
    hb, _ = hf_pair(arch, n_layers=3)
    obj = hb
    for part in path.split("."):
        obj = getattr(obj, part)
    assert get_layers(hb) is obj
    assert n_layers(hb) == 3


def test_site_names_are_canonical():
    assert site_name(20) == "layers.20.resid_pre"
    assert site_name(3, "post") == "layers.3.resid_post"
    with pytest.raises(LatentMergeError, match="site='mid'"):
        site_name(1, "mid")


class TupleBlock(nn.Module):
    """A transformers-4 style block: returns (hidden, extra)."""

    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, h):
        return (h + torch.tanh(self.lin(h)), "extra")


class TupleConfig:
    model_type = "tuple_toy"
    hidden_size = 8
    vocab_size = 10


class TupleLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = TupleConfig()
        self.emb = nn.Embedding(10, 8)
        self.stack = nn.Module()
        self.stack.blocks = nn.ModuleList([TupleBlock(8) for _ in range(3)])
        self.head = nn.Linear(8, 10)

    def forward(self, input_ids):
        h = self.emb(input_ids)
        for blk in self.stack.blocks:
            h = blk(h)[0]
        return self.head(h)


def test_unknown_architecture_error_says_how_to_register():
    with pytest.raises(
        LatentMergeError,
        match=r"unknown architecture model_type='tuple_toy'.*register_architecture\('tuple_toy'",
    ):
        get_layers(TupleLM())


def test_tuple_outputs_read_and_write_post_site():
    from nnsight import NNsight

    lmn.register_architecture("tuple_toy", layers="stack.blocks")
    torch.manual_seed(0)
    model = TupleLM()
    ids = torch.tensor([[1, 2, 3]])
    w = NNsight(model)
    blocks = get_layers(w)
    with torch.no_grad(), w.trace(ids):
        h_post = read_resid(blocks[1], "post").clone().save()
        write_resid(blocks[1], "post", h_post * 0)
        h_pre = read_resid(blocks[2], "pre").save()
        out = w.output.save()
    with torch.no_grad():
        h = model.emb(ids)
        h = model.stack.blocks[0](h)[0]
        expect_post = model.stack.blocks[1](h)[0]
        expect_out = model.head(model.stack.blocks[2](torch.zeros_like(expect_post))[0])
    assert torch.allclose(h_post, expect_post)
    assert torch.equal(h_pre, torch.zeros_like(expect_post))
    assert torch.allclose(out, expect_out)
