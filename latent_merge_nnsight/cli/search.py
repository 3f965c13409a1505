"""`lmn search`: an Optuna search of merge schedules (resumable), its Pareto front and the winner."""

import argparse
from pathlib import Path

from latent_merge_nnsight.cli.common import COUNT, POSITIVE, CliError, Subcommands, add_command
from latent_merge_nnsight.cli.options import add_models, add_no_progress, load_models


def _constraint(text: str) -> tuple[str, float]:
    """`METRIC=VALUE` or `METRIC>=VALUE` (for --min)."""
    name, sep, value = text.replace(">=", "=").partition("=")
    try:
        return name.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--min {text!r}; expected METRIC=VALUE, e.g. skill_kept=0.9"
        ) from None


def add(sub: Subcommands) -> None:
    help = "Optuna search of merge schedules (resumable), Pareto front, winner"
    p = add_command(sub, "search", run, help)
    add_models(p, source_required=True)
    p.add_argument(
        "--trials", type=POSITIVE, default=20, help="total trials of the study (resuming counts done)"
    )
    p.add_argument("--target", default="reasoning", help="metric to maximise (a category, skill, ...)")
    p.add_argument(
        "--min", type=_constraint, action="append", default=[], metavar="METRIC=VALUE",
        help="constraint metric >= value (repeatable), e.g. skill_kept=0.9",
    )  # fmt: skip
    p.add_argument("--ops", nargs="+", default=["lerp", "slerp"], help="ops a trial may use")
    p.add_argument("--sites", nargs="+", default=["pre", "post"], choices=["pre", "post"])
    p.add_argument("--layers", nargs="+", type=int, default=None, help="candidate top layers (default all)")
    p.add_argument(
        "--max-layers", type=POSITIVE, default=2, help="at most this many consecutive merged layers"
    )
    p.add_argument("--positions", nargs="+", default=["last"], choices=["last", "all"])
    p.add_argument(
        "--n-search", type=POSITIVE, default=16, help="toy task questions per category to search on"
    )
    p.add_argument(
        "--n-test", type=POSITIVE, default=32, help="disjoint questions per category for the winner"
    )
    p.add_argument("--seed", type=COUNT, default=0, help="sampler seed")
    p.add_argument("--data-seed", type=COUNT, default=0, help="seed of the questions")
    p.add_argument("--out", default="runs/search", help="folder for study.db, tables, figure and winner")
    p.add_argument("--storage", default=None, help="Optuna storage URL or SQLite file (default OUT/study.db)")
    p.add_argument("--study-name", default="lmn-search", help="study name inside the storage")
    p.add_argument(
        "--parallel-trials", type=POSITIVE, default=1, metavar="K",
        help="trials asked of Optuna at once and evaluated in one pass (per-row recipes)",
    )  # fmt: skip
    add_no_progress(p)


def run(args: argparse.Namespace) -> int:
    from latent_merge_nnsight import analysis

    base, sources = load_models(args)
    if sources is None:
        raise CliError("lmn search needs --source")
    space = analysis.SearchSpace(
        ops=tuple(args.ops), sites=tuple(args.sites), layers=tuple(args.layers) if args.layers else None,
        max_layers=args.max_layers, positions=tuple(args.positions),
    )  # fmt: skip
    result = analysis.search(
        base, sources, trials=args.trials, target=args.target, constraints=dict(args.min), space=space,
        n_search=args.n_search, n_test=args.n_test, seed=args.seed, data_seed=args.data_seed,
        out=args.out, storage=args.storage, study_name=args.study_name, progress=not args.no_progress,
        parallel_trials=args.parallel_trials,
    )  # fmt: skip
    print(Path(result.paths["pareto_md"]).read_text())
    shown = ", ".join(f"{k} {v:.3f}" for k, v in result.test.items())
    print(f"winner: trial {result.winner_trial}, {result.winner}")
    print(f"test split ({args.n_test} per category): {shown}")
    print(f"wrote {args.out}/ (winner.yaml, system.yaml, trials.csv, pareto.csv/.md/.png, result.json)")
    return 0
