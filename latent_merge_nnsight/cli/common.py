"""What every `lmn` subcommand shares: the parser (one-line errors, defaults shown in --help), the typed
flag values (`LAYER`, `POSITIVE`, `FINITE`, ...), any exception turned into the one error line in the
flags the user typed, and help text read from the pydantic field a flag stands for.

Errors: a failure ends as one line `lmn CMD: error: ...` on stderr with exit code 2 (`--debug` shows the
traceback instead). `describe_error` phrases the exception (pydantic, YAML, missing files, the package's
own errors); `in_flag_terms` respells the parameter the error carries (`LatentMergeError.param`, through
`PARAM_FLAGS`, the one table) as the command's flag, and the few phrases of messages that carry no
parameter (`PHRASES`). A respelling applies only where the command has that flag.

Nothing here imports torch, so `lmn --help` and argument errors stay quick.
"""

import argparse
import ast
import functools
import math
import re
import sys
from collections.abc import Callable, Collection
from pathlib import Path
from typing import NoReturn, TypeVar

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.sampling_rules import check_sampling

Handler = Callable[[argparse.Namespace], int]
Subcommands = argparse._SubParsersAction
"""What `add_subparsers` returns: each command module adds its parser(s) to it."""
Number = TypeVar("Number", int, float)


class CliError(LatentMergeError):
    """A user error already phrased in the command line's terms (the flags and files the user typed)."""


# ----------------------------------------------------------------------------------------------------
# errors in the flags the user typed

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
    "truncate": "--truncate",
    "max_gen_toks": "--max-gen-toks",
    "max_length": "--max-length",
}
UNCARRIED: tuple[str, ...] = (
    "dtype",
    "engine",
    "sampler",
    "split",
    "on_missing",
    "max_gen_toks",
    "max_length",
)
"""Parameters some library messages spell `name=value` without carrying them as `param` (an unknown
`dtype` in `models.load`; the vLLM engine's `sampler` rule; `respond`'s `split` of an earlier run; the
judge's `on_missing` hint; the lm-eval model's `max_gen_toks`/`max_length`): respelled wherever they occur."""
PHRASES: dict[str, str] = {
    # phrases of library messages that name no single parameter -> the flag that does what they say
    "allow_extrapolation=True": "--allow-extrapolation",  # ops.check_weight (analysis.sweep's alphas)
    "resume=False": "--fresh",  # analysis.sweep: OUT holds another sweep
    "lmn.compute_deltas(...)": "--deltas FILE",  # plan: a steering op without vectors
}


def in_flag_terms(message: str, flags: Collection[str] | None = None, param: str | None = None) -> str:
    """`message` with the library's argument spellings (`top_p=0`) replaced by the flags (`--top-p 0`).

    `param` is the error's `LatentMergeError.param`; `flags` the option strings of the command (None:
    any), so that a message is respelled only into flags the command has. A field of a file
    (`recipe.top_p=2`) stays as written."""

    def has(flag: str) -> bool:
        return flags is None or flag.split()[0] in flags

    for name in dict.fromkeys([param, *UNCARRIED]):
        flag = PARAM_FLAGS.get(name or "")
        if flag is not None and has(flag):
            message = re.sub(rf"(?<![\w.-]){re.escape(str(name))}=", f"{flag} ", message)
    for phrase, flag in PHRASES.items():
        if has(flag):
            message = re.sub(rf"(?<![\w.-]){re.escape(phrase)}", flag, message)
    return message


def one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def describe_error(exc: BaseException) -> str:
    """One line saying what went wrong, for any exception a command raises."""
    pydantic = sys.modules.get("pydantic")  # an error of pydantic's means pydantic is imported
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


