"""`lmn export vllm SYSTEM.yaml OUT_DIR`: a latent system as a folder vLLM loads and serves."""

import argparse
from pathlib import Path

from latent_merge_nnsight.cli.common import CliError, Subcommands, add_command


def add(sub: Subcommands) -> None:
    p = add_command(sub, "export", run, "export a latent system for another engine (vLLM)")
    p.add_argument("target", choices=["vllm"], help="the engine to export for")
    p.add_argument("system", help="system YAML (kind latent or single)")
    p.add_argument("out_dir", help="new folder that `vllm serve OUT_DIR` and vllm.LLM(OUT_DIR) load")


def run(args: argparse.Namespace) -> int:
    from latent_merge_nnsight.systems.export import export_vllm

    if not Path(args.system).is_file():
        raise CliError(f"SYSTEM {args.system}: no such file")
    out = export_vllm(args.system, args.out_dir)
    print(f"wrote {out}/ (serve it: vllm serve {out})")
    return 0
