"""The README's vLLM example runs as written: its export command, then its Python block as a script (in
this venv, with vLLM's default multiprocessing, and the README's own settings), printing the texts of the
fast engine for the same alphas."""

import ast
import re
import subprocess
import sys

from vllm_helpers import ROOT, vllm_env

import latent_merge_nnsight as lmn


def readme_vllm_example() -> tuple[str, str]:
    """The README's `lmn export vllm ...` command and its Python block that imports vLLM."""
    text = (ROOT / "README.md").read_text()
    bash = "".join(re.findall(r"```bash\n(.*?)```", text, flags=re.S))
    command = re.search(r"^lmn export vllm .*?$", bash, flags=re.M).group(0).split("#")[0].split()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "from vllm import" in b]
    assert len(blocks) == 1, "the README has one vLLM Python example"
    return command, blocks[0]


def test_the_readmes_vllm_example_runs_as_written(tmp_path):
    command, block = readme_vllm_example()
    (tmp_path / "examples").symlink_to(ROOT / "examples")  # the README's paths, relative to the repo
    env = vllm_env()
    export = subprocess.run([sys.executable, "-m", "latent_merge_nnsight.cli", *command[1:]], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert export.returncode == 0, export.stderr[-3000:]
    (tmp_path / "example.py").write_text(block)
    out = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=1200)  # fmt: skip
    assert out.returncode == 0, out.stderr[-6000:]
    printed = [line for line in out.stdout.splitlines() if line.startswith(("['", '["'))]  # vLLM logs too
    texts = ast.literal_eval(printed[-1])
    base, ft = lmn.load("toy-base", dtype="float32"), lmn.load("toy-reasoner", dtype="float32")
    prompts = ["What is 75+48?", "Write 'kpjxc' backwards."]
    assert prompts[0] in block and prompts[1] in block and "[0.0, 0.5]" in block
    alone = lmn.generate(base, None, prompts[:1], None, engine="fast", max_new_tokens=16, chat=False)
    merged = lmn.generate(base, ft, prompts[1:], lmn.Recipe(op="slerp", layers={3: 0.5}), engine="fast",
                          max_new_tokens=16, chat=False)  # fmt: skip
    assert texts == [alone.texts[0], merged.texts[0]]
