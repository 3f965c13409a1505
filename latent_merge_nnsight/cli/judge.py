"""JudgeBench from the command line: `lmn respond` (a system answers the questions), `lmn judge` (an LLM
judges two response files pairwise), `lmn judgebench-accuracy` (JudgeBench's own judge-accuracy protocol)
and `lmn judgebench-score` (score a file of its outputs)."""

import argparse
from pathlib import Path

from latent_merge_nnsight.cli.common import COUNT, POSITIVE, CliError, Subcommands, add_command, declared
from latent_merge_nnsight.cli.options import add_no_progress, print_json
from latent_merge_nnsight.evaluation.judgebench.data import SPLITS

DEFAULT_SPLIT = "gpt"
TEMPLATES = (
    "vanilla (JudgeBench's prompt: fetched once at a pinned commit, sha256-checked, cached; "
    "LMN_JUDGEBENCH_PROMPT=FILE uses a local copy), pairwise_abc (shipped), or a template file"
)


def add(sub: Subcommands) -> None:
    _add_respond(sub)
    _add_judge(sub)
    _add_judgebench_accuracy(sub)
    help = "score a JudgeBench output file (official protocol)"
    add_command(sub, "judgebench-score", run_judgebench_score, help).add_argument(
        "outputs", help="JSONL in JudgeBench's output format"
    )


def _add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", default=DEFAULT_SPLIT, choices=SPLITS, help="JudgeBench split")
    p.add_argument("--data", default=None, help="local JSONL/Parquet instead of the hub")


def _add_truncate(p: argparse.ArgumentParser, what: str) -> None:
    """`--truncate`: what to do with `what` (a prompt) longer than the model's context."""
    p.add_argument(
        "--truncate",
        default="error",
        choices=declared("systems/fit.py", "TRUNCATE"),
        help=f"{what} longer than the model's context (less max_new_tokens): refuse it (error), cut its "
        "start (left; the tokens cut are recorded), or feed it whole (none)",
    )


def _add_endpoint(p: argparse.ArgumentParser, required: bool) -> None:
    """The OpenAI-compatible judge: its model, endpoint and key, and how hard to try."""
    help = "judge model name on an OpenAI-compatible endpoint"
    p.add_argument("--judge-model", required=required, default=None, help=help)
    p.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint (default: OpenAI)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
    p.add_argument("--max-retries", type=COUNT, default=6, help="retries of a failed request")
    p.add_argument(
        "--retry-invalid", action="store_true", help="ask again for cached judgments without a verdict"
    )


def _add_respond(sub: Subcommands) -> None:
    help = "answer JudgeBench questions with a system (resumable JSONL)"
    p = add_command(sub, "respond", run_respond, help)
    p.add_argument("system", help="system YAML")
    _add_data(p)
    p.add_argument("--out", required=True, help="responses JSONL (appended; reruns skip answered questions)")
    p.add_argument("--limit", type=POSITIVE, default=None, help="answer only the first N questions")
    p.add_argument("--batch-size", type=POSITIVE, default=8, help="questions per generate call")
    _add_truncate(p, "a question")
    add_no_progress(p)


def run_respond(args: argparse.Namespace) -> int:
    from latent_merge_nnsight.evaluation.respond import respond

    if args.data is None:
        from latent_merge_nnsight.evaluation.judgebench.data import HF_DATASET
        from latent_merge_nnsight.models import hub_unreachable

        reason = hub_unreachable(HF_DATASET, f"data/{args.split}-00000-of-00001.jsonl", repo_type="dataset")
        if reason:
            raise CliError(
                f"--split {args.split} is read from the hub dataset {HF_DATASET}, but {reason}; "
                "give --data FILE (a local JSONL/Parquet copy)"
            )
    respond(
        args.system,
        split=args.split,
        out=args.out,
        data=args.data,
        limit=args.limit,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        truncate=args.truncate,
    )
    print(f"wrote {args.out}")
    return 0


def _add_judge(sub: Subcommands) -> None:
    p = add_command(sub, "judge", run_judge, "pairwise LLM judging of two response files")
    p.add_argument("a", help="responses JSONL of system A")
    p.add_argument("b", help="responses JSONL of system B")
    _add_endpoint(p, required=True)
    p.add_argument("--template", default="pairwise_abc", help=TEMPLATES)
    p.add_argument("--out", default="runs/judge", help="folder for summary.json/.md/.png")
    p.add_argument("--cache", default=None, help="judgment cache JSONL (default: OUT/judgments.jsonl)")
    p.add_argument("--single-order", action="store_true", help="judge only the A/B order")
    p.add_argument("--concurrency", type=POSITIVE, default=8, help="parallel requests")
    p.add_argument("--on-missing", default="error", choices=["error", "drop"], help="pairs in one file only")


