"""`lmn` on the command line: parse, validate, call the library, write results.

Every subcommand imports what it needs when it runs, so `lmn --help` stays fast.
"""

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from latent_merge_nnsight.errors import LatentMergeError

Handler = Callable[[argparse.Namespace], int]


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


# ----------------------------------------------------------------------------------------------------
# handlers


def cmd_demo(args: argparse.Namespace) -> int:
    from latent_merge_nnsight.demo import run_demo

    result = run_demo(out=args.out, quick=args.quick, progress=not args.no_progress)
    paths = result.get("paths", {}) if isinstance(result, dict) else getattr(result, "paths", {})
    print(f"wrote {args.out}/")
    for name, path in dict(paths).items():
        print(f"  {name}: {path}")
    if args.docs:
        from latent_merge_nnsight.demo import export_docs

        copied = export_docs(args.out, args.docs)
        print(f"copied to {args.docs}/: {', '.join(p.name for p in copied)}")
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    if args.zoo_command == "list":
        from latent_merge_nnsight.zoo import ZOO, zoo_path

        for name in ZOO:
            print(f"{name}\t{zoo_path(name)}")
        return 0
    from latent_merge_nnsight.zoo.train import main as train_main

    return train_main(args.train_args)


def cmd_recipe(args: argparse.Namespace) -> int:
    from latent_merge_nnsight.recipe import Recipe

    recipe = Recipe.from_file(args.recipe)
    print(recipe)
    if args.n_layers is not None:
        _print_json({str(k): v for k, v in recipe.layer_alphas(args.n_layers).items()})
    return 0


def _recipe_from_args(args: argparse.Namespace) -> Any:
    from latent_merge_nnsight.recipe import Recipe

    if args.recipe:
        return Recipe.from_file(args.recipe)
    if args.layer is None:
        return None
    return Recipe(op=args.op, layers={layer: args.alpha for layer in args.layer})


def _load_models(args: argparse.Namespace) -> tuple[Any, Any]:
    """The --base model and the --source models (one source as a model, several as a list, none as None)."""
    import latent_merge_nnsight as lmn

    base = lmn.load(args.base, dtype=args.dtype, device_map=args.device_map)
    sources = [lmn.load(s, dtype=args.dtype, device_map=args.device_map) for s in args.source]
    return base, (sources[0] if len(sources) == 1 else sources or None)


def cmd_generate(args: argparse.Namespace) -> int:
    import latent_merge_nnsight as lmn

    recipe = _recipe_from_args(args)
    base, sources = _load_models(args)
    prompts = [[{"role": "user", "content": p}] for p in args.prompt] if args.chat else list(args.prompt)
    out = lmn.generate(
        base,
        sources,
        prompts,
        recipe,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.temperature > 0,
        temperature=args.temperature if args.temperature > 0 else 1.0,
        seed=args.seed,
        engine=args.engine,
    )
    for prompt, text, reason in zip(args.prompt, out.texts, out.finish_reasons, strict=True):
        print(f"### {prompt}\n{text}\n[{reason}]\n")
    return 0


def cmd_respond(args: argparse.Namespace) -> int:
    from latent_merge_nnsight.evaluation.respond import respond

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


def cmd_judge(args: argparse.Namespace) -> int:
    from latent_merge_nnsight.evaluation.judge import judge_pairs_sync, load_comparisons
    from latent_merge_nnsight.evaluation.judge_summary import summarize, write_report
    from latent_merge_nnsight.evaluation.judgebench import load_template

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
    if overall["failed"]:
        print(f"{overall['failed']} judgment(s) failed (refused by the endpoint; see 'error' in the cache)")
    if overall["invalid"] or overall["failed"]:
        print("rerun with --retry-invalid to ask again for the judgments without a verdict")
    return 0


def cmd_judgebench_accuracy(args: argparse.Namespace) -> int:
    from latent_merge_nnsight.evaluation.judgebench import (
        load_judgebench,
        load_template,
        official_accuracy,
        write_official_outputs,
    )

    pairs = load_judgebench(args.split, args.data)
    if args.limit:
        pairs = pairs[: args.limit]
    template = load_template(args.template)
    if args.judge_system:
        from latent_merge_nnsight.evaluation.loaded import judgebench_accuracy_system

        records = judgebench_accuracy_system(
            pairs,
            args.judge_system,
            template,
            cache_path=args.cache,
            batch_size=args.concurrency,
            retry_invalid=args.retry_invalid,
        )
    else:
        if not args.judge_model:
            raise LatentMergeError("give --judge-model (with --base-url) or --judge-system SYSTEM.yaml")
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
    _print_json(official_accuracy(records))
    return 0


