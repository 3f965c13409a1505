"""The `lmn` command line: parsing, validation errors, and the commands that need no model."""

import inspect
import json
import subprocess
import sys

import pytest
from judgebench_files import DATA as SHARED
from judgebench_files import MISSING

from latent_merge_nnsight.cli import build_parser, main
from latent_merge_nnsight.cli.common import PARAM_FLAGS, declared, field_help, in_flag_terms, option_strings
from latent_merge_nnsight.errors import LatentMergeError


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


def test_judgebench_score_runs_on_an_official_file(capsys):
    found = sorted((SHARED / "official_outputs").glob("*.jsonl"))
    assert found, MISSING
    path = found[0]
    assert main(["judgebench-score", str(path)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert 0 <= data["overall"]["accuracy"] <= 1  # a fraction, not JudgeBench's percent


def test_console_script_entry_point_runs():
    out = subprocess.run(
        [sys.executable, "-m", "latent_merge_nnsight.cli", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "usage: lmn" in out.stdout


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


# ----------------------------------------------------------------------------------------------------
# errors: one line `lmn CMD: error: ...`, exit 2, naming the flag the user typed; no torch for --help


def run_lmn(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "latent_merge_nnsight.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


NO_TORCH = (
    "import sys\nfrom latent_merge_nnsight.cli import main\n"
    "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
    "print('torch imported' if 'torch' in sys.modules else 'no torch', code)"
)


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["generate", "--help"], ["generate", "--base", "b", "--prompt", "p", "--temperature", "-1"]],
)
def test_help_and_argument_errors_do_not_import_torch(argv):
    out = subprocess.run([sys.executable, "-c", NO_TORCH, *argv], capture_output=True, text=True, timeout=60)
    assert out.stdout.splitlines()[-1] == f"no torch {0 if '--help' in argv else 2}", out.stderr


def test_importing_a_submodule_keeps_the_public_function():
    code = "import latent_merge_nnsight as l, latent_merge_nnsight.lockstep, latent_merge_nnsight.residuals; "
    code += "print(l.pair.__name__, l.capture.__name__, callable(l.generate))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["pair", "capture", "True"], out.stderr


def test_package_attributes_resolve_submodules_and_importing_the_package_imports_no_torch():
    code = (
        "import sys, latent_merge_nnsight as lmn; torch_at_import = 'torch' in sys.modules; "
        "print(torch_at_import, lmn.metrics.linear_cka.__name__, lmn.ops.slerp.__name__, "
        "lmn.analysis.search.__name__, lmn.analysis.sweep.__name__, lmn.sweep is lmn.analysis.sweep)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "linear_cka", "slerp", "search", "sweep", "True"], out.stderr
    code = "import latent_merge_nnsight as lmn; lmn.nope"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "AttributeError: module 'latent_merge_nnsight' has no attribute 'nope'" in out.stderr


def one_error_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


GEN = ["generate", "--base", "toy-base", "--prompt", "Compute 12+30."]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--source", "toy-reasoner", "--layer", "3", "--alpha", "2.0"],
         "lmn generate: error: --alpha 2.0 is outside [0, 1] for op 'slerp' (0 keeps the base, 1 takes the "
         "source); pass --allow-extrapolation to extrapolate"),
        (["--source", "toy-reasoner", "--layer", "3", "--alpha", "nan"],
         "lmn generate: error: argument --alpha: nan is out of range; expected a finite number"),
        (["--source", "toy-reasoner", "--layer", "3", "--op", "slerpp"],
         "error: --op slerpp: unknown op 'slerpp'; expected one of: delta, lerp, regmean, slerp"),
        (["--source", "toy-reasoner", "--layer", "-1"],
         "lmn generate: error: argument --layer: -1 is out of range; expected a layer index >= 0"),
        (["--temperature", "-1"], "lmn generate: error: argument --temperature: -1 is out of range"),
        (["--top-p", "0"], "error: argument --top-p: 0 is out of range; expected a number in (0, 1]"),
        (["--source", "toy-reasoner"], "lmn generate: error: --source toy-reasoner is given but no --layer"),
        (["--layer", "3"], "error: --layer 3 is given but there is nothing to merge from; add --source"),
        (["--source", "toy-reasoner", "--layer", "3", "--op", "delta"],
         "lmn generate: error: --op delta steers with saved vectors: give --deltas FILE"),
        (["--source", "toy-reasoner", "--recipe", "no/such.yaml"],
         "lmn generate: error: --recipe no/such.yaml: no such file"),
        (["--base", "toy_base"], "did you mean 'toy-base'?"),
        (["--base", "./no/such/model"], "error: --base ./no/such/model: './no/such/model' is not a local"),
        (["--top-k", "5"], "error: --top-p and --top-k act when sampling: give --temperature T > 0"),
    ],
)  # fmt: skip
def test_generate_mistakes_end_in_one_line_naming_the_flag(capsys, extra, expected):
    argv = GEN + extra
    if "--base" in extra:
        argv = [a for i, a in enumerate(GEN) if i not in (1, 2)] + extra
    line = one_error_line(capsys, ["generate", *argv[1:]] if argv[0] == "generate" else argv)
    assert line.startswith("lmn generate: error: ") and expected in line, line


def test_unreachable_hub_fails_at_once(capsys, monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    line = one_error_line(capsys, ["generate", "--base", "nobody/no-such-model", "--prompt", "x"])
    assert time.perf_counter() - start < 5
    assert "--base nobody/no-such-model: 'nobody/no-such-model' is not a local folder or a zoo model" in line
    assert "HF_HUB_OFFLINE" in line


def test_recipe_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("op: slerp\nlayers: {3: 0.5\nalpha: [\n")
    line = one_error_line(capsys, ["recipe", str(path)])
    assert line.startswith(f"lmn recipe: error: {path}: not valid YAML (line ") and "column" in line
    assert "<unicode string>" not in line
    line = one_error_line(capsys, ["recipe", str(tmp_path / "missing.yaml")])
    assert line == f"lmn recipe: error: {tmp_path / 'missing.yaml'}: no such file"
    path.write_text("op: slerpp\nlayers: {3: 0.5}\n")
    line = one_error_line(capsys, ["recipe", str(path)])
    assert "field 'op': unknown op 'slerpp'; expected one of: delta, lerp, regmean, slerp" in line


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(LatentMergeError, match="no such file"):
        main(["recipe", str(tmp_path / "missing.yaml"), "--debug"])


def test_library_argument_names_become_flags():
    assert (
        in_flag_terms("pass allow_extrapolation=True to extrapolate")
        == "pass --allow-extrapolation to extrapolate"
    )
    assert in_flag_terms("pass on_missing='drop' to compare") == "pass --on-missing 'drop' to compare"
    assert in_flag_terms("pass resume=False to overwrite it") == "pass --fresh to overwrite it"
    assert in_flag_terms("recipe.top_p=2") == "recipe.top_p=2"  # a field of a file stays as written


def flags_of(command: str) -> set[str]:
    return option_strings(next(a for a in build_parser()._actions if a.dest == "command").choices[command])


def test_an_error_is_respelled_only_into_flags_its_command_has():
    """The error's `param` becomes the command's flag; a phrase hinting at a flag the command lacks (the
    sweep's `--fresh` in `lmn generate`) stays in the library's words rather than name a wrong flag."""
    message = "top_p=0; expected a number in (0, 1] (1 keeps every token)"
    assert in_flag_terms(message, flags_of("generate"), "top_p").startswith("--top-p 0; expected")
    assert in_flag_terms(message, flags_of("respond"), "top_p") == message  # respond has no --top-p
    assert in_flag_terms(message, flags_of("generate")) == message  # top_p is not this error's param
    resume = "pass resume=False to overwrite it"
    assert in_flag_terms(resume, flags_of("sweep")) == "pass --fresh to overwrite it"
    assert in_flag_terms(resume, flags_of("generate")) == resume
    for command in ("generate", "sweep", "respond", "judge", "judgebench-accuracy", "eval", "search"):
        flags = flags_of(command)
        for param, flag in PARAM_FLAGS.items():
            line = in_flag_terms(f"{param}=1 is bad", flags, param)
            assert (flag in flags) == line.startswith(f"{flag} 1"), (command, line)


def test_help_text_and_choices_are_those_the_package_declares():
    """`field_help`/`declared` read the source (importing it would import torch); they agree with what the
    imported classes and constants say."""
    from latent_merge_nnsight.generation.run import ENGINES
    from latent_merge_nnsight.recipe import Recipe
    from latent_merge_nnsight.systems.fit import TRUNCATE
    from latent_merge_nnsight.systems.spec import SamplingSpec, System

    for model in (Recipe, SamplingSpec, System):
        for name, field in model.model_fields.items():
            if field.description:
                assert field_help(model.__name__, name) == field.description
    assert declared("generation/run.py", "ENGINES") == ENGINES
    assert declared("systems/fit.py", "TRUNCATE") == TRUNCATE
    with pytest.raises(LookupError):
        field_help("Recipe", "no_such_field")
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    truncate = {name: next(a.choices for a in sub[name]._actions if a.dest == "truncate")
                for name in ("respond", "judgebench-accuracy")}  # fmt: skip
    assert set(truncate.values()) == {TRUNCATE}
    top_p = next(a for a in sub["generate"]._actions if a.dest == "top_p")
    assert top_p.help == SamplingSpec.model_fields["top_p"].description


def test_help_shows_defaults_and_the_split_defaults_agree():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    assert "(default: 64)" in " ".join(sub["generate"].format_help().split())  # however the lines wrap
    splits = {
        name: next(a.default for a in sub[name]._actions if a.dest == "split")
        for name in ("respond", "judgebench-accuracy")
    }
    assert set(splits.values()) == {"gpt"}
    from latent_merge_nnsight.evaluation.respond import respond

    assert inspect.signature(respond).parameters["split"].default == "gpt"


def test_zoo_train_takes_the_trainers_flags(capsys):
    """`lmn zoo train --out DIR ...` as the README writes it: the flags reach the trainer's parser."""
    with pytest.raises(SystemExit) as exc:
        main(["zoo", "train", "--out", "x", "--help"])
    assert exc.value.code == 0 and "--base-steps" in capsys.readouterr().out


def test_respond_without_network_fails_at_once(capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    line = one_error_line(capsys, ["respond", "examples/systems/toy-base.yaml", "--out", "x.jsonl"])
    assert line.startswith(
        "lmn respond: error: --split gpt is read from the hub dataset ScalerLab/JudgeBench"
    )
    assert line.endswith("give --data FILE (a local JSONL/Parquet copy)")


@pytest.mark.parametrize("flag", [["--include-path", "."], ["--limit", "3"], ["--num-fewshot", "0"]])
def test_sweep_refuses_lm_eval_flags_without_lm_eval(flag, capsys):
    """`--include-path`, `--limit` and `--num-fewshot` are read only by `--eval lm-eval:...`: with another
    `--eval` they are a one-line error naming the flag, before any model loads, not silently ignored."""
    code = main(["sweep", "--base", "toy-base", "--source", "toy-reasoner", "--layers", "2", *flag])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        code == 2
        and line == f"lmn sweep: error: {flag[0]} is for --eval lm-eval:TASK; --eval tasks does not read it"
    )
