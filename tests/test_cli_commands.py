"""Every `lmn` subcommand run as a user runs it (a subprocess of the console entry point) on the shipped
toy pair, with its main flags, checked against the Python API's values.

Kept small: short prompts, a few new tokens, JudgeBench rows cut short (from the real copy in ../shared).
"""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from judgebench_files import GPT_FILE

import latent_merge_nnsight as lmn
from latent_merge_nnsight.sampling import FINISH_REASONS

PROMPT = "What is 75+48?"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "systems"


def lmn_cli(*args: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "latent_merge_nnsight.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def toy():
    return lmn.load("toy-base"), lmn.load("toy-reasoner")


@pytest.fixture(scope="module")
def short_judgebench(tmp_path_factory) -> Path:
    """Two JudgeBench rows of the real file, their texts cut to a few words (the toy context is 256)."""
    rows = [json.loads(line) for line in GPT_FILE.read_text(encoding="utf-8").splitlines()[:2]]
    for row in rows:
        for key in ("question", "response_A", "response_B"):
            row[key] = row[key][:60]
    path = tmp_path_factory.mktemp("jb") / "short.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def system_file(tmp_path_factory) -> Path:
    """The shipped example system (toy pair, slerp at layer 3), with 4 new tokens per answer."""
    data = yaml.safe_load((EXAMPLES / "toy-latent-slerp.yaml").read_text(encoding="utf-8"))
    data["sampling"]["max_new_tokens"] = 4
    path = tmp_path_factory.mktemp("sys") / "toy-latent.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def texts_of(stdout: str) -> list[str]:
    """The generated texts in `lmn generate`'s output (`### prompt`, the text, `[reason]`)."""
    blocks = stdout.split("### ")[1:]
    return [block.split("\n", 1)[1].rsplit("\n[", 1)[0] for block in blocks]


def test_generate_alpha_changes_the_output_as_the_api_does(toy):
    base, ft = toy
    flags = ["--base", "toy-base", "--source", "toy-reasoner", "--layer", "3", "--alpha", "0.5"]
    out = lmn_cli("generate", *flags, "--prompt", PROMPT, "--max-new-tokens", "12")
    merged = lmn.generate(base, ft, [PROMPT], lmn.Recipe(op="slerp", layers={3: 0.5}), max_new_tokens=12)
    alone = lmn.generate(base, None, [PROMPT], None, max_new_tokens=12)
    assert texts_of(out) == merged.texts
    assert f"[{merged.finish_reasons[0]}]" in out
    assert merged.texts != alone.texts  # the alpha did change the answer
    assert merged.texts[0].startswith("Answer:")  # the chat template is applied by default


def test_zoo_list_names_the_shipped_models():
    lines = [line.split("\t") for line in lmn_cli("zoo", "list").splitlines()]
    assert [row[0] for row in lines] == ["toy-base", "toy-reasoner"]
    assert all((Path(row[1]) / "config.json").is_file() for row in lines)


def test_respond_writes_what_the_api_writes(tmp_path, system_file, short_judgebench):
    from latent_merge_nnsight.evaluation.respond import respond

    cli_out, api_out = tmp_path / "cli.jsonl", tmp_path / "api.jsonl"
    lmn_cli(
        "respond", str(system_file), "--data", str(short_judgebench), "--out", str(cli_out), "--no-progress"
    )
    respond(str(system_file), data=short_judgebench, out=api_out, progress=False)
    cli_rows = [json.loads(line) for line in cli_out.read_text().splitlines()]
    api_rows = [json.loads(line) for line in api_out.read_text().splitlines()]
    assert len(cli_rows) == 2
    keys = ("pair_id", "response", "finish_reason", "completion_tokens")
    assert [[r[k] for k in keys] for r in cli_rows] == [[r[k] for k in keys] for r in api_rows]
    assert all(r["finish_reason"] in FINISH_REASONS and 1 <= r["completion_tokens"] <= 4 for r in cli_rows)


def test_judgebench_accuracy_with_a_judge_system_scores_as_the_api(tmp_path, system_file, short_judgebench):
    from latent_merge_nnsight.evaluation.judge_system import judgebench_accuracy_system
    from latent_merge_nnsight.evaluation.judgebench.data import load_judgebench
    from latent_merge_nnsight.evaluation.judgebench.official import official_accuracy
    from latent_merge_nnsight.evaluation.judgebench.templates import load_template

    out = tmp_path / "official.jsonl"
    stdout = lmn_cli("judgebench-accuracy", "--judge-system", str(system_file), "--template", "pairwise_abc",
                     "--data", str(short_judgebench), "--out", str(out), "--truncate", "left")  # fmt: skip
    # (the toy judge's context is 256 tokens; pairwise_abc's prompt alone is longer: cut, as asked)
    scores = json.loads(stdout[stdout.index("{") :])
    pairs = load_judgebench("gpt", short_judgebench)
    records = judgebench_accuracy_system(
        pairs, str(system_file), load_template("pairwise_abc"), truncate="left"
    )
    assert scores == json.loads(json.dumps(official_accuracy(records)))
    assert scores["overall"]["n"] == 2 and len(out.read_text().splitlines()) == 2


def test_sweep_eval_tasks_writes_accuracies(tmp_path):
    out = tmp_path / "sweep"
    grid = ["--ops", "lerp", "--layers", "3", "--alphas", "0.5", "--eval", "tasks", "--n-per-category", "1"]
    lmn_cli(
        "sweep", "--base", "toy-base", "--source", "toy-reasoner", *grid, "--out", str(out), "--no-progress"
    )
    df = pd.read_csv(out / "results.csv")
    cells = df[df["system"] == "latent"]
    assert set(cells["layer"].astype(int)) == {3} and set(cells["alpha"]) == {0.5}
    assert set(cells["metric"]) == {"accuracy"} and cells["value"].between(0, 1).all()
    assert set(cells["category"]) == {"knowledge", "reasoning", "math", "coding"}
    assert (out / "heatmap_accuracy.png").read_bytes().startswith(b"\x89PNG")
