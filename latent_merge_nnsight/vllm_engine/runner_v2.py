"""Model Runner V2 (vLLM's default on GPUs): the model's own state, which tells the mix which request each
scheduled request is.

V2 keeps requests in persistent slots and orders each step's batch afresh; the model learns neither from
its forward. `LatentMergeModelState` (the model's `get_model_state_cls`) is V2's default state plus:
- `add_request(slot, new request)`: the request's prompt length (the user's prompt, also when V2 re-fills a
  preempted request with its partial output) and its own recipe (`SamplingParams.extra_args`) in `TABLE`,
  replacing whatever the slot held; `remove_request` frees it (finished or preempted);
- `prepare_inputs(input_batch)`: this step's batch position -> slot (`idx_mapping_np`), read before the
  forward; the token boundaries are the attention metadata's `query_start_loc`, as under V1.
The front-end checks (`validate_params`) stay with `requests.LatentMergeRequests`, listed in the model's
`logits_processors` by the config hook.
"""

from typing import TYPE_CHECKING, Any

from vllm.v1.worker.gpu.model_states.default import DefaultModelState

from latent_merge_nnsight.vllm_engine.export import read_export
from latent_merge_nnsight.vllm_engine.requests import TABLE

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.output import NewRequestData
    from vllm.v1.worker.gpu.input_batch import InputBatch
    from vllm.v1.worker.gpu.mm.encoder_cache import EncoderCache
    from vllm.v1.worker.gpu.states import RequestState

__all__ = ["LatentMergeModelState"]


class LatentMergeModelState(DefaultModelState):
    """V2's default model state, keeping `TABLE` by request slot (see the module docstring)."""

    def __init__(
        self,
        vllm_config: "VllmConfig",
        model: "torch.nn.Module",
        encoder_cache: "EncoderCache | None",
        device: "torch.device",
    ) -> None:
        super().__init__(vllm_config, model, encoder_cache, device)
        hf = vllm_config.model_config.hf_config.get_text_config()
        TABLE.reset(read_export(hf.latent_merge), v2=True)

    def add_request(self, req_index: int, new_req_data: "NewRequestData") -> None:
        super().add_request(req_index, new_req_data)
        TABLE.add_slot(req_index, new_req_data.req_id, new_req_data.prompt_len, new_req_data.sampling_params)

    def remove_request(self, req_id: str) -> None:
        super().remove_request(req_id)
        TABLE.remove_request(req_id)

    def prepare_inputs(self, input_batch: "InputBatch", req_states: "RequestState") -> dict[str, Any]:
        TABLE.set_order(input_batch.idx_mapping_np[: input_batch.num_reqs], input_batch.req_ids)
        return super().prepare_inputs(input_batch, req_states)

    def prepare_dummy_inputs(self, num_reqs: int, num_tokens: int) -> dict[str, Any]:
        TABLE.set_order(None)  # a capture or profiling batch: nothing mixes
        return super().prepare_dummy_inputs(num_reqs, num_tokens)
