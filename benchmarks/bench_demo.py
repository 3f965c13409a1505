"""`lmn demo` in per-row passes against one setup at a time, in one run: CPU time, wall time, same report.

    python benchmarks/bench_demo.py                      # the full demo, both ways (several minutes)
    python benchmarks/bench_demo.py --quick              # the quick grid
    python benchmarks/bench_demo.py --write-results      # the record benchmarks/results/demo_cpu.json
    python benchmarks/bench_demo.py --keep runs/bench    # keep both runs (runs/bench/batched is a full demo)

Each side is the demo's own `run_demo` in a child process of its own (`max_batch`: the default, latent
merges of the pair as per-row recipes in shared engine passes; then `max_batch=1`, every setup in its own
calls), so its CPU time is the child's user + sys time from `resource.getrusage(RUSAGE_CHILDREN)` (every
thread; the machine's other load does not count, unlike wall time). Reported: both sides' CPU and wall
seconds, their ratios (batched / one at a time; the target of issue 25 is CPU <= 0.5), whether
results.csv (without its timing column; the probe's means to 1e-6 relative, as float sums over other
batches round differently) and samples.json are the same both ways, and every prompt whose
answer differs, with its logit margin where the two runs part (`demo.checks.near_ties`: a float32
near-tie has a margin near 0).
"""

import argparse
import datetime
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import latent_merge_nnsight as lmn  # noqa: E402
from latent_merge_nnsight.demo.checks import near_ties  # noqa: E402
from latent_merge_nnsight.demo.grid import DEFAULT_GRID, QUICK_GRID, eval_sets  # noqa: E402
from latent_merge_nnsight.demo.passes import DEFAULT_MAX_BATCH  # noqa: E402

CHILD = """
import json, sys
from dataclasses import replace
from latent_merge_nnsight.demo import QUICK_GRID, DEFAULT_GRID, run_demo
out, quick, n, max_batch = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
grid = QUICK_GRID if quick else DEFAULT_GRID
grid = grid if n == 0 else replace(grid, n_per_category=n)
result = run_demo(out, quick, progress=False, grid=grid, max_batch=max_batch)
recipes = {k: r.model_dump(mode="json") for k, r in result.recipes.items()}
json.dump({"texts": result.texts, "recipes": recipes}, open(out + "/texts.json", "w"))
"""


def run_side(out: Path, quick: bool, n: int, max_batch: int) -> dict[str, float]:
    """One demo run in a child process: its CPU (user + sys, all threads) and wall seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.perf_counter()
    cmd = [sys.executable, "-c", CHILD, str(out), "1" if quick else "0", str(n), str(max_batch)]
    subprocess.run(cmd, check=True, cwd=ROOT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"cpu_s": round(cpu, 2), "wall_s": round(time.perf_counter() - wall, 2)}


def _same_results(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    """results.csv without timings: every column the same, the probe's float means to 1e-6 relative."""
    probe = ["norm_ratio", "source_weight"]
    if a.shape != b.shape or not a.drop(columns=probe).equals(b.drop(columns=probe)):
        return False
    return all(
        bool(((a[c] - b[c]).abs() <= 1e-6 * a[c].abs()).where(a[c].notna(), b[c].isna()).all()) for c in probe
    )


def compare(quick: bool, n: int, max_batch: int, folder: Path) -> dict[str, Any]:
    """Run the demo both ways (per-row passes first) and compare what they wrote."""
    sides = {"batched": max_batch, "one_at_a_time": 1}
    times = {name: run_side(folder / name, quick, n, mb) for name, mb in sides.items()}
    tables = {name: pd.read_csv(folder / name / "results.csv").drop(columns="seconds") for name in sides}
    samples = {name: (folder / name / "samples.json").read_text() for name in sides}
    got = {name: json.loads((folder / name / "texts.json").read_text()) for name in sides}
    grid = QUICK_GRID if quick else DEFAULT_GRID
    grid = grid if n == 0 else replace(grid, n_per_category=n)
    prompts = {c: [e.prompt for e in ex] for c, ex in eval_sets(grid.n_per_category, grid.seed).items()}
    recipes = {k: lmn.Recipe.model_validate(r) for k, r in got["batched"]["recipes"].items()}
    base, ft = lmn.load("toy-base"), lmn.load("toy-reasoner")
    differing = near_ties(got["batched"]["texts"], got["one_at_a_time"]["texts"], recipes, prompts, base, ft)
    n_texts = sum(len(t) for per in got["batched"]["texts"].values() for t in per.values())
    return {
        "grid": "quick" if quick else "default",
        "n_per_category": grid.n_per_category,
        "max_batch": max_batch,
        "setups": len(got["batched"]["texts"]),
        "per_row_setups": len(recipes),
        **times,
        "cpu_ratio": round(times["batched"]["cpu_s"] / times["one_at_a_time"]["cpu_s"], 4),
        "wall_ratio": round(times["batched"]["wall_s"] / times["one_at_a_time"]["wall_s"], 4),
        "results_equal": _same_results(tables["batched"], tables["one_at_a_time"]),
        "samples_json_equal": samples["batched"] == samples["one_at_a_time"],
        "answers_equal": f"{n_texts - len(differing)}/{n_texts}",
        "differing": differing,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the quick grid (QUICK_GRID)")
    parser.add_argument("--n-per-category", type=int, default=0, help="override the grid's (0: keep it)")
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="the batched side's rows")
    parser.add_argument("--out", type=Path, help="write the record here")
    parser.add_argument("--keep", type=Path, help="write both runs under this folder (default: a temp one)")
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        result = compare(args.quick, args.n_per_category, args.max_batch, folder)
    record = {
        "benchmark": "lmn demo: latent merges in per-row passes vs one setup at a time (CPU time, children)",
        "device": platform.processor() or "cpu",
        "threads": 1,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
        "versions": {"torch": torch.__version__, "latent_merge_nnsight": lmn.__version__},
        "result": result,
    }
    path = args.out
    if args.write_results:
        path = ROOT / "benchmarks" / "results" / f"demo_{'quick_' if args.quick else ''}cpu.json"
    if path is not None:
        path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
