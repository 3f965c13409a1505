"""`export_vllm`: a system as a directory that `vllm serve` and `vllm.LLM` load (`lmn export vllm`).

The system's models and recipe are checked and written by `vllm_engine.export` (`check_export`,
`write_export`); this module only reads the system (a `System` or its YAML file) and refuses the kinds
the vLLM engine does not run.
"""

from pathlib import Path

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.systems.spec import System
from latent_merge_nnsight.vllm_engine.export import check_export, write_export

__all__ = ["export_vllm"]


def export_vllm(system: "System | str | Path", out_dir: str | Path) -> Path:
    """Write the vLLM directory of `system` (a `System`, or a system YAML path) to `out_dir`.

    Refused, with nothing written: a system kind other than latent or single, an unsupported family, a
    layer out of range, an unknown op, a source of another hidden size, a non-empty `out_dir` that is not
    an earlier export.
    """
    if not isinstance(system, System):
        system = System.from_file(system)
    if system.kind not in ("latent", "single"):
        raise LatentMergeError(
            f"system {system.name!r} has kind={system.kind!r}; the vLLM engine runs kind 'latent' "
            "(a recipe) or 'single' (one model); weight merges and logit ensembles are refused"
        )
    sources = [system.resolve(s) for s in system.sources]
    export = check_export(system.resolve(system.base), sources, system.recipe, name=system.name)
    return write_export(export, out_dir, dtype=system.dtype)
