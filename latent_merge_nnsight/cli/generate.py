"""`lmn generate`: merged generation from the command line (a recipe file, or --op/--layer/--alpha)."""

import argparse
import sys
from typing import TYPE_CHECKING

from latent_merge_nnsight.cli.common import (
    FINITE,
    LAYER,
    CliError,
    Subcommands,
    add_command,
    declared,
    field_help,
)
from latent_merge_nnsight.cli.options import (
    add_models,
    add_sampling,
    load_models,
    read_recipe,
    sampling_kwargs,
)
from latent_merge_nnsight.errors import LatentMergeError

if TYPE_CHECKING:
    from latent_merge_nnsight.recipe import Recipe


def add(sub: Subcommands) -> None:
    p = add_command(sub, "generate", run, "merged generation from the command line")
    add_models(p, source_required=False)
    p.add_argument("--recipe", default=None, help="recipe YAML/JSON (or use --op/--layer/--alpha)")
    p.add_argument("--op", default="slerp", help=field_help("Recipe", "op", " (when no --recipe is given)"))
    p.add_argument("--layer", type=LAYER, action="append", default=None, help="merge layer (repeatable)")
    p.add_argument("--site", default="pre", choices=["pre", "post"], help=field_help("Recipe", "site"))
    p.add_argument("--alpha", type=FINITE, default=0.5, help="source weight (0 = base, 1 = source)")
    p.add_argument("--allow-extrapolation", action="store_true", help="allow --alpha outside [0, 1]")
    p.add_argument("--deltas", default=None, help=field_help("Recipe", "deltas", ", from lmn.Deltas.save"))
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap each prompt as a user message in the tokenizer's chat template (default: when it has one)",
    )
    engines = declared("generation/run.py", "ENGINES")
    p.add_argument("--engine", default="auto", choices=engines, help="generation engine")
    add_sampling(p)


def recipe_from_args(args: argparse.Namespace) -> "Recipe | None":
    """The recipe the flags describe (None: the base alone), refusing flag sets that would merge nothing.

    Each problem is named by the flag that caused it (`--op`, `--alpha`, `--layer`), not by the field of
    the `Recipe` the flags become.
    """
    from latent_merge_nnsight.ops import check_alpha, get_op
    from latent_merge_nnsight.recipe import Recipe

    if args.recipe:
        if args.layer:
            raise CliError("give either --recipe FILE or --layer/--alpha/--op, not both")
        recipe = read_recipe(args.recipe)
        if not args.source and not args.deltas and recipe.deltas is None:
            raise CliError(f"--recipe {args.recipe} merges, but no --source is given to merge from")
        return recipe
    if args.layer is None:
        if args.source:
            raise CliError(
                f"--source {args.source[0]} is given but no --layer (or --recipe): nothing would be merged; "
                "add --layer L (and --alpha), or drop --source to run the base alone"
            )
        return None
    try:
        spec = get_op(args.op)
    except LatentMergeError as e:
        raise CliError(f"--op {args.op}: {e}") from None
    if not args.source and not (spec.static_source and args.deltas):
        what = "--deltas FILE" if spec.static_source else "--source MODEL"
        raise CliError(
            f"--layer {args.layer[0]} is given but there is nothing to merge from; add {what}, "
            "or drop --layer to run the base alone"
        )
    if spec.static_source and not args.deltas:
        raise CliError(
            f"--op {args.op} steers with saved vectors: give --deltas FILE (written by lmn.Deltas.save from "
            "lmn.compute_deltas in Python)"
        )
    try:
        check_alpha(
            args.alpha, spec, allow_extrapolation=args.allow_extrapolation, what="--alpha",
            extrapolate_hint="pass --allow-extrapolation",
        )  # fmt: skip
    except LatentMergeError as e:
        raise CliError(str(e).replace("--alpha=", "--alpha ")) from None
    return Recipe(
        op=args.op,
        site=args.site,
        layers={layer: args.alpha for layer in args.layer},
        allow_extrapolation=args.allow_extrapolation,
        deltas=args.deltas,
    )


def run(args: argparse.Namespace) -> int:
    from latent_merge_nnsight.generation import generate

    recipe = recipe_from_args(args)
    sampling = sampling_kwargs(args)
    base, sources = load_models(args, recipe)
    if recipe is None:
        print(f"(no --source and no --layer: {args.base} alone, no merge)", file=sys.stderr)
    out = generate(
        base,
        sources,
        list(args.prompt),
        recipe,
        max_new_tokens=args.max_new_tokens,
        stop=args.stop or None,
        engine=args.engine,
        chat=args.chat,
        **sampling,
    )
    for prompt, text, reason in zip(args.prompt, out.texts, out.finish_reasons, strict=True):
        print(f"### {prompt}\n{text}\n[{reason}]\n")
    return 0
