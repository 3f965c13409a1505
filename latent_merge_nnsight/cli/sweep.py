"""`lmn sweep`: a layer x alpha grid of latent merges (resumable), its results table and heatmap.

What each cell is measured by is `--eval NAME`, one of `EVALUATIONS`: a function of the parsed flags
giving the prompts, the evaluator (`analysis.sweep`'s `evaluate`) and the metric the heatmap shows.
A new evaluation is one more entry there. `--eval lm-eval:TASK[,TASK]` runs lm-evaluation-harness tasks
(`analysis.LmEvalTasks`, with `--include-path`, `--limit`, `--num-fewshot`): the paper's layer x ratio
analysis on standard tasks, one heatmap per task metric.
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

    prompts: "list[str] | list[Example] | None"
    evaluate: "Evaluate"
    metric: str | None  # None: every metric the evaluator reports (one heatmap each)


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


def _lm_eval(args: argparse.Namespace) -> Evaluation:
    from latent_merge_nnsight import analysis
    from latent_merge_nnsight.errors import LatentMergeError

    tasks = args.eval.removeprefix(LM_EVAL).split(",")
    if args.include_path is not None and not Path(args.include_path).is_dir():
        raise CliError(f"--include-path {args.include_path}: no such folder")
    try:
        evaluate = analysis.LmEvalTasks(
            tasks,
            include_path=args.include_path,
            limit=args.limit,
            num_fewshot=args.num_fewshot,
            seed=args.seed,
        )
    except LatentMergeError as exc:
        raise CliError(f"--eval {args.eval}: {exc}") from None
    return Evaluation(None, evaluate, None)


LM_EVAL = "lm-eval:"
"""`--eval lm-eval:TASK[,TASK]`: lm-evaluation-harness tasks."""

EVALUATIONS: dict[str, Callable[[argparse.Namespace], Evaluation]] = {
    "tasks": _tasks,  # the toy task's questions (--n-per-category, --seed): accuracy per category
    "perplexity": _perplexity,  # the lines of --texts: negative log-likelihood
}
"""`--eval` NAME -> the evaluation it runs (the choices of `--eval`, with `lm-eval:TASK[,TASK]`)."""


def _eval_choice(text: str) -> str:
    tasks = text.removeprefix(LM_EVAL)
    if text in EVALUATIONS or (text.startswith(LM_EVAL) and all(t.strip() for t in tasks.split(","))):
        return text
    raise argparse.ArgumentTypeError(
        f"invalid choice: {text!r} (choose from {', '.join(map(repr, EVALUATIONS))} or 'lm-eval:TASK[,TASK]')"
    )


def _evaluation(args: argparse.Namespace) -> Evaluation:
    if args.eval.startswith(LM_EVAL):
        return _lm_eval(args)
    given = [flag for flag, value in LM_EVAL_FLAGS.items() if getattr(args, value) is not None]
    if given:
        raise CliError(f"{given[0]} is for --eval lm-eval:TASK; --eval {args.eval} does not read it")
    return EVALUATIONS[args.eval](args)


LM_EVAL_FLAGS = {"--include-path": "include_path", "--limit": "limit", "--num-fewshot": "num_fewshot"}
"""The flags only `--eval lm-eval:...` reads (refused with another `--eval`, never silently ignored)."""


def add(sub: Subcommands) -> None:
    help = "layer x alpha sweep of latent merges (resumable), with heatmaps"
    p = add_command(sub, "sweep", run, help)
    add_models(p, source_required=True)
    p.add_argument("--ops", nargs="+", default=["lerp", "slerp"], help="merge ops to sweep")
    p.add_argument("--layers", nargs="+", type=LAYER, required=True, help="merge layers to sweep")
    p.add_argument("--alphas", nargs="+", type=FINITE, default=[0.25, 0.5, 0.75], help="alphas to sweep")
    p.add_argument("--allow-extrapolation", action="store_true", help="allow --alphas outside [0, 1]")
    p.add_argument(
        "--eval",
        type=_eval_choice,
        default="tasks",
        metavar="{" + ",".join(EVALUATIONS) + ",lm-eval:TASK[,TASK]}",
        help="what to measure per cell",
    )
    p.add_argument("--texts", default=None, help="text file (one per line) for --eval perplexity")
    p.add_argument("--include-path", default=None, help="folder of lm-eval task YAMLs for --eval lm-eval:...")
    p.add_argument("--limit", type=POSITIVE, default=None, help="lm-eval: documents per task")
    p.add_argument("--num-fewshot", type=COUNT, default=None, help="lm-eval: few-shot examples")
    p.add_argument("--n-per-category", type=POSITIVE, default=20, help="toy task questions per category")
    p.add_argument("--seed", type=COUNT, default=0, help="seed of the toy task questions (and of lm-eval)")
    p.add_argument("--site", default="pre", choices=["pre", "post"], help=field_help("Recipe", "site"))
    p.add_argument("--out", default="runs/sweep", help="folder for sweep.jsonl, results.csv and heatmaps")
    p.add_argument("--fresh", action="store_true", help="start over instead of resuming OUT/sweep.jsonl")
    add_no_progress(p)
    p.add_argument(
        "--max-batch",
        type=POSITIVE,
        default=None,
        help="rows (cells x questions) per engine pass: cells run together as per-row recipes "
        "(default: the evaluator's batch size, 64); with --eval lm-eval:..., cells per pass",
    )


def run(args: argparse.Namespace) -> int:
    from latent_merge_nnsight import analysis

    evaluation = _evaluation(args)
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
    metrics = [evaluation.metric] if evaluation.metric else list(dict.fromkeys(df["metric"]))
    heatmaps = [out / f"heatmap_{metric.replace('/', '-')}.png" for metric in metrics]
    for metric, path in zip(metrics, heatmaps, strict=True):
        analysis.heatmaps(df, metric, path=path)
    print(f"wrote {out / 'results.csv'} and {', '.join(map(str, heatmaps))}")
    return 0
