"""`lmn sweep`: a layer x alpha grid of latent merges (resumable), its results table and heatmap.

What each cell is measured by is `--eval NAME`, one of `EVALUATIONS`: a function of the parsed flags
giving the prompts, the evaluator (`analysis.sweep`'s `evaluate`) and the metric the heatmap shows.
A new evaluation is one more entry there.
"""

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from latent_merge_nnsight.cli.common import (
    COUNT,
    FINITE,
    LAYER,
    POSITIVE,
    CliError,
    Subcommands,
    add_command,
    field_help,
)
from latent_merge_nnsight.cli.options import add_models, add_no_progress, load_models

if TYPE_CHECKING:
    from latent_merge_nnsight.analysis.sweep import Evaluate
    from latent_merge_nnsight.evaluation.tasks import Example


class Evaluation(NamedTuple):
    """What `lmn sweep --eval NAME` measures each cell on, and by what."""

    prompts: "list[str] | list[Example]"
    evaluate: "Evaluate"
    metric: str


def _tasks(args: argparse.Namespace) -> Evaluation:
    from latent_merge_nnsight import analysis
    from latent_merge_nnsight.evaluation import tasks

    n, seed = args.n_per_category, args.seed
    prompts = [ex for c in tasks.CATEGORIES for ex in tasks.make_eval_set(c, n, seed=seed)]
    return Evaluation(prompts, analysis.TaskAccuracy(), "accuracy")


def _perplexity(args: argparse.Namespace) -> Evaluation:
    from latent_merge_nnsight import analysis

    if not args.texts:
        raise CliError("--eval perplexity needs --texts FILE (one text per line)")
    if not Path(args.texts).is_file():
        raise CliError(f"--texts {args.texts}: no such file")
    prompts = [line for line in Path(args.texts).read_text().splitlines() if line.strip()]
    return Evaluation(prompts, analysis.Perplexity(), "nll")


EVALUATIONS: dict[str, Callable[[argparse.Namespace], Evaluation]] = {
    "tasks": _tasks,  # the toy task's questions (--n-per-category, --seed): accuracy per category
    "perplexity": _perplexity,  # the lines of --texts: negative log-likelihood
}
"""`--eval` NAME -> the evaluation it runs (the choices of `--eval`)."""


def add(sub: Subcommands) -> None:
    help = "layer x alpha sweep of latent merges (resumable), with heatmaps"
    p = add_command(sub, "sweep", run, help)
    add_models(p, source_required=True)
    p.add_argument("--ops", nargs="+", default=["lerp", "slerp"], help="merge ops to sweep")
    p.add_argument("--layers", nargs="+", type=LAYER, required=True, help="merge layers to sweep")
    p.add_argument("--alphas", nargs="+", type=FINITE, default=[0.25, 0.5, 0.75], help="alphas to sweep")
    p.add_argument("--allow-extrapolation", action="store_true", help="allow --alphas outside [0, 1]")
    p.add_argument("--eval", choices=tuple(EVALUATIONS), default="tasks", help="what to measure per cell")
    p.add_argument("--texts", default=None, help="text file (one per line) for --eval perplexity")
    p.add_argument("--n-per-category", type=POSITIVE, default=20, help="toy task questions per category")
    p.add_argument("--seed", type=COUNT, default=0, help="seed of the toy task questions")
    p.add_argument("--site", default="pre", choices=["pre", "post"], help=field_help("Recipe", "site"))
    p.add_argument("--out", default="runs/sweep", help="folder for sweep.jsonl, results.csv and heatmaps")
    p.add_argument("--fresh", action="store_true", help="start over instead of resuming OUT/sweep.jsonl")
    add_no_progress(p)
    p.add_argument(
        "--max-batch",
        type=POSITIVE,
        default=None,
        help="rows (cells x questions) per engine pass: cells run together as per-row recipes "
        "(default: the evaluator's batch size, 64)",
    )


def run(args: argparse.Namespace) -> int:
    from latent_merge_nnsight import analysis

    evaluation = EVALUATIONS[args.eval](args)
    base, sources = load_models(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df = analysis.sweep(
        base,
        sources,
        ops=args.ops,
        layers=args.layers,
        alphas=args.alphas,
        evaluate=evaluation.evaluate,
        prompts=evaluation.prompts,
        out=out / "sweep.jsonl",
        site=args.site,
        allow_extrapolation=args.allow_extrapolation,
        resume=not args.fresh,
        progress=not args.no_progress,
        max_batch=args.max_batch,
    )
    df.to_csv(out / "results.csv", index=False)
    heatmap = out / f"heatmap_{evaluation.metric}.png"
    analysis.heatmaps(df, evaluation.metric, path=heatmap)
    print(f"wrote {out / 'results.csv'} and {heatmap}")
    return 0
