"""vLLM's plugin entry point: `register()` makes `LatentMergeForCausalLM` known to vLLM's model registry.

Declared in pyproject.toml under `vllm.general_plugins`, so every vLLM process (the server, the engine
core, each worker) runs it at start-up: `vllm serve OUT_DIR` and `vllm.LLM(OUT_DIR)` need no user code.
The `vllm.logits_processors` entry point (`requests.LatentMergeRequests`) is declared beside it.
"""

from latent_merge_nnsight.vllm_engine import ARCHITECTURE

__all__ = ["register"]


def register() -> None:
    """Register the composite model, lazily (vLLM imports it only when a config names it)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(
            ARCHITECTURE, "latent_merge_nnsight.vllm_engine.model:LatentMergeForCausalLM"
        )
