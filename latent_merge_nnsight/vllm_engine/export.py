"""A latent merge (base, sources, recipe) checked for vLLM and written as a directory that `vllm serve`
and `vllm.LLM` load (`systems.export.export_vllm` writes a system's).

The directory holds the base's `config.json` with `architectures: [LatentMergeForCausalLM]` and a
`latent_merge` block (where the base's and the sources' weights are, how many source blocks run, the
recipe), the base's tokenizer files, the steering deltas when the op is `delta`, and a one-tensor
placeholder weights file (vLLM's loader wants a weights file; the model reads the real ones itself, the
sources only up to their highest merged layer).

Everything is checked before anything is written: the model family, each source's family, hidden size
and depth, the recipe's layers, op, positions and parameters. A failed export leaves nothing behind.
"""

import importlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.models import _resolve_name
from latent_merge_nnsight.ops import OpSpec, get_op
from latent_merge_nnsight.plan import Plan, check_source_count, load_recipe_deltas, recipe_plan
from latent_merge_nnsight.recipe import Recipe
from latent_merge_nnsight.vllm_engine import ARCHITECTURE, SUPPORTED_FAMILIES

__all__ = ["FORMAT", "Export", "check_export", "read_export", "write_export"]

FORMAT = "lmn.vllm.v1"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
PLACEHOLDER = "lmn-placeholder.safetensors"
DELTAS_FILE = "steering.deltas"
BUILTIN_OPS = ("lerp", "slerp", "regmean", "delta")


@dataclass
class Export:
    """What an export directory says (the `latent_merge` block of its config.json), checked.

    Attributes:
        base: directory of the base's weights and config.
        sources: directories of the sources (empty for op delta or a base alone).
        recipe: the recipe's dict (`Recipe.to_dict`), None for the base alone.
        layers: every layer the recipe lists (a per-request recipe may set these, and only these).
        source_blocks: blocks each source runs (up to the highest merged layer).
        n_layers: blocks of the base.
        op_modules: modules to import so that a registered (non built-in) op exists in vLLM's workers.
        name: the system's name (the served model's default label).
    """

    base: str
    sources: list[str]
    recipe: dict[str, Any] | None
    layers: list[int]
    source_blocks: int
    n_layers: int
    op_modules: list[str] = field(default_factory=list)
    name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **self.__dict__}

    def recipe_obj(self) -> Recipe | None:
        return None if self.recipe is None else Recipe.model_validate(self.recipe)


def _config(model_dir: Path, what: str) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise LatentMergeError(
            f"{what}: {model_dir} has no config.json; expected a Hugging Face model folder"
        )
    return json.loads(path.read_text())


def _local_dir(ref: str, what: str) -> Path:
    """A model reference as a local folder: a path, a zoo name, or a hub id already downloaded."""
    name = _resolve_name(ref)
    if Path(name).is_dir():
        return Path(name).resolve()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name)).resolve()
    except Exception as e:  # noqa: BLE001 - the hub client's many errors, one message
        raise LatentMergeError(f"{what}={ref!r} could not be found locally or downloaded: {e}") from e


def _family(config: dict[str, Any], what: str) -> str:
    family = config.get("model_type")
    if family not in SUPPORTED_FAMILIES:
        raise LatentMergeError(
            f"{what} has model_type={family!r}, which the vLLM engine does not support; supported families: "
            f"{', '.join(SUPPORTED_FAMILIES)} (Qwen2/Qwen2.5, Qwen3, Llama, Mistral)"
        )
    types = config.get("layer_types")
    if isinstance(types, list) and len(set(types)) > 1:  # vLLM's cache config has one window for all
        raise LatentMergeError(
            f"{what} mixes attention layer types {sorted(set(types))} (a sliding window on some layers "
            "only, e.g. Qwen's use_sliding_window with max_window_layers); the vLLM engine runs one kind "
            "of attention on every layer"
        )
    return family


