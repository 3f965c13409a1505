"""`bench_score.py` runs end to end, small (speed is its own business: no timing is asserted here), and
its single-model numbers are lm-eval's own `hf` model's."""

import bench_score


def test_bench_score_measures_every_method_and_agrees_with_lm_eval(tmp_path):
    out = tmp_path / "score.json"
    report = bench_score.main(
        ["--preset", "toy", "--requests", "8", "--context", "16", "--batches", "1", "4", "--repeats", "1",
         "--out", str(out)]
    )  # fmt: skip
    assert out.exists() and report["merge"]["ideal_ratio"] == 1 + 3 / 6
    assert [r["batch"] for r in report["results"]] == [1, 4]
    for row in report["results"]:
        assert set(row["seconds"]) == set(bench_score.METHODS) and all(v > 0 for v in row["seconds"].values())
    assert report["max_abs_diff_hf_vs_score_single"] < 1e-4  # the same loglikelihoods as lm-eval's hf
