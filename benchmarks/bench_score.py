"""Loglikelihood requests per second: a merged system through `lmn.score` against lm-eval's `hf` model.

    python benchmarks/bench_score.py --preset toy       # the shipped toy pair (CPU, well under a minute)
    python benchmarks/bench_score.py --preset medium    # random Qwen2 of bench_decode's medium shape (CPU)

The same requests (lm-eval's `(context ids, continuation ids)` pairs: contexts of `--context` tokens give
or take a quarter, continuations of 1 to 8 tokens, as multiple-choice tasks make them) are scored by:
- `hf_single`: lm-eval's own `hf` model (`HFLM._loglikelihood_tokens`) on the base alone;
- `score_single`: `lmn.score` on the base alone;
- `score_merged`: `lmn.score` with the source slerped in at layer L (the source runs blocks 0..L-1).

A merged forward does the base's work plus the source's blocks below L, so its ideal cost is
`(1 + L / n_layers)` times the base's; the target is merged / hf_single <= 1.15 x that ideal at batch 16.
`lmn.score` runs a context shared by several choices once (its continuations go on from its caches), which
`hf_single` does only for one-token continuations: merged / hf_single then falls below the ideal, and
`merged_over_score_single` (both sharing alike) is the ratio that isolates the merge's own cost.
Methods are timed round-robin in one run (best of the repeats), so load on a shared machine hits all of
them alike; the committed records live in `benchmarks/results/score_<preset>_cpu.json`
(`--update-results`).
"""

import argparse
import datetime
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import latent_merge_nnsight as lmn  # noqa: E402
from latent_merge_nnsight.models import hf_module, model_info  # noqa: E402
from latent_merge_nnsight.nouns import Model  # noqa: E402

if TYPE_CHECKING:
    from lm_eval.models.huggingface import HFLM

Runner = Callable[[], object]

METHODS = ("hf_single", "score_single", "score_merged")
TARGET = 1.15
"""merged / hf_single at batch 16 should stay within this factor of the ideal (1 + L / n_layers)."""


def models(preset: str) -> tuple[Model, Model, int]:
    """(base, source, merge layer) of the preset."""
    if preset == "toy":
        return lmn.load("toy-base", dtype="float32"), lmn.load("toy-reasoner", dtype="float32"), 3
    from bench_decode import PRESETS, build

    shape = dict(PRESETS["medium"])
    return (
        build(shape, torch.device("cpu"), seed=0),
        build(shape, torch.device("cpu"), seed=1),
        shape["layer"],
    )


def requests(n: int, context: int, vocab: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """`n` (context, continuation) id pairs: groups of four choices sharing a context, like a
    multiple-choice task (ids from 10 up: no special tokens)."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        ctx = [rng.randrange(10, vocab) for _ in range(rng.randint(3 * context // 4, 5 * context // 4))]
        for _ in range(4):
            out.append((ctx, [rng.randrange(10, vocab) for _ in range(rng.randint(1, 8))]))
    return out[:n]


def hf_single(base: Model, batch: int) -> "HFLM":
    """lm-eval's `hf` model around the base's own HF module (no copy), on the CPU."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=hf_module(base), tokenizer=base.tokenizer, batch_size=batch, device="cpu")


def runners(
    base: Model, ft: Model, layer: int, reqs: list[tuple[list[int], list[int]]], batch: int
) -> dict[str, Runner]:
    recipe = lmn.Recipe(op="slerp", layers={layer: 0.5})
    ctx, cont = [c for c, _ in reqs], [n for _, n in reqs]
    hflm = hf_single(base, batch)
    triples = [(None, c, n) for c, n in reqs]
    return {
        "hf_single": lambda: hflm._loglikelihood_tokens(triples, disable_tqdm=True),
        "score_single": lambda: lmn.score(base, None, ctx, cont, None, batch_size=batch),
        "score_merged": lambda: lmn.score(base, ft, ctx, cont, recipe, batch_size=batch),
    }


def measure(run: dict[str, Runner], repeats: int) -> dict[str, float]:
    best = {name: float("inf") for name in run}
    for _ in range(repeats):
        for name, fn in run.items():  # round-robin: a burst of load hits every method
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def check_agreement(run: dict[str, Runner]) -> float:
    """Largest |hf_single - score_single| over the requests' loglikelihoods (the two score the same)."""
    theirs = [ll for ll, _ in run["hf_single"]()]
    ours = run["score_single"]().totals
    return max(abs(a - b) for a, b in zip(theirs, ours, strict=True))


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=["toy", "medium"], default="toy")
    parser.add_argument("--requests", type=int, default=64, help="loglikelihood requests per run")
    parser.add_argument("--context", type=int, default=96, help="typical context length in tokens")
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 16], help="rows per forward")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per method (the best counts)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, help="JSON path (default: the temp folder)")
    parser.add_argument(
        "--update-results", action="store_true", help="write benchmarks/results/score_<preset>_cpu.json"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    base, ft, layer = models(args.preset)
    n_layers = model_info(base).n_layers
    ideal = 1 + layer / n_layers
    reqs = requests(args.requests, args.context, hf_module(base).config.vocab_size)
    rows = []
    agreement = None
    with torch.inference_mode():
        for batch in args.batches:
            run = runners(base, ft, layer, reqs, batch)
            if agreement is None:
                agreement = check_agreement(run)
            for fn in run.values():  # warm-up
                fn()
            best = measure(run, args.repeats)
            ratio = best["score_merged"] / best["hf_single"]
            rows.append(
                {
                    "batch": batch,
                    "seconds": best,
                    "requests_per_s": {k: args.requests / v for k, v in best.items()},
                    "merged_over_hf_single": ratio,
                    "merged_over_score_single": best["score_merged"] / best["score_single"],
                    "over_ideal": ratio / ideal,
                }
            )
            rates = ", ".join(f"{k} {args.requests / v:7.1f} req/s" for k, v in best.items())
            print(
                f"batch {batch:>3}: {rates}; merged/hf_single {ratio:.2f} "
                f"(ideal {ideal:.2f}, x{ratio / ideal:.2f})"
            )
    at16 = next((r for r in rows if r["batch"] == 16), None)
    payload = {
        "benchmark": "bench_score",
        "preset": args.preset,
        "models": [model_info(base).name, model_info(ft).name],
        "merge": {"op": "slerp", "layer": layer, "n_layers": n_layers, "alpha": 0.5, "ideal_ratio": ideal},
        "requests": args.requests,
        "context_tokens": f"{3 * args.context // 4}..{5 * args.context // 4}, 4 continuations of 1..8 each",
        "repeats": args.repeats,
        "max_abs_diff_hf_vs_score_single": agreement,
        "target": f"merged/hf_single <= {TARGET} x ideal at batch 16",
        "target_met": None if at16 is None else at16["over_ideal"] <= TARGET,
        "results": rows,
        "device": f"cpu ({platform.machine()})",
        "cpu_threads": args.threads,
        "load_average_1min_at_end": os.getloadavg()[0],
        "note": "CPU run on a machine shared with other jobs (load average above); methods timed "
        "round-robin, best of the repeats; hf_single is lm-eval's HFLM._loglikelihood_tokens",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "lm_eval": _version("lm_eval"),
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    name = f"score_{args.preset}_cpu.json"
    out = args.out or (
        ROOT / "benchmarks" / "results" / name
        if args.update_results
        else Path(tempfile.gettempdir()) / "lmn-benchmarks" / name
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"max |hf - score| (base alone) {agreement:.2e}; written to {out}")
    return payload


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
