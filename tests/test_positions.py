"""Position selection over attention masks, left and right padded."""

import pytest
import torch

from latent_merge_nnsight import LatentMergeError
from latent_merge_nnsight.positions import last_real_index, position_mask

LEFT = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
RIGHT = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])


def rows(sel):
    return [torch.nonzero(r).flatten().tolist() for r in sel]


def test_last_real_index_from_mask_not_from_minus_one():
    assert last_real_index(LEFT).tolist() == [4, 4, 4]
    assert last_real_index(RIGHT).tolist() == [2, 4, 0]


def test_last_at_prefill_and_every_token_while_decoding():
    assert rows(position_mask(RIGHT, "last")) == [[2], [4], [0]]
    assert rows(position_mask(LEFT, "last")) == [[4], [4], [4]]
    step = torch.ones(3, 1, dtype=torch.long)
    assert rows(position_mask(step, "last", decoding=True)) == [[0], [0], [0]]


def test_all_excludes_padding():
    assert rows(position_mask(LEFT, "all")) == [[2, 3, 4], [0, 1, 2, 3, 4], [4]]
    assert rows(position_mask(RIGHT, "all")) == [[0, 1, 2], [0, 1, 2, 3, 4], [0]]


def test_indices_count_real_tokens_under_both_paddings():
    assert rows(position_mask(LEFT, [0, -1])) == [[2, 4], [0, 4], [4]]
    assert rows(position_mask(RIGHT, [0, -1])) == [[0, 2], [0, 4], [0]]
    assert rows(position_mask(RIGHT, [1])) == [[1], [1], []]  # the 1-token row has no index 1
    assert rows(position_mask(LEFT, slice(1, None))) == [[3, 4], [1, 2, 3, 4], []]
    assert rows(position_mask(RIGHT, slice(-2, None))) == [[1, 2], [3, 4], [0]]
    step = torch.ones(3, 1, dtype=torch.long)
    assert rows(position_mask(step, [0], decoding=True)) == [[], [], []]


def test_boolean_mask_is_anded_with_real_tokens():
    sel = torch.tensor([True, True, False, False, True])
    assert rows(position_mask(LEFT, sel)) == [[4], [0, 1, 4], [4]]
    with pytest.raises(LatentMergeError, match="positions mask has shape"):
        position_mask(LEFT, torch.ones(3, dtype=torch.bool))
    with pytest.raises(LatentMergeError, match="expected a boolean mask"):
        position_mask(LEFT, torch.ones(5))


@pytest.mark.parametrize("positions", [[100], [-100], [0, 10], slice(50, None)])
def test_positions_out_of_range_raise_naming_positions(positions):
    mask = torch.ones(2, 10, dtype=torch.long)
    with pytest.raises(LatentMergeError, match="positions="):
        position_mask(mask, positions)


def test_merge_into_with_positions_past_the_prompt_raises():
    from tiny import pair

    import latent_merge_nnsight as lmn

    base, ft = pair("qwen2", n_layers=2)
    cap = lmn.capture(ft, "hello there", layers=[1])
    with pytest.raises(LatentMergeError, match="positions"), torch.no_grad(), base.trace("hello there"):
        lmn.merge_into(layer=1, source=cap, op="lerp", alpha=0.5, positions=[100])
