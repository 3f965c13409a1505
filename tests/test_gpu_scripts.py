"""The scripts a lent GPU machine runs (`benchmarks/gpu_session.sh`) must work when a session gets one:
run them here on CPU, small, so they cannot rot between GPU sessions."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_check_cuda_runs_every_check_on_cpu(tmp_path):
    out = tmp_path / "check.json"
    proc = _run("benchmarks/check_cuda.py", "--dry-run-cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["failed"] == 0 and len(report["results"]) >= 10
    assert all(r["ok"] for r in report["results"].values())


def test_bench_decode_measures_every_method_it_is_given(tmp_path):
    out = tmp_path / "bench.json"
    methods = ["hf_eager", "hook_loop", "nnsight", "nnsight_eager", "fast", "fast_compiled"]
    small = ["--preset", "tiny", "--prompt", "8", "--new", "4", "--batches", "1", "2", "--repeats", "1"]
    proc = _run("benchmarks/bench_decode.py", *small, "--methods", *methods, "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = {(r["method"], r["batch"]): r for r in report["results"]}
    assert set(rows) == {(m, b) for m in methods for b in (1, 2)}
    assert all("error" not in r and r["total_s"] > 0 and r["prefill_s"] > 0 for r in rows.values())
    # a rate is a difference of two timings: positive, or None and marked unresolved when load noise hides
    # it (either may happen on a loaded machine: the check holds for both)
    for key, r in rows.items():
        rate, step = r["decode_tok_s"], r["step_ms"]
        if rate is None:
            assert step is None and r["unresolved"], (key, r)
        else:
            assert rate > 0 and step > 0 and "unresolved" not in r, (key, r)
    assert rows[("fast_compiled", 1)]["compiled_step"] and not report["partial"]
    assert all("tokens" not in r for r in report["results"])
    assert len(rows[("fast", 2)]["tokens_equal_to_nnsight_before_first_difference"]) == 2
    # the exact op count of a decode step: a batched step dispatches the same ops whatever the batch, the
    # hook loop steps each row on its own, and a merged step runs the base's ops plus the source's blocks
    ops = {k: r["aten_ops_per_step"] for k, r in rows.items() if k[0] != "fast_compiled"}
    assert "aten_ops_per_step" not in rows[("fast_compiled", 1)]
    for m in ("hf_eager", "nnsight", "nnsight_eager", "fast"):
        assert ops[(m, 1)] == ops[(m, 2)] > 0, m
    assert ops[("hook_loop", 2)] == 2 * ops[("hook_loop", 1)]
    assert ops[("hf_eager", 1)] < ops[("fast", 1)] < ops[("hook_loop", 1)]


def test_bench_rows_times_one_call_against_separate_calls(tmp_path):
    out = tmp_path / "rows.json"
    small = ["--preset", "tiny", "--prompts", "2", "--alphas", "3", "--new", "3", "--repeats", "1"]
    proc = _run("benchmarks/bench_rows.py", *small, "--device", "cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())["result"]
    assert result["rows"] == 6 and result["alphas"] == [0.3333, 0.6667, 1.0]
    for side in ("one_call", "separate_calls"):
        assert result[side]["cpu_s"] > 0 and result[side]["wall_s"] > 0
    equal, rows = result["rows_with_equal_tokens"].split("/")
    assert int(rows) == 6 and 0 <= int(equal) <= 6