def cmd_judgebench_score(args: argparse.Namespace) -> int:
    from latent_merge_nnsight.evaluation.judgebench import load_official_outputs, official_accuracy

    _print_json(official_accuracy(load_official_outputs(args.outputs)))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from latent_merge_nnsight import analysis

    if args.eval == "perplexity":
        if not args.texts:
            raise LatentMergeError("--eval perplexity needs --texts FILE (one text per line)")
        prompts = [line for line in Path(args.texts).read_text().splitlines() if line.strip()]
        evaluate: Any = analysis.Perplexity()
        metric = "nll"
    else:
        from latent_merge_nnsight.evaluation import tasks

        prompts = [
            ex for c in tasks.CATEGORIES for ex in tasks.make_eval_set(c, args.n_per_category, seed=args.seed)
        ]
        evaluate, metric = analysis.TaskAccuracy(), "accuracy"
    base, sources = _load_models(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df = analysis.sweep(
        base,
        sources,
        ops=args.ops,
        layers=args.layers,
        alphas=args.alphas,
        evaluate=evaluate,
        prompts=prompts,
        out=out / "sweep.jsonl",
        site=args.site,
        resume=not args.fresh,
        progress=not args.no_progress,
    )
    df.to_csv(out / "results.csv", index=False)
    analysis.heatmaps(df, metric, path=out / f"heatmap_{metric}.png")
    print(f"wrote {out / 'results.csv'} and {out / f'heatmap_{metric}.png'}")
    return 0


def _constraint(text: str) -> tuple[str, float]:
    """`METRIC=VALUE` or `METRIC>=VALUE` (for --min)."""
    name, sep, value = text.replace(">=", "=").partition("=")
    try:
        return name.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--min {text!r}; expected METRIC=VALUE, e.g. skill_kept=0.9"
        ) from None


