"""Small edges of the command line a new user meets: each default shown once in --help, `lmn generate
--site`, `--threads` (1 on CPU by default), `lmn zoo train --no-progress` printing no bars."""

import argparse
import subprocess

import torch
from serve_load import env, lmn

import latent_merge_nnsight as lmn_api
from latent_merge_nnsight.cli import build_parser, main
from latent_merge_nnsight.cli.common import Help


def subparsers() -> dict[str, argparse.ArgumentParser]:
    return next(a for a in build_parser()._actions if a.dest == "command").choices


def test_help_shows_each_default_once():
    formatter = Help(prog="lmn")
    for name, parser in subparsers().items():
        for action in parser._actions:
            text = formatter._get_help_string(action) or ""
            assert text.count("default:") <= 1, f"lmn {name} {action.option_strings}: {text!r}"
    judge = subparsers()["judge"].format_help()
    assert "(default: OpenAI)" in " ".join(judge.split()) and "(default: None)" not in judge


def test_generate_site_post_merges_at_the_blocks_output():
    flags = [
        "--base",
        "toy-base",
        "--source",
        "toy-reasoner",
        "--layer",
        "5",
        "--op",
        "lerp",
        "--alpha",
        "0.9",
    ]
    prompt = "Kai has 68 pens, gets 40, gets 39. How many now?"
    command = lmn("generate", *flags, "--site", "post", "--prompt", prompt, "--max-new-tokens", "24")
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env())
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout.split("\n", 1)[1].rsplit("\n[", 1)[0]
    base, ft = lmn_api.load("toy-base"), lmn_api.load("toy-reasoner")
    post = lmn_api.generate(base, ft, [prompt], lmn_api.Recipe(op="lerp", site="post", layers={5: 0.9}),
                            max_new_tokens=24)  # fmt: skip
    pre = lmn_api.generate(base, ft, [prompt], lmn_api.Recipe(op="lerp", layers={5: 0.9}), max_new_tokens=24)
    assert text == post.texts[0] and post.texts != pre.texts  # the site changed the answer


def test_threads_default_to_one_on_cpu_and_follow_the_flag(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("op: lerp\nlayers: {3: 0.5}\n")
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(["recipe", str(recipe), "--threads", "3"]) == 0 and torch.get_num_threads() == 3
        assert main(["recipe", str(recipe)]) == 0
        assert torch.get_num_threads() == (2 if torch.cuda.is_available() else 1)
    finally:
        torch.set_num_threads(old)


def test_zoo_train_no_progress_prints_no_bars(tmp_path):
    args = ["--out", str(tmp_path), "--base-steps", "1", "--ft-steps", "1", "--eval-n", "0", "--fp32"]
    out = subprocess.run(lmn("zoo", "train", *args, "--no-progress"), capture_output=True, text=True,
                         timeout=600, env=env())  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "%|" not in out.stderr and "it/s" not in out.stderr, out.stderr[-2000:]
    assert (tmp_path / "toy-reasoner" / "config.json").is_file()
