"""Tests against vLLM 0.33's own code for Model Runner V2 (vLLM's default on GPUs), on CPU.

They run in a venv holding the vllm wheel without its CUDA dependencies (`.venv-vllm033`, built by
`.ci/run`; the README's vLLM section) with this package installed, so its entry points are the installed
ones. Nothing here runs a model: vLLM's V2 plugin loader, its front-door validator, its worker-side
builder and its model-state base class are called as vLLM calls them, with our classes.

Without vLLM importable they are not collected; with `LMN_REQUIRE_VLLM_V2=1` a missing vLLM (or one
without Model Runner V2's custom logits processors), and any skip, is a failure.
"""

import importlib.util
import json
import os
from pathlib import Path

import pytest

REQUIRED = os.environ.get("LMN_REQUIRE_VLLM_V2") == "1"
HAVE_VLLM = importlib.util.find_spec("vllm") is not None

if not HAVE_VLLM and not REQUIRED:
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="session", autouse=True)
def _vllm_v2_present():
    if not HAVE_VLLM or importlib.util.find_spec("vllm.v1.worker.gpu.sample.logits_processor") is None:
        pytest.fail(
            "LMN_REQUIRE_VLLM_V2=1 but vLLM with Model Runner V2's logits processors is not importable "
            "in this venv (see the README's vLLM section)"
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRED and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skipped under LMN_REQUIRE_VLLM_V2=1: {report.longrepr}"


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory) -> Path:
    """toy-base + toy-reasoner exported for vLLM: lerp at layers 2 and 3, alpha 0.5."""
    import latent_merge_nnsight as lmn
    from latent_merge_nnsight.vllm_engine.export import check_export, write_export
    from latent_merge_nnsight.zoo import zoo_path

    export = check_export(
        str(zoo_path("toy-base")),
        [str(zoo_path("toy-reasoner"))],
        lmn.Recipe(op="lerp", layers=[2, 3], alpha=0.5),
    )
    return write_export(export, tmp_path_factory.mktemp("v2") / "export", dtype="float32")


@pytest.fixture(scope="session")
def export_block(export_dir) -> dict:
    return json.loads((export_dir / "config.json").read_text())["latent_merge"]