def check_export(
    base_ref: str, source_refs: list[str], recipe: Recipe | None, name: str | None = None
) -> Export:
    """Check a (base, sources, recipe) for the vLLM engine and describe it as an `Export` (nothing written).

    Errors name the parameter: the base's or a source's family, a source's hidden size or depth, the
    recipe's layers, op, positions or weights.
    """
    base_dir = _local_dir(base_ref, "base")
    base_cfg = _config(base_dir, "base")
    family = _family(base_cfg, f"base {base_ref!r}")
    n_layers, hidden = int(base_cfg["num_hidden_layers"]), int(base_cfg["hidden_size"])
    if recipe is None:
        if source_refs:
            raise LatentMergeError(f"sources={source_refs} but no recipe; give a recipe or no sources")
        return Export(str(base_dir), [], None, [], 0, n_layers, name=name)
    plan = recipe_plan(recipe, n_layers)  # layers out of range: "recipe field 'layers': ..."
    spec = plan.op
    if not isinstance(plan.positions, str):
        raise LatentMergeError(
            f"recipe positions={recipe.positions!r}: the vLLM engine merges at positions 'last' or 'all' "
            "(explicit prompt indices are not supported there)"
        )
    unresolved = [layer for layer, a in plan.alphas.items() if a is None]
    if unresolved:
        raise LatentMergeError(
            f"recipe op={spec.name!r} gives no alpha at layers {unresolved}; the vLLM engine runs an alpha "
            "at every layer: give alpha (or lambda for regmean)"
        )
    modules = _op_modules(spec)
    if spec.static_source:
        _check_deltas(spec, recipe, plan, hidden, source_refs)
        blocks = 0
    else:
        blocks = _live_blocks(spec, plan, n_layers, source_refs)
    source_dirs = _source_dirs(source_refs, family, hidden, blocks, plan)
    return Export(
        base=str(base_dir),
        sources=source_dirs,
        recipe=recipe.to_dict(),
        layers=sorted(plan.alphas),
        source_blocks=blocks,
        n_layers=n_layers,
        op_modules=modules,
        name=name,
    )


def _op_modules(spec: OpSpec) -> list[str]:
    """The module to import in vLLM's workers for an op that is not built in (none for a built-in op)."""
    if spec.name in BUILTIN_OPS:
        return []
    module = getattr(spec.fn, "__module__", "__main__")
    if module in (None, "__main__"):
        raise LatentMergeError(
            f"recipe op={spec.name!r} is registered in __main__; vLLM's workers cannot import it: define "
            "the op in an importable module (its @register_op runs when the module is imported)"
        )
    return [module]


def _check_deltas(spec: OpSpec, recipe: Recipe, plan: Plan, hidden: int, source_refs: list[str]) -> None:
    """A steering op: no sources, and `recipe.deltas` at the recipe's site with the base's hidden size."""
    if source_refs:
        raise LatentMergeError(f"op {spec.name!r} steers with recipe.deltas; sources={source_refs} unused")
    if recipe.deltas is None:
        raise LatentMergeError(f"op {spec.name!r} needs recipe.deltas (a file written by Deltas.save)")
    deltas = load_recipe_deltas(recipe)
    if deltas.site != recipe.site:
        raise LatentMergeError(
            f"recipe.deltas were computed at site={deltas.site!r} but the recipe merges at "
            f"site={recipe.site!r}"
        )
    for layer in plan.alphas:
        v = deltas.resid(layer, recipe.site)
        if v.shape[-1] != hidden:
            raise LatentMergeError(
                f"recipe.deltas layer {layer} has size {v.shape[-1]}; the base's hidden_size is {hidden}"
            )


