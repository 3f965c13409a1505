"""`lmn eval SYSTEM.yaml --tasks T1,T2`: lm-evaluation-harness on a system, through the `latent-merge` model.

Writes lm-eval's own results JSON (and, with `--log-samples`, its per-sample JSONL) under `--output-path`,
and prints lm-eval's table. Needs the `lmeval` extra (`pip install 'latent_merge_nnsight[lmeval]'`);
nothing here imports torch or lm-eval before the command runs.
"""

import argparse
import re
from pathlib import Path

from latent_merge_nnsight.cli.common import POSITIVE, CliError, Subcommands, add_command

MISSING = "lm-eval is not installed; install the extra: pip install 'latent_merge_nnsight[lmeval]'"


def add(sub: Subcommands) -> None:
    p = add_command(sub, "eval", run, "lm-evaluation-harness tasks on a system (needs the lmeval extra)")
    p.add_argument("system", help="system YAML (any kind: latent, weight, ensemble, single)")
    p.add_argument("--tasks", required=True, help="lm-eval task names, comma-separated")
    p.add_argument("--limit", type=POSITIVE, default=None, help="documents per task at most")
    p.add_argument("--include-path", default=None, help="folder of extra task YAMLs")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per prompt")
    p.add_argument("--batch-size", type=POSITIVE, default=8, help="rows per forward")
    p.add_argument("--max-length", type=POSITIVE, default=None, help="context window (default: the model's)")
    p.add_argument("--max-gen-toks", type=POSITIVE, default=256, help="default new tokens per generation")
    p.add_argument(
        "--apply-chat-template", action="store_true", help="send prompts through the chat template"
    )
    p.add_argument("--output-path", default=None, help="folder for lm-eval's results JSON")
    p.add_argument("--log-samples", action="store_true", help="also write every sample (needs --output-path)")
    p.add_argument(
        "--seed", type=int, default=0, help="lm-eval's random seeds (python, numpy, torch, fewshot)"
    )


def _tasks(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise CliError(f"--tasks {text!r} names no task; expected T1,T2,...")
    return names


def run(args: argparse.Namespace) -> int:
    tasks = _tasks(args.tasks)
    if args.log_samples and not args.output_path:
        raise CliError("--log-samples needs --output-path (where the samples are written)")
    if args.include_path is not None and not Path(args.include_path).is_dir():
        raise CliError(f"--include-path {args.include_path}: no such folder")
    if not Path(args.system).is_file():
        raise CliError(f"{args.system}: no such file")
    from latent_merge_nnsight.systems import System

    name = System.from_file(args.system).name  # a bad system file fails before lm-eval indexes its tasks
    try:
        import lm_eval  # after the package (and nnsight's fix-ups) is imported
    except ImportError:
        raise CliError(MISSING) from None
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    import latent_merge_nnsight.evaluation.lm_eval_model  # noqa: F401  (registers `latent-merge`)

    manager = TaskManager(include_path=args.include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" (nor in --include-path {args.include_path})" if args.include_path else ""
        raise CliError(f"--tasks: unknown task(s) {unknown}: not lm-eval tasks{where}")
    tracker = EvaluationTracker(output_path=args.output_path) if args.output_path else None
    model_args: dict[str, str | int] = {
        "system": str(Path(args.system).resolve()),
        "max_gen_toks": args.max_gen_toks,
    }
    if args.max_length is not None:
        model_args["max_length"] = args.max_length
    results = lm_eval.simple_evaluate(
        model="latent-merge",
        model_args=model_args,
        tasks=tasks,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        limit=args.limit,
        log_samples=args.log_samples,
        apply_chat_template=args.apply_chat_template,
        task_manager=manager,
        evaluation_tracker=tracker,
        random_seed=args.seed,
        numpy_random_seed=args.seed,
        torch_random_seed=args.seed,
        fewshot_random_seed=args.seed,
    )
    samples = results.pop("samples", None)
    if tracker is not None:  # results under OUT/<system name>/ (lm-eval names the folder after model_args)
        general = tracker.general_config_tracker
        general.model_name = general.model_name_sanitized = re.sub(r"[^\w.+-]+", "_", name)
        tracker.save_results_aggregated(results=results, samples=samples)
        if args.log_samples:
            for task in results["configs"]:
                tracker.save_results_samples(task_name=task, samples=samples[task])
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    return 0
