"""`lmn` on the command line: parse, validate, call the library, write results.

Every subcommand imports what it needs when it runs, so `lmn --help` and argument errors import no torch.

Errors: every failure ends as one line `lmn CMD: error: ...` on stderr with exit code 2 (`--debug` shows
the traceback instead). `describe_error` turns exceptions into that line (pydantic, YAML, missing files,
the package's own errors), and the flag a user typed comes from the error's `param` (`PARAM_FLAGS`, one
table) or, for messages that name no single parameter, from `FLAG_WORDS`. A new subcommand gets all of
this by being added with `add_command`.
"""

import argparse
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.sampling_rules import check_sampling

Handler = Callable[[argparse.Namespace], int]


class CliError(LatentMergeError):
    """A user error already phrased in the command line's terms (the flags and files the user typed)."""


PARAM_FLAGS: dict[str, str] = {
    # a library parameter (`LatentMergeError.param`) -> the flag a command-line user typed: the one table
    "max_new_tokens": "--max-new-tokens",
    "temperature": "--temperature",
    "top_p": "--top-p",
    "top_k": "--top-k",
    "seed": "--seed",
    "stop": "--stop",
    "sampler": "--sampler",
    "engine": "--engine",
    "dtype": "--dtype",
    "limit": "--limit",
    "batch_size": "--batch-size",
    "split": "--split",
    "on_missing": "--on-missing",
}
FLAG_WORDS: dict[str, str] = {
    # how library messages spell an argument -> the flag: each parameter's `name=` from PARAM_FLAGS, and
    # the phrases that name no single parameter
    "allow_extrapolation=True": "--allow-extrapolation",
    "resume=False": "--fresh",
    **{f"{param}=": f"{flag} " for param, flag in PARAM_FLAGS.items()},
    "lmn.compute_deltas(...)": "--deltas FILE",
}


