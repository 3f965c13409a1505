"""Options several commands share and what they become: `--base`/`--source` loaded as models, the
sampling flags as `lmn.generate` keywords, a `--recipe` file read with its problems named by flag."""

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from latent_merge_nnsight.cli.common import CliError, describe_error, field_help, setting
from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.nouns import Model
from latent_merge_nnsight.sampling_rules import SAMPLERS

if TYPE_CHECKING:
    from latent_merge_nnsight.plan import Sources
    from latent_merge_nnsight.recipe import Recipe


def print_json(data: object) -> None:
    print(json.dumps(data, indent=2, default=str))


def add_no_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def add_models(p: argparse.ArgumentParser, *, source_required: bool) -> None:
    """`--base`, `--source` (repeatable) and how they load (`--dtype`, `--device-map`)."""
    p.add_argument("--base", required=True, help="hub id, local dir or zoo name of the base model")
    p.add_argument(
        "--source",
        action="append",
        required=source_required,
        default=None if source_required else [],
        help=field_help("System", "sources", " (repeat for RegMean)"),
    )
    p.add_argument("--dtype", default="auto", help=field_help("System", "dtype"))
    p.add_argument("--device-map", default=None, help=field_help("System", "device_map"))


def add_sampling(p: argparse.ArgumentParser) -> None:
    """`--max-new-tokens` and the sampling flags (`--temperature` 0 = greedy), each checked by its rule."""
    flags = [
        ("--max-new-tokens", "max_new_tokens", int, 64),
        ("--temperature", "temperature", float, 0.0),
        ("--top-p", "top_p", float, 1.0),
        ("--top-k", "top_k", int, 0),
        ("--seed", "seed", int, None),
    ]
    for flag, name, kind, default in flags:
        p.add_argument(flag, type=setting(name, kind), default=default, help=field_help("SamplingSpec", name))
    p.add_argument(
        "--sampler", default="default", choices=SAMPLERS, help=field_help("SamplingSpec", "sampler")
    )
    p.add_argument(
        "--stop", action="append", default=None, help=field_help("SamplingSpec", "stop", " (repeatable)")
    )


def sampling_kwargs(args: argparse.Namespace) -> dict[str, bool | float | int | str | None]:
    """`lmn.generate` keywords from --temperature (0 = greedy), --top-p, --top-k, --seed, --sampler."""
    sample = args.temperature > 0
    if not sample and (args.top_p < 1 or args.top_k > 0):
        raise CliError("--top-p and --top-k act when sampling: give --temperature T > 0 as well")
    return dict(
        do_sample=sample,
        temperature=args.temperature if sample else 1.0,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        sampler=args.sampler,
    )


def read_recipe(path: str, flag: str = "--recipe") -> "Recipe":
    """The recipe file `path`, with its problems named by flag and file (and line, for YAML syntax)."""
    from latent_merge_nnsight.recipe import Recipe

    where = f"{flag} {path}" if flag else path
    if not Path(path).is_file():
        raise CliError(f"{where}: no such file")
    try:
        return Recipe.from_file(path)
    except Exception as e:
        raise CliError(f"{where}: {describe_error(e)}") from e


def _load(flag: str, name: str, args: argparse.Namespace, up_to_layer: int | None = None) -> Model:
    from latent_merge_nnsight.models import load

    try:
        return load(name, dtype=args.dtype, device_map=args.device_map, up_to_layer=up_to_layer)
    except Exception as e:
        raise CliError(f"{flag} {name}: {describe_error(e)}") from e


def load_models(args: argparse.Namespace, recipe: "Recipe | None" = None) -> tuple[Model, "Sources"]:
    """The --base model and the --source models (one source as a model, several as a list, none as None;
    `--deltas FILE` as the file).

    With a recipe, each source is loaded only up to the highest merged layer (its upper blocks would
    never run), and a --layer past the base's depth is refused before any source is loaded.
    """
    from latent_merge_nnsight.models import model_info
    from latent_merge_nnsight.plan import recipe_plan

    base = _load("--base", args.base, args)
    up_to = None
    if recipe is not None:
        n = model_info(base).n_layers
        try:
            recipe.layer_alphas(n)
        except LatentMergeError:
            bad = [layer for layer in (args.layer or []) if layer >= n]
            flag = f"--layer {bad[0]}" if bad else f"--recipe {args.recipe}"
            raise CliError(
                f"{flag} is out of range for {args.base} ({n} layers); expected 0 <= layer < {n}"
            ) from None
        up_to = recipe_plan(recipe, n).load_up_to(n)  # the one depth rule (a system's loads use it too)
    if getattr(args, "deltas", None):
        return base, args.deltas
    sources = [_load("--source", s, args, up_to_layer=up_to) for s in args.source]
    return base, (sources[0] if len(sources) == 1 else sources or None)
