"""`Stepper`, the one runner of every model in both engines, against HF's own forward."""

import pytest
import torch
from reference import position_ids
from tiny import hf_pair

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.generation.graphs import FixedStep
from latent_merge_nnsight.generation.stack import Stack, mask_positions
from latent_merge_nnsight.generation.stepper import Stepper

IDS = torch.tensor([[0, 0, 40, 41, 42], [50, 51, 52, 53, 54]])
MASK = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
NEW = torch.tensor([[60], [61]])
FULL_MASK = torch.cat([MASK, torch.ones(2, 1, dtype=torch.long)], 1)


@pytest.fixture(scope="module")
def hf():
    return hf_pair("qwen2", n_layers=3, seed=4)[0]


def _expected(hf) -> torch.Tensor:
    """HF's logits over prompt + new token in one forward: `[batch, 6, vocab]`."""
    full_ids = torch.cat([IDS, NEW], 1)
    return hf(input_ids=full_ids, attention_mask=FULL_MASK, position_ids=position_ids(FULL_MASK)).logits


def _prefill(stepper: Stepper, mask: torch.Tensor = MASK, ids: torch.Tensor = IDS) -> None:
    stepper.cache.begin(ids.shape[1])
    stepper.start(ids, mask_positions(mask), stepper.stack.attention_bias(mask, 0, ids.shape[1]))
    stepper.finish()


@torch.no_grad()
def test_eager_and_fixed_shape_decode_steps_give_hf_forward_logits(hf):
    expected = _expected(hf)
    eager, fixed = (
        Stepper(Stack(hf), 3, capacity=8, fixed=FixedStep(torch.device("cpu"), False, True, "a step"))
        for _ in range(2)
    )
    for stepper in (eager, fixed):
        _prefill(stepper)
        assert torch.allclose(stepper.logits(), expected[:, 4], atol=1e-10)
        stepper.cache.begin(1)
    eager.start(NEW, mask_positions(FULL_MASK)[:, -1:], eager.stack.attention_bias(FULL_MASK, 5, 1))
    per_block = [eager.h.clone()] + [eager.run_to(k).clone() for k in range(1, 4)]
    states = fixed.step_fixed(NEW, FULL_MASK)
    assert states is not None and fixed.ran == 3
    assert torch.allclose(eager.logits(), expected[:, 5], atol=1e-10)
    assert torch.allclose(fixed.logits(), expected[:, 5], atol=1e-10)
    for k, (a, b) in enumerate(zip(per_block, states, strict=True)):  # the residual after k blocks
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12, msg=f"after {k} blocks")


@torch.no_grad()
def test_kept_rows_decode_as_they_would_in_the_full_batch(hf):
    expected = _expected(hf)
    stepper = Stepper(Stack(hf), 3, capacity=8)
    _prefill(stepper)
    stepper.keep(torch.tensor([1]), in_place=False)  # row 0 finished
    assert stepper.cache.keys[0].shape[0] == 1
    stepper.cache.begin(1)
    mask = FULL_MASK[1:]
    stepper.start(NEW[1:], mask_positions(mask)[:, -1:], stepper.stack.attention_bias(mask, 5, 1))
    stepper.finish()
    assert torch.allclose(stepper.logits(), expected[1:, 5], atol=1e-10)


@torch.no_grad()
def test_a_stepper_runs_only_to_its_depth_so_a_later_deeper_step_is_refused(hf):
    """A source stops after the highest merged layer: its deeper caches never see the prompt, so asking a
    later step for a deeper block is an error, not a silently wrong state."""
    stepper = Stepper(Stack(hf), 2, capacity=8)
    _prefill(stepper)
    assert stepper.ran == 2 and stepper.cache.filled == [5, 5, 0]
    stepper.cache.begin(1)
    stepper.start(NEW, mask_positions(FULL_MASK)[:, -1:], stepper.stack.attention_bias(FULL_MASK, 5, 1))
    with pytest.raises(LatentMergeError, match="layer 2 holds 0 tokens but this forward starts at slot 5"):
        stepper.run_to(3)
