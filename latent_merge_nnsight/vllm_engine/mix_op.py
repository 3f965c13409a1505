"""The mix at a merged site as a vLLM custom op, so the composite model compiles and CUDA-graphs.

`torch.ops.vllm.latent_merge_mix(hidden, sources, positions, output, layer, site, model)` is opaque to
dynamo: the compiled forward holds one call per merged site and nothing of the batch, while the op runs
eagerly every forward, reads the forward context and the request table and mixes with this forward's
per-token alphas (built once per forward, see `LatentMergeForCausalLM.mix_now`). Like vLLM's attention
ops it is a splitting op (piecewise CUDA graphs are captured between the mixes, never around one; the
config hook `LatentMergeConfig` forces that cudagraph mode) and writes into `output`, allocated by the
piece before it, so the piece after it reads from the address it was captured with.
"""

import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from vllm.config import ModelConfig, VllmConfig

# Imported inside functions: vllm (optional) and `requests` (it pulls plan/models, transformers and
# nnsight, too heavy for `plugin.register`, which imports this module in every vLLM process).

__all__ = ["OP", "MODELS", "LatentMergeConfig", "register_mix_op"]

OP = "vllm::latent_merge_mix"
"""The op's name as `compilation_config.splitting_ops` lists it."""
MODELS: "weakref.WeakValueDictionary[str, Any]" = weakref.WeakValueDictionary()
"""Model name -> the `LatentMergeForCausalLM` of this process the op mixes for (an engine shut down
leaves no model behind here)."""


def _mix(
    hidden: Tensor,
    sources: list[Tensor],
    positions: Tensor,
    output: Tensor,
    layer: int,
    site: str,
    model: str,
) -> None:
    output.copy_(MODELS[model].mix_now(layer, site, hidden, sources, positions))


def _mix_fake(
    hidden: Tensor,
    sources: list[Tensor],
    positions: Tensor,
    output: Tensor,
    layer: int,
    site: str,
    model: str,
) -> None:
    return None


def register_mix_op() -> None:
    """Register the op with vLLM's op library (once per process)."""
    if hasattr(torch.ops.vllm, "latent_merge_mix"):
        return
    from vllm.utils.torch_utils import direct_register_custom_op

    direct_register_custom_op("latent_merge_mix", _mix, mutates_args=["output"], fake_impl=_mix_fake)


class LatentMergeConfig:
    """The model's config hook (vLLM's `MODELS_CONFIG_MAP` entry, added by `plugin.register`); it runs
    in each process that builds the config: `vllm.LLM`'s, `vllm serve`'s and each of its API servers
    (`--api-server-count N`: each of the N builds its own, so each front end knows the export)."""

    @staticmethod
    def verify_and_update_config(vllm_config: "VllmConfig") -> None:
        """Note the export for the front end's request checks and list the model's logits processor
        (`requests.attach_processor`). No full CUDA graphs: they would capture
        the mix with the batch of capture time; piecewise graphs split around the op (the model adds it
        to the splitting ops)."""
        from vllm.config import CompilationMode, CUDAGraphMode

        from latent_merge_nnsight.vllm_engine.requests import attach_processor, note_export

        note_export(vllm_config)  # so the front end checks requests against the export
        attach_processor(vllm_config)  # this model's own logits processor, never a global plugin
        cc = vllm_config.compilation_config
        mode = cc.cudagraph_mode
        if cc.mode is not None and cc.mode != CompilationMode.VLLM_COMPILE:
            if mode is None:  # no piecewise graphs without vLLM's compile: no graphs at all
                cc.cudagraph_mode = CUDAGraphMode.NONE
            return  # an explicit mode is checked by the model (a clear refusal)
        if mode is None or (mode != CUDAGraphMode.NONE and mode != CUDAGraphMode.PIECEWISE):
            if mode is not None:
                import logging

                logging.getLogger("latent_merge_nnsight.vllm").warning(
                    "cudagraph_mode=%s would capture the latent merge inside a graph: using PIECEWISE",
                    mode.name,
                )
            cc.cudagraph_mode = CUDAGraphMode.PIECEWISE

    @staticmethod
    def verify_and_update_model_config(model_config: "ModelConfig") -> None:
        return