def in_flag_terms(message: str, words: dict[str, str] = FLAG_WORDS, param: str | None = None) -> str:
    """`message` with the library's argument spellings (`top_p=0`) replaced by the flags (`--top-p 0`).

    `param` (the error's `LatentMergeError.param`) names the parameter at fault: its flag comes from
    `PARAM_FLAGS` when the command takes it; the other spellings in `words` are respelled too."""
    if param in PARAM_FLAGS and f"{param}=" in words:
        message = re.sub(rf"(?<![\w.-]){re.escape(param)}=", f"{PARAM_FLAGS[param]} ", message)
    for python, flag in words.items():
        message = re.sub(rf"(?<![\w.-]){re.escape(python)}", flag, message)
    return message


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def describe_error(exc: BaseException) -> str:
    """One line saying what went wrong, for any exception a command raises."""
    try:
        import pydantic
    except ImportError:  # pragma: no cover - a dependency
        pydantic = None
    if pydantic is not None and isinstance(exc, pydantic.ValidationError):
        parts = []
        for err in exc.errors(include_url=False):
            msg = str(err["msg"]).removeprefix("Value error, ")
            loc = ".".join(str(x) for x in err["loc"])
            parts.append(f"field {loc!r}: {msg}" if loc else msg)
        return f"invalid {exc.title}: " + "; ".join(parts)
    yaml = sys.modules.get("yaml")
    if yaml is not None and isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "somewhere"
        return f"not valid YAML ({where}): {exc.problem or exc.context}"
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"{exc.filename}: no such file or directory"
    if isinstance(exc, LatentMergeError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    return f"{type(exc).__name__}: {exc}"


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _read_recipe(path: str, flag: str = "--recipe") -> Any:
    """The recipe file `path`, with its problems named by flag and file (and line, for YAML syntax)."""
    from latent_merge_nnsight.recipe import Recipe

    where = f"{flag} {path}" if flag else path
    if not Path(path).is_file():
        raise CliError(f"{where}: no such file")
    try:
        return Recipe.from_file(path)
    except Exception as e:
        raise CliError(f"{where}: {describe_error(e)}") from e


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

        for name, model in ZOO.items():
            print(f"{name}\t{zoo_path(name)}\t{model.description}")
        return 0
    from latent_merge_nnsight.zoo.train import main as train_main

    return train_main(args.train_args)  # reached only through `main`'s hand-over (see _ZOO_TRAIN)


def cmd_recipe(args: argparse.Namespace) -> int:
    recipe = _read_recipe(args.recipe, flag="")
    print(recipe)
    if args.n_layers is not None:
        _print_json({str(k): v for k, v in recipe.layer_alphas(args.n_layers).items()})
    return 0


def _recipe_from_args(args: argparse.Namespace) -> Any:
    """The recipe the flags describe (None: the base alone), refusing flag sets that would merge nothing.

    Each problem is named by the flag that caused it (`--op`, `--alpha`, `--layer`), not by the field of
    the `Recipe` the flags become.
    """
    from latent_merge_nnsight.ops import check_alpha, get_op
    from latent_merge_nnsight.recipe import Recipe

    deltas = getattr(args, "deltas", None)
    if args.recipe:
        if args.layer:
            raise CliError("give either --recipe FILE or --layer/--alpha/--op, not both")
        recipe = _read_recipe(args.recipe)
        if not args.source and not deltas and recipe.deltas is None:
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
    if not args.source and not (spec.static_source and deltas):
        what = "--deltas FILE" if spec.static_source else "--source MODEL"
        raise CliError(
            f"--layer {args.layer[0]} is given but there is nothing to merge from; add {what}, "
            "or drop --layer to run the base alone"
        )
    if spec.static_source and not deltas:
        raise CliError(
            f"--op {args.op} steers with saved vectors: give --deltas FILE (written by lmn.Deltas.save from "
            "lmn.compute_deltas in Python)"
        )
    try:
        check_alpha(args.alpha, spec, allow_extrapolation=args.allow_extrapolation, what="--alpha")
    except LatentMergeError as e:
        raise CliError(in_flag_terms(str(e)).replace("--alpha=", "--alpha ")) from None
    return Recipe(
        op=args.op,
        site=args.site,
        layers={layer: args.alpha for layer in args.layer},
        allow_extrapolation=args.allow_extrapolation,
        deltas=deltas,
    )


def _load(flag: str, name: str, args: argparse.Namespace, **kwargs: Any) -> Any:
    from latent_merge_nnsight.models import load

    try:
        return load(name, dtype=args.dtype, device_map=args.device_map, **kwargs)
    except Exception as e:
        raise CliError(f"{flag} {name}: {describe_error(e)}") from e


def _load_models(args: argparse.Namespace, recipe: Any = None) -> tuple[Any, Any]:
    """The --base model and the --source models (one source as a model, several as a list, none as None).

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
        plan = recipe_plan(recipe, n)
        blocks = plan.source_blocks(n, listed=True) if plan.live_sources else n  # (the one depth rule)
        up_to = blocks if blocks < n else None
    if getattr(args, "deltas", None):
        return base, args.deltas
    sources = [_load("--source", s, args, up_to_layer=up_to) for s in args.source]
    return base, (sources[0] if len(sources) == 1 else sources or None)


def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
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


def cmd_generate(args: argparse.Namespace) -> int:
    from latent_merge_nnsight.generation import generate

    recipe = _recipe_from_args(args)
    sampling = _sampling_kwargs(args)
    base, sources = _load_models(args, recipe)
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


def cmd_respond(args: argparse.Namespace) -> int:
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


def cmd_judge(args: argparse.Namespace) -> int:
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


def cmd_judgebench_accuracy(args: argparse.Namespace) -> int:
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
    from latent_merge_nnsight.evaluation.judgebench.official import load_official_outputs, official_accuracy

    _print_json(official_accuracy(load_official_outputs(args.outputs)))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from latent_merge_nnsight import analysis

    if args.eval == "perplexity":
        if not args.texts:
            raise LatentMergeError("--eval perplexity needs --texts FILE (one text per line)")
        if not Path(args.texts).is_file():
            raise CliError(f"--texts {args.texts}: no such file")
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
        allow_extrapolation=args.allow_extrapolation,
        resume=not args.fresh,
        progress=not args.no_progress,
        max_batch=args.max_batch,
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
        parallel_trials=args.parallel_trials,
    )  # fmt: skip
    print(Path(result.paths["pareto_md"]).read_text())
    shown = ", ".join(f"{k} {v:.3f}" for k, v in result.test.items())
    print(f"winner: trial {result.winner_trial}, {result.winner}")
    print(f"test split ({args.n_test} per category): {shown}")
    print(f"wrote {args.out}/ (winner.yaml, system.yaml, trials.csv, pareto.csv/.md/.png, result.json)")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from latent_merge_nnsight.evaluation.judgebench.data import fetch_judgebench, verify_judgebench

    fetched = fetch_judgebench(args.dir)
    problems = verify_judgebench(args.dir)
    if problems:  # pragma: no cover - fetch_judgebench writes only checked files
        raise CliError("; ".join(problems))
    print(
        f"{args.dir}: JudgeBench's files, sha256-checked ({len(fetched)} fetched, the others already there)"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from latent_merge_nnsight.systems.export import export_vllm

    if not Path(args.system).is_file():
        raise CliError(f"SYSTEM {args.system}: no such file")
    out = export_vllm(args.system, args.out_dir)
    print(f"wrote {out}/ (serve it: vllm serve {out})")
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
        openai_finish_reasons=args.openai_finish_reasons,
    )
    return 0


# ----------------------------------------------------------------------------------------------------
# parser


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default once: not where its help already says what the default is, nor for None."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default is None:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`lmn CMD: error: ...`, exit 2) and defaults shown in --help."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _checked(kind: Callable[[str], Any], ok: Callable[[Any], bool], expected: str) -> Callable[[str], Any]:
    """An argparse `type` that parses with `kind` and refuses values outside `expected`."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {expected}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range; expected {expected}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _setting(name: str, kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse `type` for the sampling setting `name`: parsed with `kind`, checked by the one rule of
    that setting (`sampling_rules.check_sampling`, as `lmn.generate` and the system YAML check it)."""

    def parse(text: str) -> Any:
        try:
            return check_sampling(name, kind(text))
        except LatentMergeError as e:
            raise argparse.ArgumentTypeError(f"{text} is out of range; expected {e.expected}") from None
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {_RULE_KIND[kind]}") from None

    parse.__name__ = kind.__name__
    return parse


_RULE_KIND = {int: "an int", float: "a number"}
FINITE = _checked(float, math.isfinite, "a finite number")
NON_NEGATIVE = _checked(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
PROBABILITY = _checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
COUNT = _checked(int, lambda v: v >= 0, "an int >= 0")
POSITIVE = _checked(int, lambda v: v >= 1, "an int >= 1")
LAYER = _checked(int, lambda v: v >= 0, "a layer index >= 0")
PORT = _checked(int, lambda v: 1 <= v <= 65535, "a TCP port in 1..65535")
SPLITS = ("gpt", "claude")
DEFAULT_SPLIT = "gpt"


def add_command(
    sub: Any, name: str, handler: Handler, help: str, *, flag_words: dict[str, str] | None = None
) -> argparse.ArgumentParser:
    """A subcommand parser with the shared flags (`--debug`); `flag_words` respells the library's argument
    names in its error messages (see `in_flag_terms`)."""
    p = sub.add_parser(name, help=help, description=help)
    # no default here: a subcommand's default would overwrite `lmn --debug CMD`'s value
    p.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="on an error, show the full traceback"
    )
    p.add_argument(
        "--threads", type=POSITIVE, default=argparse.SUPPRESS,
        help="CPU threads for torch (default: 1 without a GPU, as the demo runs; else torch's own)",
    )  # fmt: skip
    p.set_defaults(handler=handler, flag_words=flag_words or {})
    return p


def _add_sampling(p: argparse.ArgumentParser) -> None:
    flags = [
        ("--max-new-tokens", "max_new_tokens", int, 64, "tokens to generate per prompt"),
        ("--temperature", "temperature", float, 0.0, "0 = greedy; > 0 samples"),
        ("--top-p", "top_p", float, 1.0, "nucleus sampling mass (1 = off)"),
        ("--top-k", "top_k", int, 0, "sample among the k most likely tokens (0 = off)"),
        ("--seed", "seed", int, None, "seed for sampling (same seed, same tokens)"),
    ]
    for flag, name, kind, default, help in flags:
        p.add_argument(flag, type=_setting(name, kind), default=default, help=help)
    p.add_argument(
        "--sampler",
        default="default",
        choices=["default", "paper"],
        help="top-p rule: 'default' keeps the token that crosses top_p, 'paper' drops it (the paper's code)",
    )
    p.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")


def _add_models(p: argparse.ArgumentParser, *, source_required: bool) -> None:
    p.add_argument("--base", required=True, help="hub id, local dir or zoo name of the base model")
    p.add_argument(
        "--source",
        action="append",
        required=source_required,
        default=None if source_required else [],
        help="source model (repeat for RegMean)",
    )
    p.add_argument("--dtype", default="auto", help="torch dtype of the weights ('auto', 'bfloat16', ...)")
    p.add_argument("--device-map", default=None, help="transformers device_map ('auto', 'cuda:0', ...)")


def _add_demo_command(sub: Any) -> None:
    """`lmn demo` and its flags."""
    p = add_command(sub, "demo", cmd_demo, "the paper's Experiment A in miniature on the shipped toy pair")
    p.add_argument("--out", default="runs/demo", help="output folder (results.csv, report.md, figures)")
    p.add_argument("--quick", action="store_true", help="a ~30 s version on a smaller grid")
    p.add_argument("--docs", default=None, help="also copy the report and the Pareto figure here")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _add_zoo_command(sub: Any) -> None:
    """`lmn zoo` and its flags."""
    p = add_command(sub, "zoo", cmd_zoo, "the shipped toy models")
    zsub = p.add_subparsers(dest="zoo_command", required=True, parser_class=_Parser)
    zsub.add_parser("list", help="list the shipped models")
    zt = zsub.add_parser(
        "train", help="retrain the toy pair from a seed (`lmn zoo train --help`)", add_help=False
    )
    zt.add_argument("train_args", nargs=argparse.REMAINDER, help="the trainer's flags (--out DIR ...)")


def _add_recipe_command(sub: Any) -> None:
    """`lmn recipe` and its flags."""
    p = add_command(sub, "recipe", cmd_recipe, "validate a recipe file and show its per-layer alphas")
    p.add_argument("recipe", help="recipe YAML or JSON")
    p.add_argument("--n-layers", type=POSITIVE, default=None, help="resolve layers for a model of this depth")


def _add_generate_command(sub: Any) -> None:
    """`lmn generate` and its flags."""
    p = add_command(
        sub, "generate", cmd_generate, "merged generation from the command line", flag_words=FLAG_WORDS
    )
    _add_models(p, source_required=False)
    p.add_argument("--recipe", default=None, help="recipe YAML/JSON (or use --op/--layer/--alpha)")
    p.add_argument("--op", default="slerp", help="merge op when no recipe file is given")
    p.add_argument("--layer", type=LAYER, action="append", default=None, help="merge layer (repeatable)")
    p.add_argument(
        "--site",
        default="pre",
        choices=["pre", "post"],
        help="merge site of each layer (entering or leaving it)",
    )
    p.add_argument("--alpha", type=FINITE, default=0.5, help="source weight (0 = base, 1 = source)")
    p.add_argument("--allow-extrapolation", action="store_true", help="allow --alpha outside [0, 1]")
    p.add_argument(
        "--deltas", default=None, help="steering vectors (safetensors from Deltas.save), --op delta"
    )
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap each prompt as a user message in the tokenizer's chat template (default: when it has one)",
    )
    p.add_argument(
        "--engine", default="auto", choices=["auto", "fast", "nnsight", "vllm"], help="generation engine"
    )
    _add_sampling(p)


def _add_sweep_command(sub: Any) -> None:
    """`lmn sweep` and its flags."""
    p = add_command(
        sub, "sweep", cmd_sweep, "layer x alpha sweep of latent merges (resumable), with heatmaps",
        flag_words=FLAG_WORDS,
    )  # fmt: skip
    _add_models(p, source_required=True)
    p.add_argument("--ops", nargs="+", default=["lerp", "slerp"], help="merge ops to sweep")
    p.add_argument("--layers", nargs="+", type=LAYER, required=True, help="merge layers to sweep")
    p.add_argument("--alphas", nargs="+", type=FINITE, default=[0.25, 0.5, 0.75], help="alphas to sweep")
    p.add_argument("--allow-extrapolation", action="store_true", help="allow --alphas outside [0, 1]")
    p.add_argument(
        "--eval", choices=["tasks", "perplexity"], default="tasks", help="what to measure per cell"
    )
    p.add_argument("--texts", default=None, help="text file (one per line) for --eval perplexity")
    p.add_argument("--n-per-category", type=POSITIVE, default=20, help="toy task questions per category")
    p.add_argument("--seed", type=COUNT, default=0, help="seed of the toy task questions")
    p.add_argument("--site", default="pre", choices=["pre", "post"], help="merge site of each layer")
    p.add_argument("--out", default="runs/sweep", help="folder for sweep.jsonl, results.csv and heatmaps")
    p.add_argument("--fresh", action="store_true", help="start over instead of resuming OUT/sweep.jsonl")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "--max-batch",
        type=POSITIVE,
        default=None,
        help="rows (cells x questions) per engine pass: cells run together as per-row recipes "
        "(default: the evaluator's batch size, 64)",
    )


def _add_search_command(sub: Any) -> None:
    """`lmn search` and its flags."""
    p = add_command(
        sub, "search", cmd_search, "Optuna search of merge schedules (resumable), Pareto front, winner"
    )
    p.add_argument("--base", required=True, help="hub id, local dir or zoo name of the base model")
    p.add_argument("--source", action="append", required=True, help="source model (repeat for RegMean)")
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
    p.add_argument("--dtype", default="auto", help="model dtype")
    p.add_argument("--device-map", default=None, help="transformers device_map")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _add_respond_command(sub: Any) -> None:
    """`lmn respond` and its flags."""
    p = add_command(
        sub, "respond", cmd_respond, "answer JudgeBench questions with a system (resumable JSONL)",
        flag_words={k: FLAG_WORDS[k] for k in ("limit=", "batch_size=", "split=")},
    )  # fmt: skip
    p.add_argument("system", help="system YAML")
    p.add_argument("--split", default=DEFAULT_SPLIT, choices=SPLITS, help="JudgeBench split")
    p.add_argument("--data", default=None, help="local JSONL/Parquet instead of the hub")
    p.add_argument("--out", required=True, help="responses JSONL (appended; reruns skip answered questions)")
    p.add_argument("--limit", type=POSITIVE, default=None, help="answer only the first N questions")
    p.add_argument("--batch-size", type=POSITIVE, default=8, help="questions per generate call")
    p.add_argument(
        "--truncate",
        default="error",
        choices=["error", "left", "none"],
        help="a question longer than the model's context (minus max_new_tokens): refuse it (error), cut "
        "its start (left; each row records the tokens cut), or feed it whole (none); the sidecar records it",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _add_judge_command(sub: Any) -> None:
    """`lmn judge` and its flags."""
    p = add_command(
        sub, "judge", cmd_judge, "pairwise LLM judging of two response files",
        flag_words={"on_missing=": FLAG_WORDS["on_missing="]},
    )  # fmt: skip
    p.add_argument("a", help="responses JSONL of system A")
    p.add_argument("b", help="responses JSONL of system B")
    p.add_argument("--judge-model", required=True, help="judge model name on the endpoint")
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
    p.add_argument("--concurrency", type=POSITIVE, default=8, help="parallel requests")
    p.add_argument("--max-retries", type=COUNT, default=6, help="retries of a failed request")
    p.add_argument("--on-missing", default="error", choices=["error", "drop"], help="pairs in one file only")
    p.add_argument(
        "--retry-invalid", action="store_true", help="ask again for cached judgments without a verdict"
    )


def _add_judgebench_accuracy_command(sub: Any) -> None:
    """`lmn judgebench-accuracy` and its flags."""
    p = add_command(
        sub, "judgebench-accuracy", cmd_judgebench_accuracy, "JudgeBench's official judge-accuracy protocol"
    )
    p.add_argument("--split", default=DEFAULT_SPLIT, choices=SPLITS, help="JudgeBench split")
    p.add_argument("--data", default=None, help="local JSONL/Parquet instead of the hub")
    p.add_argument(
        "--template",
        required=True,
        help="vanilla (JudgeBench's prompt: fetched once at a pinned commit, sha256-checked, cached; "
        "LMN_JUDGEBENCH_PROMPT=FILE uses a local copy), pairwise_abc, or a template file",
    )
    p.add_argument("--judge-model", default=None, help="judge model on an OpenAI-compatible endpoint")
    p.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint (default: OpenAI)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
    p.add_argument("--judge-system", default=None, help="a local system YAML acting as the judge")
    p.add_argument(
        "--truncate",
        default="error",
        choices=["error", "left", "none"],
        help="with --judge-system, a judge prompt longer than the judge's context (less max_new_tokens): "
        "refuse it before judging (error), cut its start (left), or feed it whole (none)",
    )
    p.add_argument("--cache", default=None, help="judgment cache JSONL for resuming")
    p.add_argument(
        "--concurrency", type=POSITIVE, default=8, help="parallel requests (batch size for a local judge)"
    )
    p.add_argument("--limit", type=POSITIVE, default=None, help="judge only the first N pairs")
    p.add_argument("--max-retries", type=COUNT, default=6, help="retries of a failed judge request")
    p.add_argument(
        "--retry-invalid", action="store_true", help="ask again for cached judgments without a verdict"
    )
    p.add_argument("--out", required=True, help="records in JudgeBench's output format (JSONL)")


def _add_judgebench_score_command(sub: Any) -> None:
    """`lmn judgebench-score` and its flags."""
    p = add_command(
        sub, "judgebench-score", cmd_judgebench_score, "score a JudgeBench output file (official protocol)"
    )
    p.add_argument("outputs", help="JSONL in JudgeBench's output format")


def _add_data_command(sub: Any) -> None:
    """`lmn data` and its arguments."""
    p = add_command(
        sub,
        "data",
        cmd_data,
        "fetch JudgeBench's files from its own repository (pinned commit, sha256-checked)",
    )
    p.add_argument("dataset", choices=["judgebench"], help="the data set")
    p.add_argument("dir", help="folder to fetch into (the tests read $LMN_JUDGEBENCH_DATA)")


def _add_export_command(sub: Any) -> None:
    """`lmn export` and its arguments."""
    p = add_command(sub, "export", cmd_export, "export a latent system for another engine (vLLM)")
    p.add_argument("target", choices=["vllm"], help="the engine to export for")
    p.add_argument("system", help="system YAML (kind latent or single)")
    p.add_argument("out_dir", help="new folder that `vllm serve OUT_DIR` and vllm.LLM(OUT_DIR) load")


def _add_serve_command(sub: Any) -> None:
    """`lmn serve` and its flags."""
    p = add_command(
        sub, "serve", cmd_serve, "an OpenAI-compatible server for a system (merged ones included)"
    )
    p.add_argument("system", help="system YAML")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    p.add_argument("--port", type=PORT, default=8000, help="TCP port")
    p.add_argument(
        "--max-batch-size", type=POSITIVE, default=8, help="requests batched into one generate call"
    )
    p.add_argument(
        "--max-wait-ms", type=NON_NEGATIVE, default=5, help="how long a batch waits for more requests"
    )
    p.add_argument("--max-prompt-tokens", type=POSITIVE, default=None, help="refuse longer prompts (400)")
    p.add_argument(
        "--max-tokens-limit",
        type=POSITIVE,
        default=None,
        help="refuse a larger max_tokens (400; default: the model's context, which also bounds "
        "max_tokens by what the prompt leaves)",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1 (401 otherwise); default: $LMN_API_KEY, else none",
    )
    p.add_argument(
        "--max-body-bytes", type=POSITIVE, default=8 * 2**20, help="refuse larger request bodies (413)"
    )
    p.add_argument(
        "--openai-finish-reasons",
        action="store_true",
        help="send finish_reason in OpenAI's words only ('stop' for an EOS too, 'length'); default: "
        "'eos', 'stop' (a stop string) or 'length'",
    )


def _add_eval_command(sub: Any) -> None:
    """`lmn eval` (its flags and handler live in `cli_eval`)."""
    from latent_merge_nnsight.cli_eval import EVAL_FLAG_WORDS, add_eval_arguments, cmd_eval

    help = "lm-evaluation-harness tasks on a system (needs the lmeval extra)"
    add_eval_arguments(add_command(sub, "eval", cmd_eval, help, flag_words=EVAL_FLAG_WORDS), POSITIVE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lmn", description="Latent merging of LLMs in representation space, as nnsight interventions."
    )
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_demo_command(sub)
    _add_zoo_command(sub)
    _add_recipe_command(sub)
    _add_generate_command(sub)
    _add_sweep_command(sub)
    _add_search_command(sub)
    _add_respond_command(sub)
    _add_judge_command(sub)
    _add_judgebench_accuracy_command(sub)
    _add_judgebench_score_command(sub)
    _add_data_command(sub)
    _add_export_command(sub)
    _add_serve_command(sub)
    _add_eval_command(sub)
    return parser


def _set_threads(threads: int | None) -> None:
    """torch's CPU threads: `--threads N`, else 1 where no GPU is visible (on a shared CPU machine torch's
    default of one thread per core is slower, not faster: the demo measured it)."""
    import torch

    if threads is None and not torch.cuda.is_available():
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)


_ZOO_TRAIN = ("zoo", "train")
"""`lmn zoo train ...` hands its flags to the trainer's own parser (`lmn zoo train --help`)."""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    command = "zoo train" if tuple(argv[:2]) == _ZOO_TRAIN else None
    words: dict[str, str] = {}
    try:
        if command is not None:
            from latent_merge_nnsight.zoo.train import main as train_main

            return train_main([a for a in argv[2:] if a != "--debug"])
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # --help (0) or an argument error, already printed as one line (2)
            return e.code if isinstance(e.code, int) else 2
        command, debug, words = args.command, args.debug, args.flag_words
        _set_threads(getattr(args, "threads", None))
        return args.handler(args)
    except KeyboardInterrupt:
        print(f"lmn {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        line = in_flag_terms(_one_line(describe_error(e)), words, getattr(e, "param", None))
        print(f"lmn {command}: error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
