"""compute_deltas against a mean written in the test, and the safetensors round trip."""

import pytest
import torch
from reference import hidden_states
from tiny import pair

import latent_merge_nnsight as lmn
from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.inputs import encode

PROMPTS = ["one prompt", "a second, longer prompt", "3"]


def test_deltas_are_the_mean_difference_over_real_tokens(tmp_path):
    base, ft = pair("qwen2", n_layers=3)
    deltas = lmn.compute_deltas(base, ft, PROMPTS, layers=[0, 2], batch_size=2)
    batch = encode(base.tokenizer, PROMPTS)
    real = batch.attention_mask.bool()
    for layer in (0, 2):
        hb = hidden_states(base._module, batch.input_ids, batch.attention_mask, layer)
        hs = hidden_states(ft._module, batch.input_ids, batch.attention_mask, layer)
        expected = (hs - hb)[real].mean(dim=0)
        assert torch.allclose(deltas.vectors[layer], expected, atol=1e-12)
    assert deltas.n_tokens == int(real.sum())
    deltas.save(tmp_path / "d.safetensors")
    back = lmn.Deltas.load(tmp_path / "d.safetensors")
    assert back.site == "pre" and back.n_tokens == deltas.n_tokens
    assert all(torch.equal(back.vectors[k], deltas.vectors[k]) for k in (0, 2))
    assert "Deltas(site='pre'" in repr(back)


def test_a_capture_file_is_not_read_as_deltas_nor_deltas_as_a_capture(tmp_path):
    base, ft = pair("qwen2", n_layers=3)
    lmn.compute_deltas(base, ft, PROMPTS, layers=[1]).save(tmp_path / "d.safetensors")
    lmn.capture(base, PROMPTS, layers=[1]).save(tmp_path / "c.safetensors")
    with pytest.raises(
        LatentMergeError, match=r"d.safetensors is not a capture file \(format='lmn.deltas.v1'\)"
    ):
        lmn.Capture.load(tmp_path / "d.safetensors")
    with pytest.raises(
        LatentMergeError, match=r"c.safetensors is not a deltas file \(format='lmn.capture.v1'\)"
    ):
        lmn.Deltas.load(tmp_path / "c.safetensors")
