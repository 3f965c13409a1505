"""`lmn` on the command line: parse, validate, call the library, write results.

One module per command (or small family), each holding its options next to its handler: `toys` (demo,
zoo, recipe), `generate`, `sweep`, `search`, `judge` (respond, judge, judgebench-accuracy,
judgebench-score), `data`, `export`, `serve`, `eval`. What they share is in `common` (the parser, typed
flag values, errors in the flags the user typed) and `options` (the model and sampling flags).

Every command imports what it needs when it runs, so `lmn --help` and argument errors import no torch.
"""

import sys
from collections.abc import Sequence

from latent_merge_nnsight.cli import data, export, generate, judge, search, serve, sweep, toys
from latent_merge_nnsight.cli import eval as lm_eval
from latent_merge_nnsight.cli.common import Parser, describe_error, in_flag_terms, one_line, option_strings

__all__ = ["build_parser", "main"]

COMMANDS = (toys, generate, sweep, search, judge, data, export, serve, lm_eval)
"""The modules whose `add(subcommands)` declares the commands, in the order --help lists them."""


def build_parser() -> Parser:
    parser = Parser(
        prog="lmn", description="Latent merging of LLMs in representation space, as nnsight interventions."
    )
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in COMMANDS:
        command.add(sub)
    return parser


def _set_threads(threads: int | None) -> None:
    """torch's CPU threads: `--threads N`, else 1 where no GPU is visible (on a shared CPU machine torch's
    default of one thread per core is slower, not faster: the demo measured it)."""
    import torch

    if threads is None and not torch.cuda.is_available():
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    command = "zoo train" if tuple(argv[:2]) == toys.ZOO_TRAIN else None
    flags: set[str] = set()
    try:
        if command is not None:
            from latent_merge_nnsight.zoo.train import main as train_main

            return train_main([a for a in argv[2:] if a != "--debug"])
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # --help (0) or an argument error, already printed as one line (2)
            return e.code if isinstance(e.code, int) else 2
        command, debug, flags = args.command, args.debug, option_strings(args.command_parser)
        _set_threads(getattr(args, "threads", None))
        return args.handler(args)
    except KeyboardInterrupt:
        print(f"lmn {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        line = in_flag_terms(one_line(describe_error(e)), flags, getattr(e, "param", None))
        print(f"lmn {command}: error: {line}", file=sys.stderr)
        return 2