def run_judge(args: argparse.Namespace) -> int:
    from latent_merge_nnsight.evaluation.judge import judge_pairs_sync, load_comparisons
    from latent_merge_nnsight.evaluation.judge_summary import summarize, write_report
    from latent_merge_nnsight.evaluation.judgebench.templates import load_template

    comparisons = load_comparisons(args.a, args.b, on_missing=args.on_missing)
    judgments = judge_pairs_sync(
        comparisons,
        args.judge_model,
        args.base_url,
        load_template(args.template),
        args.cache or str(Path(args.out) / "judgments.jsonl"),
        both_orders=not args.single_order,
        concurrency=args.concurrency,
        max_retries=args.max_retries,
        api_key_env=args.api_key_env,
        retry_invalid=args.retry_invalid,
    )
    summary = summarize(judgments)
    label = f"{Path(args.a).stem} vs {Path(args.b).stem}"
    paths = write_report({label: summary}, args.out)
    print(paths["markdown"].read_text())
    overall = summary["results"]["overall"]
    if overall["failed"] == overall["n_judgments"]:  # nothing was judged: say why, and fail
        first = next(j for j in judgments if j.error is not None)
        raise CliError(
            f"every judgment failed ({overall['failed']} of {overall['n_judgments']}; the report counts "
            f"them as failed): the endpoint refused each request, e.g. pair {first.pair_id!r} order "
            f"{first.order}: {first.error}"
        )
    if overall["failed"]:
        print(f"{overall['failed']} judgment(s) failed (refused by the endpoint; see 'error' in the cache)")
    if overall["invalid"] or overall["failed"]:
        print("rerun with --retry-invalid to ask again for the judgments without a verdict")
    return 0


def _add_judgebench_accuracy(sub: Subcommands) -> None:
    help = "JudgeBench's official judge-accuracy protocol"
    p = add_command(sub, "judgebench-accuracy", run_judgebench_accuracy, help)
    _add_data(p)
    p.add_argument("--template", required=True, help=TEMPLATES)
    _add_endpoint(p, required=False)
    p.add_argument("--judge-system", default=None, help="a local system YAML acting as the judge")
    _add_truncate(p, "with --judge-system, a judge prompt")
    p.add_argument("--cache", default=None, help="judgment cache JSONL for resuming")
    p.add_argument(
        "--concurrency", type=POSITIVE, default=8, help="parallel requests (batch size for a local judge)"
    )
    p.add_argument("--limit", type=POSITIVE, default=None, help="judge only the first N pairs")
    p.add_argument("--out", required=True, help="records in JudgeBench's output format (JSONL)")


def run_judgebench_accuracy(args: argparse.Namespace) -> int:
    from latent_merge_nnsight.evaluation.judgebench.data import load_judgebench
    from latent_merge_nnsight.evaluation.judgebench.official import official_accuracy, write_official_outputs
    from latent_merge_nnsight.evaluation.judgebench.templates import load_template

    pairs = load_judgebench(args.split, args.data)
    if args.limit:
        pairs = pairs[: args.limit]
    template = load_template(args.template)
    if args.judge_system:
        from latent_merge_nnsight.evaluation.judge_system import judgebench_accuracy_system

        records = judgebench_accuracy_system(
            pairs,
            args.judge_system,
            template,
            cache_path=args.cache,
            batch_size=args.concurrency,
            retry_invalid=args.retry_invalid,
            truncate=args.truncate,
        )
    else:
        if not args.judge_model:
            raise CliError("give --judge-model (with --base-url) or --judge-system SYSTEM.yaml")
        from latent_merge_nnsight.evaluation.judge import judgebench_accuracy_openai

        records = judgebench_accuracy_openai(
            pairs,
            args.judge_model,
            args.base_url,
            template,
            args.cache,
            api_key_env=args.api_key_env,
            concurrency=args.concurrency,
            retry_invalid=args.retry_invalid,
            max_retries=args.max_retries,
        )
    write_official_outputs(records, args.out)
    print_json(official_accuracy(records))
    return 0


def run_judgebench_score(args: argparse.Namespace) -> int:
    from latent_merge_nnsight.evaluation.judgebench.official import load_official_outputs, official_accuracy

    print_json(official_accuracy(load_official_outputs(args.outputs)))
    return 0
