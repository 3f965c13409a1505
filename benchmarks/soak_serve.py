"""Soak of `lmn serve` on the toy pair (issue 17), over loopback: not part of the default test run.

    python benchmarks/soak_serve.py [--rounds 6] [--system examples/systems/toy-latent-slerp.yaml]

Each round is 16 clients x 30 requests: 10% malformed, 10% streamed, 5% hung up mid-stream. Checks
that every good request is answered, that the greedy answer is the same before and after, and that
resident memory grows by less than 1% over the second half of the rounds; prints a JSON summary and
exits 1 when a check fails. Bounded: each round has a deadline.
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from serve_load import greedy, rss_kib, run_load, start_serve  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--system", type=Path, default=ROOT / "examples" / "systems" / "toy-latent-slerp.yaml"
    )
    parser.add_argument("--rounds", type=int, default=6, help="rounds of 16 x 30 requests (even, >= 2)")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be >= 2")
    model = args.system.stem
    with start_serve(args.system) as (proc, url):
        before = greedy(url, model)
        rss, failures, t0 = [rss_kib(proc.pid)], [], time.monotonic()
        for _ in range(args.rounds):
            failures += run_load(url, model, clients=16, per_client=30, disconnect_every=20, deadline_s=600)
            rss.append(rss_kib(proc.pid))
        after = greedy(url, model)
    half = rss[len(rss) // 2]
    growth = (rss[-1] - half) / half
    result = {
        "requests": 480 * args.rounds,
        "seconds": round(time.monotonic() - t0, 1),
        "failures": failures[:10],
        "n_failures": len(failures),
        "greedy_same": before == after,
        "rss_kib_per_round": rss,
        "rss_growth_second_half": growth,
    }
    print(json.dumps(result, indent=2))
    return 0 if not failures and before == after and growth < 0.01 else 1


if __name__ == "__main__":
    raise SystemExit(main())
