"""Every hint names something the user can type where they are: a flag a CLI error suggests is a flag of
that command, and running with it gets past the error; `lmn --debug CMD` shows the traceback; a vLLM
request is told the key it can carry, not a Python keyword."""

import re
import subprocess

import pytest
from serve_load import env, lmn

import latent_merge_nnsight as lmn_api
from latent_merge_nnsight.cli import build_parser
from latent_merge_nnsight.errors import LatentMergeError

TOY = ["--base", "toy-base", "--source", "toy-reasoner"]


def flags_of(command: str) -> set[str]:
    """The option strings `lmn COMMAND` accepts (from its parser)."""
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {s for action in sub.choices[command]._actions for s in action.option_strings}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(lmn(*args), capture_output=True, text=True, timeout=300, env=env())


def hinted_flags(command: str, out: subprocess.CompletedProcess) -> set[str]:
    """The flags the one-line error of `lmn COMMAND` suggests, each checked to be one of its flags."""
    assert out.returncode == 2, out.stderr[-2000:]
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith(f"lmn {command}: error: ") and "Traceback" not in out.stderr
    hinted = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", line))
    assert hinted <= flags_of(command), f"{line!r} names flags `lmn {command}` lacks"
    return hinted


@pytest.mark.parametrize(
    ("command", "args", "hint"),
    [
        ("sweep", [*TOY, "--layers", "5", "--ops", "lerp", "--alphas", "2"], "--allow-extrapolation"),
        ("generate", [*TOY, "--layer", "5", "--op", "lerp", "--alpha", "2"], "--allow-extrapolation"),
    ],
)
def test_each_hinted_flag_exists_and_gets_past_the_error(tmp_path, command, args, hint):
    small = ["--n-per-category", "1", "--out", str(tmp_path / "s"), "--no-progress"]
    small = small if command == "sweep" else []
    prompt = ["--prompt", "2+2=", "--max-new-tokens", "2"] if command == "generate" else []
    refused = run(command, *args, *small, *prompt)
    assert hint in hinted_flags(command, refused)
    accepted = run(command, *args, *small, *prompt, hint)
    assert accepted.returncode == 0, accepted.stderr[-2000:]
    if command == "sweep":
        rows = (tmp_path / "s" / "results.csv").read_text()
        assert "latent,lerp,5,2.0,reasoning,accuracy," in rows  # the extrapolated cell ran


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_before_or_after_the_command_shows_the_traceback(tmp_path, where):
    missing = str(tmp_path / "missing.yaml")
    args = ["--debug", "recipe", missing] if where == "before" else ["recipe", missing, "--debug"]
    out = run(*args)
    assert out.returncode != 0 and "Traceback (most recent call last)" in out.stderr, out.stderr[-2000:]
    plain = run("recipe", missing)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr


def test_a_vllm_request_is_told_the_key_it_can_send():
    from latent_merge_nnsight.vllm_engine.export import check_export
    from latent_merge_nnsight.vllm_engine.requests import parse_request

    export = check_export("toy-base", ["toy-reasoner"], lmn_api.Recipe(op="lerp", layers=[3], alpha=0.5))
    with pytest.raises(LatentMergeError) as refused:
        parse_request({"alpha": 1.5}, export)
    message = str(refused.value)
    assert "allow_extrapolation=True" not in message
    assert '"allow_extrapolation": true' in message and "latent_merge" in message
    # ... and sending that key is accepted
    assert parse_request({"alpha": 1.5, "allow_extrapolation": True}, export).alphas == ((3, 1.5),)
