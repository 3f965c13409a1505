"""`lmn serve`: an OpenAI-compatible server for a system, merged ones included."""

import argparse

from latent_merge_nnsight.cli.common import NON_NEGATIVE, PORT, POSITIVE, Subcommands, add_command


def add(sub: Subcommands) -> None:
    help = "an OpenAI-compatible server for a system (merged ones included)"
    p = add_command(sub, "serve", run, help)
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


def run(args: argparse.Namespace) -> int:
    from latent_merge_nnsight.serve import run_serve

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
