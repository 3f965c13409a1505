"""The README's Python examples run as written (on the shipped toy pair), in one real script file
(nnsight reads trace bodies from their source file, so they cannot be exec'd from a string)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(vllm: bool = False) -> list[str]:
    """The README's Python blocks: those that run in this venv, or (`vllm=True`) the vLLM ones, which
    run in the vLLM venv (tests/with_vllm/test_readme_vllm.py)."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    return [b for b in blocks if ("from vllm import" in b) == vllm]


def test_readme_has_examples_and_the_two_commands_first():
    text = (ROOT / "README.md").read_text()
    first = text.split("```bash\n", 1)[1].split("```", 1)[0]
    assert "pip install torch==2.13.0" in first and "lmn demo" in first and "pytest" in first
    assert len(python_blocks()) >= 3


def test_readme_python_examples_run(tmp_path):
    script = tmp_path / "readme_examples.py"
    script.write_text("\n\n".join(python_blocks()))
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Capture(model='toy-reasoner'" in out.stdout
    assert "['Answer: 123', 'Answer: cxjpk', 'Answer: 139']" in out.stdout  # the printed output it shows
