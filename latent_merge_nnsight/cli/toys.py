"""The commands of the shipped toy pair and of recipe files: `lmn demo` (the paper's Experiment A in
miniature), `lmn zoo list|train` and `lmn recipe FILE` (validate, show per-layer alphas)."""

import argparse

from latent_merge_nnsight.cli.common import POSITIVE, Parser, Subcommands, add_command
from latent_merge_nnsight.cli.options import add_no_progress, print_json, read_recipe

ZOO_TRAIN = ("zoo", "train")
"""`lmn zoo train ...` hands its flags to the trainer's own parser (`lmn zoo train --help`)."""


def add(sub: Subcommands) -> None:
    p = add_command(sub, "demo", run_demo, "the paper's Experiment A in miniature on the shipped toy pair")
    p.add_argument("--out", default="runs/demo", help="output folder (results.csv, report.md, figures)")
    p.add_argument("--quick", action="store_true", help="a ~30 s version on a smaller grid")
    p.add_argument("--docs", default=None, help="also copy the report and the Pareto figure here")
    add_no_progress(p)

    p = add_command(sub, "zoo", run_zoo, "the shipped toy models")
    zoo = p.add_subparsers(dest="zoo_command", required=True, parser_class=Parser)
    zoo.add_parser("list", help="list the shipped models")
    train = zoo.add_parser(
        "train", help="retrain the toy pair from a seed (`lmn zoo train --help`)", add_help=False
    )
    train.add_argument("train_args", nargs=argparse.REMAINDER, help="the trainer's flags (--out DIR ...)")

    p = add_command(sub, "recipe", run_recipe, "validate a recipe file and show its per-layer alphas")
    p.add_argument("recipe", help="recipe YAML or JSON")
    p.add_argument("--n-layers", type=POSITIVE, default=None, help="resolve layers for a model of this depth")


def run_demo(args: argparse.Namespace) -> int:
    from latent_merge_nnsight import demo

    result = demo.run_demo(out=args.out, quick=args.quick, progress=not args.no_progress)
    paths = result.get("paths", {}) if isinstance(result, dict) else getattr(result, "paths", {})
    print(f"wrote {args.out}/")
    for name, path in dict(paths).items():
        print(f"  {name}: {path}")
    if args.docs:
        copied = demo.export_docs(args.out, args.docs)
        print(f"copied to {args.docs}/: {', '.join(p.name for p in copied)}")
    return 0


def run_zoo(args: argparse.Namespace) -> int:
    if args.zoo_command == "list":
        from latent_merge_nnsight.zoo import ZOO, zoo_path

        for name, model in ZOO.items():
            print(f"{name}\t{zoo_path(name)}\t{model.description}")
        return 0
    from latent_merge_nnsight.zoo.train import main as train_main

    return train_main(args.train_args)  # reached only through `main`'s hand-over (see ZOO_TRAIN)


def run_recipe(args: argparse.Namespace) -> int:
    recipe = read_recipe(args.recipe, flag="")
    print(recipe)
    if args.n_layers is not None:
        print_json({str(k): v for k, v in recipe.layer_alphas(args.n_layers).items()})
    return 0
