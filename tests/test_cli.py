"""The `lmn` command line: parsing, validation errors, and the commands that need no model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from latent_merge_nnsight.cli import build_parser, main

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "judgebench"


def test_help_lists_the_commands():
    text = build_parser().format_help()
    for cmd in ("demo", "zoo", "recipe", "generate", "respond", "judge", "judgebench-accuracy", "serve"):
        assert cmd in text


def test_recipe_command_resolves_layers(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("op: slerp\nlayers: all\nalpha: [0, 1]\n")
    assert main(["recipe", str(path), "--n-layers", "3"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{") :]) == {"0": 0.0, "1": 0.5, "2": 1.0}


def test_recipe_command_reports_bad_layer_with_exit_code_2(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("op: slerp\nlayers: {9: 0.5}\n")
    assert main(["recipe", str(path), "--n-layers", "4"]) == 2
    assert "recipe field 'layers': [9] out of range" in capsys.readouterr().err


@pytest.mark.skipif(not (SHARED / "official_outputs").exists(), reason="shared JudgeBench data not present")
def test_judgebench_score_runs_on_an_official_file(capsys):
    path = sorted((SHARED / "official_outputs").glob("*.jsonl"))[0]
    assert main(["judgebench-score", str(path)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert 0 <= data["overall"]["accuracy"] <= 100


def test_console_script_entry_point_runs():
    out = subprocess.run(
        [sys.executable, "-m", "latent_merge_nnsight.cli", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "usage: lmn" in out.stdout


def test_generate_command_on_the_toy_pair_runs_a_merge(capsys):
    code = main(
        ["generate", "--base", "toy-base", "--source", "toy-reasoner", "--layer", "3", "--alpha", "0.5",
         "--prompt", "Compute 12+30.", "--chat", "--max-new-tokens", "12"]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "### Compute 12+30." in out and "[" in out


def test_sweep_command_writes_results_and_a_heatmap(tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("<|user|>Compute 12+30.<|end|><|assistant|>Answer: 42\nsome other text\n")
    out = tmp_path / "sweep"
    argv = ["sweep", "--base", "toy-base", "--source", "toy-reasoner", "--ops", "lerp", "--layers", "2", "4"]
    argv += [
        "--alphas",
        "0.5",
        "--eval",
        "perplexity",
        "--texts",
        str(texts),
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    import pandas as pd

    df = pd.read_csv(out / "results.csv")
    assert set(df["layer"].dropna().astype(int)) == {2, 4}
    assert (out / "heatmap_nll.png").read_bytes().startswith(b"\x89PNG")
    assert main([*argv]) == 0  # a rerun resumes: nothing left to compute