# ----------------------------------------------------------------------------------------------------
# the parser


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default once: not where its help already says what the default is, nor for None."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default is None:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`lmn CMD: error: ...`, exit 2) and defaults shown in --help."""

    def __init__(self, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", Help)
        super().__init__(**kwargs)  # type: ignore[arg-type]  # argparse's own keywords, passed through

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def add_command(sub: Subcommands, name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
    """A subcommand parser with the shared flags (`--debug`, `--threads`), running `handler`."""
    p = sub.add_parser(name, help=help, description=help)
    # no default here: a subcommand's default would overwrite `lmn --debug CMD`'s value
    p.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="on an error, show the full traceback"
    )
    p.add_argument(
        "--threads", type=POSITIVE, default=argparse.SUPPRESS,
        help="CPU threads for torch (default: 1 without a GPU, as the demo runs; else torch's own)",
    )  # fmt: skip
    p.set_defaults(handler=handler, command_parser=p)
    return p


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    """The flags `parser` accepts (`--top-p`, `-h`, ...)."""
    return {s for action in parser._actions for s in action.option_strings}


# ----------------------------------------------------------------------------------------------------
# typed flag values


def checked(
    kind: Callable[[str], Number], ok: Callable[[Number], bool], expected: str
) -> Callable[[str], Number]:
    """An argparse `type` that parses with `kind` and refuses values outside `expected`."""

    def parse(text: str) -> Number:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {expected}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range; expected {expected}")
        return value

    parse.__name__ = kind.__name__
    return parse


def setting(name: str, kind: Callable[[str], Number]) -> Callable[[str], Number]:
    """An argparse `type` for the sampling setting `name`: parsed with `kind`, checked by the one rule of
    that setting (`sampling_rules.check_sampling`, as `lmn.generate` and the system YAML check it)."""

    def parse(text: str) -> Number:
        try:
            return check_sampling(name, kind(text))
        except LatentMergeError as e:
            raise argparse.ArgumentTypeError(f"{text} is out of range; expected {e.expected}") from None
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {_KIND_WORDS[kind]}") from None

    parse.__name__ = kind.__name__
    return parse


_KIND_WORDS: dict[Callable[[str], int | float], str] = {int: "an int", float: "a number"}
FINITE = checked(float, math.isfinite, "a finite number")
NON_NEGATIVE = checked(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
COUNT = checked(int, lambda v: v >= 0, "an int >= 0")
POSITIVE = checked(int, lambda v: v >= 1, "an int >= 1")
LAYER = checked(int, lambda v: v >= 0, "a layer index >= 0")
PORT = checked(int, lambda v: 1 <= v <= 65535, "a TCP port in 1..65535")


# ----------------------------------------------------------------------------------------------------
# help text and choices from where the package declares them (read, not imported: those modules
# import torch, which `lmn --help` must not; tests/test_cli.py checks they agree with the imports)

_PACKAGE = Path(__file__).resolve().parents[1]
_MODEL_FILES = {"Recipe": "recipe.py", "SamplingSpec": "systems/spec.py", "System": "systems/spec.py"}


@functools.cache
def _source(path: str) -> ast.Module:
    return ast.parse((_PACKAGE / path).read_text(encoding="utf-8"))


def field_help(model: str, name: str, more: str = "") -> str:
    """`Model.model_fields[name].description` of the pydantic model `model` (`Recipe`, `SamplingSpec`,
    `System`), then `more`: the help of a flag that sets that one field."""
    for node in _source(_MODEL_FILES[model]).body:
        if not (isinstance(node, ast.ClassDef) and node.name == model):
            continue
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and ast.unparse(stmt.target) == name:
                call = stmt.value
                for kw in call.keywords if isinstance(call, ast.Call) else []:
                    if kw.arg == "description":
                        return ast.literal_eval(kw.value) + more
    raise LookupError(f"{model}.{name}: no field with a description in {_MODEL_FILES[model]}")


def declared(path: str, name: str) -> tuple[str, ...]:
    """The tuple of strings the package file `path` (e.g. `systems/fit.py`) declares as `name`."""
    for node in _source(path).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(ast.unparse(t) == name for t in targets):
                return tuple(ast.literal_eval(node.value))
    raise LookupError(f"{path} declares no {name}")
