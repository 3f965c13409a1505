"""Loading from disk (real from_pretrained code path), truncation, compatibility reports, wrapping."""

import pytest
import torch
from tiny import hf_pair, make_tokenizer

import latent_merge_nnsight as lmn
from latent_merge_nnsight import LatentMergeError
from latent_merge_nnsight.models import model_info, truncate


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    hb, hs = hf_pair("qwen2", n_layers=4, dtype=torch.float32)
    root = tmp_path_factory.mktemp("models")
    for name, m in (("base", hb), ("ft", hs)):
        m.save_pretrained(root / name)
        make_tokenizer().save_pretrained(root / name)
    return root, hb, hs


def test_load_local_directory_matches_in_memory_model(saved):
    root, hb, _ = saved
    base = lmn.load(root / "base", dtype="float32")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad(), base.trace(input_ids=ids, attention_mask=torch.ones_like(ids)):
        logits = base.lm_head.output.save()
    with torch.no_grad():
        ref = hb(input_ids=ids).logits
    assert torch.allclose(logits, ref, atol=1e-6)
    info = model_info(base)
    assert info.n_layers == 4 and not info.truncated and info.name.endswith("base")


def test_up_to_layer_loads_only_lower_blocks_with_identical_states(saved):
    root, _, hs = saved
    full = lmn.load(root / "ft", dtype="float32")
    part = lmn.load(root / "ft", dtype="float32", up_to_layer=1)
    info = model_info(part)
    assert (info.n_layers, info.full_n_layers, info.truncated) == (2, 4, True)
    assert len(part._module.model.layers) == 2
    n_full = sum(p.numel() for p in full._module.parameters())
    n_part = sum(p.numel() for p in part._module.parameters())
    assert n_part < n_full
    a = lmn.capture(full, "some text", layers=[0, 1], site="post")
    b = lmn.capture(part, "some text", layers=[0, 1], site="post")
    assert torch.allclose(a[1], b[1], atol=1e-6)
    with pytest.raises(LatentMergeError, match=r"layers=2 is out of range .* \(2 layers\)"):
        lmn.capture(part, "x", layers=[2])
    with pytest.raises(LatentMergeError, match=r"up_to_layer=4 is out of range .* 4 layers"):
        lmn.load(root / "ft", up_to_layer=4)


def test_truncate_in_memory_model():
    hb, _ = hf_pair("llama", n_layers=4)
    full = lmn.wrap(hb, make_tokenizer(), name="llama")
    before = lmn.capture(full, "abc", layers=[1])
    cut = truncate(full, 1)
    assert model_info(cut).n_layers == 2 and model_info(cut).full_n_layers == 4
    assert torch.equal(lmn.capture(cut, "abc", layers=[1])[1], before[1])


def test_check_compatible_reports_sizes():
    hb, hs = hf_pair("qwen2", n_layers=3)
    base, ft = lmn.wrap(hb, make_tokenizer()), lmn.wrap(hs, make_tokenizer())
    report = lmn.check_compatible(base, ft)
    assert (report.hidden_size, report.vocab_size, report.base_layers, report.source_layers) == (
        32,
        128,
        3,
        3,
    )
    assert "compatible: hidden_size=32" in str(report)
    hv, _ = hf_pair("qwen2", n_layers=3)
    hv.resize_token_embeddings(130)
    with pytest.raises(LatentMergeError, match="vocab_size differs: base .* has 128, source .* has 130"):
        lmn.check_compatible(base, lmn.wrap(hv, make_tokenizer()))


def test_bad_load_arguments():
    with pytest.raises(LatentMergeError, match="dtype='float33'"):
        lmn.models._dtype("float33")
    with pytest.raises(LatentMergeError, match="quantization='3bit'"):
        lmn.models._quantization("3bit")
    with pytest.raises(LatentMergeError, match="tokenizer is required"):
        lmn.wrap(hf_pair("qwen2", n_layers=2)[0])
    with pytest.raises(LatentMergeError, match="expected a torch nn.Module"):
        lmn.wrap("not a model", make_tokenizer())


def test_generic_tokenizer_loads_as_saved_not_as_the_model_family(saved):
    root, _, _ = saved
    base = lmn.load(root / "base")
    text = "a b  c, d"
    assert base.tokenizer.decode(base.tokenizer(text)["input_ids"]) == text
    assert base.tokenizer(text)["input_ids"] == make_tokenizer()(text)["input_ids"]


def test_recorder_knows_prompt_forwards_from_decode_steps():
    from transformers import DynamicCache

    from latent_merge_nnsight.models import last_inputs, last_past_length

    hb, _ = hf_pair("qwen2", n_layers=2)
    base = lmn.wrap(hb, make_tokenizer())
    cache = DynamicCache()
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        hb(input_ids=ids, past_key_values=cache, use_cache=True)
        assert last_past_length(base) == 0 and torch.equal(last_inputs(base)[0], ids)
        hb(
            input_ids=torch.tensor([[8]]), past_key_values=cache, use_cache=True
        )  # no mask, as HF generate does
        assert last_past_length(base) == 3


def test_recorder_copies_a_static_cache_length_without_reading_it():
    from transformers import StaticCache

    from latent_merge_nnsight.models import _past_length, last_past_length

    hb, _ = hf_pair("qwen2", n_layers=2, dtype=torch.float32)
    base = lmn.wrap(hb, make_tokenizer())
    cache = StaticCache(config=hb.config, max_cache_len=8)
    with torch.no_grad():
        hb(input_ids=torch.tensor([[5, 6, 7]]), past_key_values=cache, use_cache=True)
        assert last_past_length(base) == 0
        hb(input_ids=torch.tensor([[8]]), past_key_values=cache, use_cache=True)
    # the cache counts in a tensor it updates in place: a copy, not an alias, still says 3 after the step
    assert last_past_length(base) == 3 and int(cache.get_seq_length()) == 4

    # recording must not read a device-held length back (a GPU sync per step): a meta tensor cannot be read
    class DeviceCounted:
        def get_seq_length(self) -> torch.Tensor:
            return torch.tensor(3, device="meta")

    assert _past_length({"past_key_values": DeviceCounted()}).device.type == "meta"
    assert _past_length({"cache_position": torch.arange(3, 5, device="meta")}).device.type == "meta"


def test_recorder_stays_out_of_compiled_forwards():
    from latent_merge_nnsight.models import last_inputs

    hb, _ = hf_pair("qwen2", n_layers=2, dtype=torch.float32)
    base = lmn.wrap(hb, make_tokenizer())
    eager_ids, compiled_ids = torch.tensor([[5, 6, 7]]), torch.tensor([[9, 10]])
    compiled = torch.compile(hb, backend="eager", fullgraph=True)
    with torch.no_grad():
        hb(input_ids=eager_ids)
        out = compiled(input_ids=compiled_ids)  # HF's static-cache generate compiles the forward like this
    assert torch.equal(last_inputs(base)[0], eager_ids)
    with torch.no_grad():
        assert torch.allclose(out.logits, hb(input_ids=compiled_ids).logits, atol=1e-5)
