"""Model Runner V2's request slots: our model state (vLLM's `DefaultModelState` plus the table) fed as V2's
model runner feeds it, and the rows the model's mix reads for each batch position, checked by hand."""

from types import SimpleNamespace

import numpy as np
import pytest
from vllm.sampling_params import SamplingParams
from vllm.v1.core.sched.output import NewRequestData
from vllm.v1.worker.gpu.model_states.default import DefaultModelState

from latent_merge_nnsight.vllm_engine.export import read_export
from latent_merge_nnsight.vllm_engine.model import _request_rows
from latent_merge_nnsight.vllm_engine.requests import TABLE
from latent_merge_nnsight.vllm_engine.runner_v2 import LatentMergeModelState

EXPORTED = [0.5, 0.5]  # the export's alphas at layers 2 and 3
PAD = 2**62  # `_request_rows`' first merged position of a padding request (never mixed)


def new_request(req_id: str, prompt: list[int], recipe=None, output: list[int] = ()) -> NewRequestData:
    """What V2's scheduler hands `add_requests`: a new request, or a preempted one re-filled with its
    partial output (`prefill_token_ids` = prompt + output)."""
    extra = None if recipe is None else {"latent_merge": recipe}
    return NewRequestData(
        req_id=req_id, prompt_token_ids=list(prompt), mm_features=[],
        sampling_params=SamplingParams(max_tokens=8, extra_args=extra), pooling_params=None,
        block_ids=([],), num_computed_tokens=0, lora_request=None,
        prefill_token_ids=[*prompt, *output],
    )  # fmt: skip


def batch(*req_ids_slots: tuple[str, int]) -> SimpleNamespace:
    """The parts of V2's `InputBatch` the state reads: batch position -> request and slot."""
    return SimpleNamespace(
        req_ids=[r for r, _ in req_ids_slots],
        idx_mapping_np=np.array([s for _, s in req_ids_slots], dtype=np.intp),
        num_reqs=len(req_ids_slots),
    )


@pytest.fixture
def state(export_block):
    """Our model state without a model: vLLM's base methods run with no rope / prompt-embeds state (a
    text-only model's), so every call goes through vLLM's own code."""
    s = object.__new__(LatentMergeModelState)
    assert isinstance(s, DefaultModelState)
    s.rope_state, s.prompt_embeds_state, s.supports_mm_inputs = None, None, False
    TABLE.reset(read_export(export_block), v2=True)
    yield s
    TABLE.reset(None, v2=False)


def rows() -> tuple[list[str], list[int], list[int], list[list[float]]]:
    """(ops, each request's first merged position, op index, alphas) for positions "last": the first
    merged position is the request's last prompt token, `prompt_len - 1`."""
    return _request_rows(len(TABLE.order or []), "lerp", EXPORTED, False)


def test_rows_follow_each_steps_order_not_the_slot_order(state):
    state.add_request(3, new_request("a", range(5), {"alpha": 0.2}))
    state.add_request(0, new_request("b", range(7), {"layers": {"3": 1.0}, "op": "slerp"}))
    state.add_request(1, new_request("c", range(2)))  # no recipe: the export's
    assert state.prepare_inputs(batch(("b", 0), ("a", 3), ("c", 1)), None) == {}
    assert rows() == (["lerp", "slerp"], [6, 4, 1], [1, 0, 0], [[0.0, 1.0], [0.2, 0.2], EXPORTED])
    state.prepare_inputs(batch(("c", 1), ("b", 0), ("a", 3)), None)  # V2 reorders between steps
    assert rows() == (["lerp", "slerp"], [1, 6, 4], [0, 1, 0], [EXPORTED, [0.0, 1.0], [0.2, 0.2]])
    state.prepare_inputs(batch(("a", 3)), None)  # a step with one request scheduled
    assert rows() == (["lerp"], [4], [0], [[0.2, 0.2]])


def test_a_preempted_request_comes_back_in_another_slot_with_its_prompt_length_and_recipe(state):
    state.add_request(0, new_request("a", range(6), {"alpha": 0.9}))
    state.add_request(1, new_request("b", range(4), {"alpha": 0.1}))
    state.remove_request("a")  # preempted (V2 frees its slot)...
    state.add_request(2, new_request("d", range(3), {"alpha": 0.4}))
    state.add_request(0, new_request("e", range(9)))  # ...which a new request takes, with no recipe
    state.add_request(3, new_request("a", range(6), {"alpha": 0.9}, output=[7, 7, 7]))  # re-filled
    state.prepare_inputs(batch(("a", 3), ("e", 0), ("b", 1), ("d", 2)), None)
    # `a`: the user's prompt length (6, not the 9 tokens re-fed), so "last" positions still start at 5
    assert rows() == (["lerp"], [5, 8, 3, 2], [0, 0, 0, 0], [[0.9, 0.9], EXPORTED, [0.1, 0.1], [0.4, 0.4]])
    state.remove_request("b")  # finished
    assert 1 not in TABLE.rows and sorted(TABLE.rows) == [0, 2, 3]


def test_dummy_batches_mix_nothing(state):
    state.add_request(0, new_request("a", range(6), {"alpha": 0.9}))
    state.prepare_inputs(batch(("a", 0)), None)
    assert rows()[1] == [5]
    # V2's dummy runs (profiling, DP padding) use made-up requests over slots 0..n-1
    state.prepare_inputs(batch(("req_0_dummy", 0), ("req_1_dummy", 1)), None)
    assert TABLE.order is None and _request_rows(2, "lerp", EXPORTED, False)[1] == [PAD, PAD]
    state.prepare_inputs(batch(("a", 0)), None)
    assert state.prepare_dummy_inputs(2, 8) == {}  # cudagraph capture's inputs
    assert _request_rows(2, "lerp", EXPORTED, False)[1] == [PAD, PAD]


def test_a_bad_recipe_that_reached_a_worker_runs_the_exports(state, caplog):
    state.add_request(0, new_request("a", range(4), {"alpha": "half"}))
    state.prepare_inputs(batch(("a", 0)), None)
    assert rows()[3] == [EXPORTED]
    assert "request runs the export's recipe" in caplog.text


def test_a_requests_merge_from_is_its_first_merged_position(state):
    state.add_request(0, new_request("a", range(6), {"merge_from": 2}))  # the export's alphas, from token 2
    state.add_request(1, new_request("b", range(6), {"alpha": 0.3, "merge_from": 0}))
    state.add_request(2, new_request("c", range(6)))
    state.prepare_inputs(batch(("c", 2), ("a", 0), ("b", 1)), None)
    assert rows() == (["lerp"], [5, 2, 0], [0, 0, 0], [EXPORTED, EXPORTED, [0.3, 0.3]])
