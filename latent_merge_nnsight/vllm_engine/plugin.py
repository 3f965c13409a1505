"""vLLM's plugin entry point: `register()` makes `LatentMergeForCausalLM` known to vLLM's model registry.

Declared in pyproject.toml under `vllm.general_plugins`, so every vLLM process (the server, the engine
core, each worker) runs it at start-up: `vllm serve OUT_DIR` and `vllm.LLM(OUT_DIR)` need no user code.
No `vllm.logits_processors` entry point: vLLM loads those for every model (and Model Runner V2 refuses
V1-interface ones), so the config hook lists `requests.LatentMergeRequests` in our model's own
`logits_processors` instead.
"""

from latent_merge_nnsight.vllm_engine import ARCHITECTURE
from latent_merge_nnsight.vllm_engine.mix_op import LatentMergeConfig

# vllm is imported inside `register` only: an optional dependency (the `vllm` extra).

__all__ = ["register"]


def register() -> None:
    """Register the composite model, lazily (vLLM imports it only when a config names it), and its config
    hook (`mix_op.LatentMergeConfig`: the CUDA-graph mode that keeps the mix out of captured graphs)."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    MODELS_CONFIG_MAP.setdefault(ARCHITECTURE, LatentMergeConfig)

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(
            ARCHITECTURE, "latent_merge_nnsight.vllm_engine.model:LatentMergeForCausalLM"
        )
