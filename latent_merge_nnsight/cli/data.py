"""`lmn data judgebench DIR`: JudgeBench's files fetched from its own repository (pinned, sha256-checked)."""

import argparse

from latent_merge_nnsight.cli.common import CliError, Subcommands, add_command


def add(sub: Subcommands) -> None:
    help = "fetch JudgeBench's files from its own repository (pinned commit, sha256-checked)"
    p = add_command(sub, "data", run, help)
    p.add_argument("dataset", choices=["judgebench"], help="the data set")
    p.add_argument("dir", help="folder to fetch into (the tests read $LMN_JUDGEBENCH_DATA)")


def run(args: argparse.Namespace) -> int:
    from latent_merge_nnsight.evaluation.judgebench.data import fetch_judgebench, verify_judgebench

    fetched = fetch_judgebench(args.dir)
    problems = verify_judgebench(args.dir)
    if problems:  # pragma: no cover - fetch_judgebench writes only checked files
        raise CliError("; ".join(problems))
    print(
        f"{args.dir}: JudgeBench's files, sha256-checked ({len(fetched)} fetched, the others already there)"
    )
    return 0