def _live_blocks(spec: OpSpec, plan: Plan, n_layers: int, source_refs: list[str]) -> int:
    """A mixing op: check the sources against the op and the weights; the source blocks the recipe runs
    (every listed layer: a per-request recipe may set any of them)."""
    if not source_refs:
        raise LatentMergeError(f"op {spec.name!r} mixes live sources, but sources is empty")
    check_source_count(spec, plan, len(source_refs), f"sources={source_refs}")
    return plan.source_blocks(n_layers, listed=True)


def _source_dirs(source_refs: list[str], family: str, hidden: int, blocks: int, plan: Plan) -> list[str]:
    """Each source as a local folder, checked against the base (family, hidden size) and the recipe."""
    source_dirs = []
    for i, ref in enumerate(source_refs):
        d = _local_dir(ref, f"sources[{i}]")
        cfg = _config(d, f"sources[{i}]")
        what = f"sources[{i}] {ref!r}"
        if _family(cfg, what) != family:
            raise LatentMergeError(f"{what} has model_type={cfg['model_type']!r}; the base's is {family!r}")
        if int(cfg["hidden_size"]) != hidden:
            raise LatentMergeError(
                f"{what} has hidden_size={cfg['hidden_size']}; the base's hidden_size is {hidden} "
                "(residuals are mixed elementwise: the sizes must match)"
            )
        if int(cfg["num_hidden_layers"]) < blocks:
            raise LatentMergeError(
                f"{what} has {cfg['num_hidden_layers']} layers; the recipe needs {blocks} "
                f"(layers {sorted(plan.alphas)}, site {plan.site!r})"
            )
        source_dirs.append(str(d))
    return source_dirs


def write_export(export: Export, out_dir: str | Path, dtype: str = "auto") -> Path:
    """Write an already checked `Export` to `out_dir` (through a scratch folder, so a failure leaves
    nothing half written)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and read_export_or_none(out) is None:
        raise LatentMergeError(
            f"OUT_DIR {str(out)!r} exists and is not empty (and is not an earlier export); choose a new "
            "folder"
        )
    base = Path(export.base)
    config = _config(base, "base")
    config["architectures"] = [ARCHITECTURE]
    if dtype not in (None, "auto"):
        config["dtype"] = dtype
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".lmn-export-", dir=out.parent))
    try:
        recipe = export.recipe_obj()
        block = export.to_dict()
        if recipe is not None and recipe.deltas is not None:
            load_recipe_deltas(recipe).save(scratch / DELTAS_FILE)
            block["recipe"] = {**block["recipe"], "deltas": DELTAS_FILE}
        config["latent_merge"] = block
        (scratch / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if (base / name).is_file():
                shutil.copy2(base / name, scratch / name)
        save_file({"lmn.placeholder": torch.zeros(1)}, str(scratch / PLACEHOLDER))
        if out.exists():
            shutil.rmtree(out)
        scratch.rename(out)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return out


def read_export_or_none(folder: Path) -> Export | None:
    try:
        return read_export(folder)
    except (LatentMergeError, OSError, ValueError):
        return None


def read_export(folder_or_config: str | Path | dict[str, Any]) -> Export:
    """The `Export` of an export folder, or of its `latent_merge` config block (a dict)."""
    if isinstance(folder_or_config, dict):
        block, folder = folder_or_config, None
    else:
        folder = Path(folder_or_config)
        block = _config(folder, "export").get("latent_merge")
    if not isinstance(block, dict) or block.get("format") != FORMAT:
        raise LatentMergeError(
            f"{folder} is not an lmn vLLM export (no latent_merge block of format {FORMAT})"
        )
    fields = {k: v for k, v in block.items() if k != "format"}
    export = Export(**fields)
    if folder is not None and export.recipe is not None and export.recipe.get("deltas"):
        deltas = Path(export.recipe["deltas"])
        export.recipe = {**export.recipe, "deltas": str(deltas if deltas.is_absolute() else folder / deltas)}
    for module in export.op_modules:  # a registered op's module registers it on import
        importlib.import_module(module)
    if export.recipe is not None:
        get_op(export.recipe["op"])
    return export