def cmd_search(args: argparse.Namespace) -> int:
    from latent_merge_nnsight import analysis

    base, sources = _load_models(args)
    if sources is None:
        raise LatentMergeError("lmn search needs --source")
    space = analysis.SearchSpace(
        ops=tuple(args.ops), sites=tuple(args.sites), layers=tuple(args.layers) if args.layers else None,
        max_layers=args.max_layers, positions=tuple(args.positions),
    )  # fmt: skip
    result = analysis.search(
        base, sources, trials=args.trials, target=args.target, constraints=dict(args.min), space=space,
        n_search=args.n_search, n_test=args.n_test, seed=args.seed, data_seed=args.data_seed,
        out=args.out, storage=args.storage, study_name=args.study_name, progress=not args.no_progress,
    )  # fmt: skip
    print(Path(result.paths["pareto_md"]).read_text())
    shown = ", ".join(f"{k} {v:.3f}" for k, v in result.test.items())
    print(f"winner: trial {result.winner_trial}, {result.winner}")
    print(f"test split ({args.n_test} per category): {shown}")
    print(f"wrote {args.out}/ (winner.yaml, system.yaml, trials.csv, pareto.csv/.md/.png, result.json)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from latent_merge_nnsight.serve import run_serve

    if not 0 <= args.port <= 65535:
        raise LatentMergeError(f"--port {args.port} is not a TCP port; expected 0 <= port <= 65535")

    run_serve(
        args.system,
        host=args.host,
        port=args.port,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens_limit=args.max_tokens_limit,
        api_key=args.api_key,
        max_body_bytes=args.max_body_bytes,
    )
    return 0


# ----------------------------------------------------------------------------------------------------
# parser


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmn", description="Latent merging of LLMs in representation space, as nnsight interventions."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the paper's Experiment A in miniature on the shipped toy pair")
    p.add_argument("--out", default="runs/demo", help="output folder (results.csv, report.md, figures)")
    p.add_argument("--quick", action="store_true", help="a ~30 s version on a smaller grid")
    p.add_argument("--docs", default=None, help="also copy the report and the Pareto figure here")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(handler=cmd_demo)

    p = sub.add_parser("zoo", help="the shipped toy models")
    zsub = p.add_subparsers(dest="zoo_command", required=True)
    zsub.add_parser("list", help="list the shipped models")
    zt = zsub.add_parser("train", help="retrain the toy pair from a seed (see `lmn zoo train -- --help`)")
    zt.add_argument("train_args", nargs=argparse.REMAINDER, help="arguments for the trainer (--out DIR ...)")
    p.set_defaults(handler=cmd_zoo)

    p = sub.add_parser("recipe", help="validate a recipe file and show its per-layer alphas")
    p.add_argument("recipe", help="recipe YAML or JSON")
    p.add_argument("--n-layers", type=int, default=None, help="resolve layers for a model of this depth")
    p.set_defaults(handler=cmd_recipe)

    p = sub.add_parser("generate", help="merged generation from the command line")
    p.add_argument("--base", required=True, help="hub id, local dir or zoo name of the base model")
    p.add_argument("--source", action="append", default=[], help="source model (repeat for RegMean)")
    p.add_argument("--recipe", default=None, help="recipe YAML/JSON (or use --op/--layer/--alpha)")
    p.add_argument("--op", default="slerp", help="merge op when no recipe file is given")
    p.add_argument("--layer", type=int, action="append", default=None, help="merge layer (repeatable)")
    p.add_argument("--alpha", type=float, default=0.5, help="source weight (0 = base)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user chat message")
    p.add_argument("--engine", default="auto", choices=["auto", "fast", "nnsight"])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device-map", default=None)
    _add_sampling(p)
    p.set_defaults(handler=cmd_generate)

    p = sub.add_parser("sweep", help="layer x alpha sweep of latent merges (resumable), with heatmaps")
    p.add_argument("--base", required=True, help="hub id, local dir or zoo name of the base model")
    p.add_argument("--source", action="append", required=True, help="source model (repeat for RegMean)")
    p.add_argument("--ops", nargs="+", default=["lerp", "slerp"], help="merge ops to sweep")
    p.add_argument("--layers", nargs="+", type=int, required=True, help="merge layers to sweep")
    p.add_argument("--alphas", nargs="+", type=float, default=[0.25, 0.5, 0.75], help="alphas to sweep")
    p.add_argument(
        "--eval", choices=["tasks", "perplexity"], default="tasks", help="what to measure per cell"
    )
    p.add_argument("--texts", default=None, help="text file (one per line) for --eval perplexity")
    p.add_argument("--n-per-category", type=int, default=20, help="toy task questions per category")
    p.add_argument("--seed", type=int, default=0, help="seed of the toy task questions")
    p.add_argument("--site", default="pre", choices=["pre", "post"])
    p.add_argument("--out", default="runs/sweep", help="folder for sweep.jsonl, results.csv and heatmaps")
    p.add_argument("--fresh", action="store_true", help="start over instead of resuming OUT/sweep.jsonl")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device-map", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=cmd_sweep)

    p = sub.add_parser("search", help="Optuna search of merge schedules (resumable), Pareto front, winner")
    p.add_argument("--base", required=True, help="hub id, local dir or zoo name of the base model")
    p.add_argument("--source", action="append", required=True, help="source model (repeat for RegMean)")
    p.add_argument("--trials", type=int, default=20, help="total trials of the study (resuming counts done)")
    p.add_argument("--target", default="reasoning", help="metric to maximise (a category, skill, ...)")
    p.add_argument(
        "--min", type=_constraint, action="append", default=[], metavar="METRIC=VALUE",
        help="constraint metric >= value (repeatable), e.g. skill_kept=0.9",
    )  # fmt: skip
    p.add_argument("--ops", nargs="+", default=["lerp", "slerp"], help="ops a trial may use")
    p.add_argument("--sites", nargs="+", default=["pre", "post"], choices=["pre", "post"])
    p.add_argument("--layers", nargs="+", type=int, default=None, help="candidate top layers (default all)")
    p.add_argument("--max-layers", type=int, default=2, help="at most this many consecutive merged layers")
    p.add_argument("--positions", nargs="+", default=["last"], choices=["last", "all"])
    p.add_argument("--n-search", type=int, default=16, help="toy task questions per category to search on")
    p.add_argument("--n-test", type=int, default=32, help="disjoint questions per category for the winner")
    p.add_argument("--seed", type=int, default=0, help="sampler seed")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the questions")
    p.add_argument("--out", default="runs/search", help="folder for study.db, tables, figure and winner")
    p.add_argument("--storage", default=None, help="Optuna storage URL or SQLite file (default OUT/study.db)")
    p.add_argument("--study-name", default="lmn-search")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device-map", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=cmd_search)

    p = sub.add_parser("respond", help="answer JudgeBench questions with a system (resumable JSONL)")
    p.add_argument("system", help="system YAML")
    p.add_argument("--split", default="claude", choices=["gpt", "claude"])
    p.add_argument("--data", default=None, help="local JSONL/Parquet instead of the hub")
    p.add_argument("--out", required=True, help="responses JSONL (appended; reruns skip answered questions)")
    p.add_argument("--limit", type=int, default=None, help="answer only the first N questions")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--truncate",
        default="error",
        choices=["error", "left", "none"],
        help="a question longer than the model's context (minus max_new_tokens): refuse it (error), cut "
        "its start (left; each row records the tokens cut), or feed it whole (none); the sidecar records it",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=cmd_respond)

    p = sub.add_parser("judge", help="pairwise LLM judging of two response files")
    p.add_argument("a", help="responses JSONL of system A")
    p.add_argument("b", help="responses JSONL of system B")
    p.add_argument("--judge-model", required=True)
    p.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint (default: OpenAI)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
    p.add_argument(
        "--template",
        default="pairwise_abc",
        help="pairwise_abc (shipped), vanilla (JudgeBench's prompt: fetched once at a pinned commit, "
        "sha256-checked, cached; LMN_JUDGEBENCH_PROMPT=FILE uses a local copy) or a template file",
    )
    p.add_argument("--out", default="runs/judge", help="folder for summary.json/.md/.png")
    p.add_argument("--cache", default=None, help="judgment cache JSONL (default: OUT/judgments.jsonl)")
    p.add_argument("--single-order", action="store_true", help="judge only the A/B order")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-retries", type=int, default=6)
    p.add_argument("--on-missing", default="error", choices=["error", "drop"])
    p.add_argument(
        "--retry-invalid", action="store_true", help="ask again for cached judgments without a verdict"
    )
    p.set_defaults(handler=cmd_judge)

    p = sub.add_parser("judgebench-accuracy", help="JudgeBench's official judge-accuracy protocol")
    p.add_argument("--split", default="gpt", choices=["gpt", "claude"])
    p.add_argument("--data", default=None, help="local JSONL/Parquet instead of the hub")
    p.add_argument(
        "--template",
        required=True,
        help="vanilla (JudgeBench's prompt: fetched once at a pinned commit, sha256-checked, cached; "
        "LMN_JUDGEBENCH_PROMPT=FILE uses a local copy), pairwise_abc, or a template file",
    )
    p.add_argument("--judge-model", default=None, help="judge model on an OpenAI-compatible endpoint")
    p.add_argument("--base-url", default=None)
    p.add_argument("--api-key-env", default="OPENAI_API_KEY")
    p.add_argument("--judge-system", default=None, help="a local system YAML acting as the judge")
    p.add_argument("--cache", default=None, help="judgment cache JSONL for resuming")
    p.add_argument(
        "--concurrency", type=int, default=8, help="parallel requests (batch size for a local judge)"
    )
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--max-retries", type=int, default=6, help="retries of a failed judge request")
    p.add_argument(
        "--retry-invalid", action="store_true", help="ask again for cached judgments without a verdict"
    )
    p.add_argument("--out", required=True, help="records in JudgeBench's output format (JSONL)")
    p.set_defaults(handler=cmd_judgebench_accuracy)

    p = sub.add_parser("judgebench-score", help="score a JudgeBench output file (official protocol)")
    p.add_argument("outputs", help="JSONL in JudgeBench's output format")
    p.set_defaults(handler=cmd_judgebench_score)

    p = sub.add_parser("serve", help="an OpenAI-compatible server for a system (merged ones included)")
    p.add_argument("system", help="system YAML")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=8, help="requests batched into one generate call")
    p.add_argument("--max-wait-ms", type=float, default=5, help="how long a batch waits for more requests")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="refuse longer prompts (400)")
    p.add_argument(
        "--max-tokens-limit",
        type=int,
        default=None,
        help="refuse a larger max_tokens (400; default: the model's context, which also bounds "
        "max_tokens by what the prompt leaves)",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1 (401 otherwise); default: $LMN_API_KEY, else none",
    )
    p.add_argument("--max-body-bytes", type=int, default=8 * 2**20, help="refuse larger request bodies (413)")
    p.set_defaults(handler=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except LatentMergeError as e:
        print(f"lmn {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
