"""`benchmarks/bench_demo.py` runs (small: the quick grid, 2 prompts a category), so it cannot rot between
the times it is run in full; its record holds both sides' CPU time and the comparison of their results."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_demo_times_both_paths_and_compares_their_results(tmp_path):
    out = tmp_path / "demo.json"
    cmd = [sys.executable, "benchmarks/bench_demo.py", "--quick", "--n-per-category", "2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())["result"]
    assert result["grid"] == "quick" and result["n_per_category"] == 2
    for side in ("batched", "one_at_a_time"):
        assert result[side]["cpu_s"] > 0 and result[side]["wall_s"] > 0
    assert result["cpu_ratio"] == round(result["batched"]["cpu_s"] / result["one_at_a_time"]["cpu_s"], 4)
    equal, total = map(int, result["answers_equal"].split("/"))
    assert total == result["setups"] * 4 * 2 and equal == total - len(result["differing"])
    assert result["per_row_setups"] > 10
    # every differing answer is listed with its margin; a flipped near-tie is the only allowed cause
    assert all(row["margin"] < 1e-3 for row in result["differing"]), result["differing"]
    if not result["differing"]:  # no flip: the same table (timings aside) and samples
        assert result["results_equal"] and result["samples_json_equal"]
