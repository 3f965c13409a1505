"""Shared fixtures of `pytest benchmarks/`: model pairs, prompts, and a report of every measured number.

The numbers each benchmark measures go to `report`; at the end of the session they are printed in the
terminal summary (no `-s` needed) and written as JSON with the machine, library versions and date: to
`geometry.json` in the temp folder, to `--results PATH`, or, with `--update-results`, to the committed
record `benchmarks/results/geometry.json`.
"""

import datetime
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

import latent_merge_nnsight as lmn
from latent_merge_nnsight.evaluation.tasks import CATEGORIES, chat_messages, make_eval_set
from latent_merge_nnsight.zoo import zoo_path
from latent_merge_nnsight.zoo.tokenizer import build_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results" / "geometry.json"
"""The committed record: rewritten only by `pytest benchmarks --update-results`."""
TMP_RESULTS = Path(tempfile.gettempdir()) / "lmn-benchmarks" / "geometry.json"


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("benchmarks")
    group.addoption(
        "--results", default=None, help="JSON file for the benchmark numbers (default: temp folder)"
    )
    group.addoption(
        "--update-results", action="store_true", help=f"write the numbers to the committed {RESULTS.name}"
    )


def results_path(config: Any) -> Path:
    """Where this session's numbers go: --results, the committed record (--update-results), or temp."""
    if config.getoption("--results"):
        return Path(config.getoption("--results"))
    return RESULTS if config.getoption("--update-results") else TMP_RESULTS


THREADS = min(2, os.cpu_count() or 1)

_REPORT: dict[str, Any] = {}


@pytest.fixture(scope="session", autouse=True)
def _threads():
    """One torch thread for the small-model work (fastest, and fair to other jobs on a shared CPU); the
    large-matrix timings use `THREADS` (see `metric_threads`)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def metric_threads():
    """`THREADS` torch threads for the duration of one test."""
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield THREADS
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def report() -> dict[str, Any]:
    """Add `report[name] = {...}`: printed at the end and saved to benchmarks/results/geometry.json."""
    return _REPORT


def pytest_terminal_summary(terminalreporter: Any, config: Any) -> None:
    if not _REPORT:
        return
    terminalreporter.section("benchmark numbers")
    for name, values in _REPORT.items():
        terminalreporter.write_line(f"{name}:")
        for line in json.dumps(values, indent=2).splitlines()[1:-1]:
            terminalreporter.write_line("  " + line)
    payload = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": THREADS,
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "latent_merge_nnsight": lmn.__version__,
        },
        "results": _REPORT,
    }
    path = results_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    terminalreporter.write_line(f"written to {path}")


# ------------------------------------------------------------------------------------------ model pairs


def random_pair(n_layers: int = 6, hidden: int = 64, noise: float = 1.0, seed: int = 0) -> tuple[Any, Any]:
    """A random-init Qwen2 base and an "FT" = base + Gaussian noise of `noise` times each tensor's std.

    With noise 1.0 the pair is about as far apart as the paper's (CKA(base, FT) ~0.85 per layer).
    """
    tok = build_tokenizer()
    config = transformers.Qwen2Config(
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        max_position_embeddings=256,
    )
    torch.manual_seed(seed)
    base = transformers.Qwen2ForCausalLM(config).eval()
    ft = transformers.Qwen2ForCausalLM(config).eval()
    ft.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in ft.parameters():
            if p.numel() > 1:
                p.add_(noise * p.std() * torch.randn_like(p))
    return lmn.wrap(base, tok, name="random-base"), lmn.wrap(ft, build_tokenizer(), name="random-ft")


def task_prompts(n_per_category: int = 6) -> list[list[dict[str, str]]]:
    """Held-out toy-task questions of every category, as chats."""
    return [chat_messages(ex.prompt) for c in CATEGORIES for ex in make_eval_set(c, n_per_category, seed=0)]


def toy_available() -> bool:
    return all((zoo_path(name) / "model.safetensors").exists() for name in ("toy-base", "toy-reasoner"))


@pytest.fixture(scope="session")
def random_models() -> tuple[Any, Any]:
    return random_pair()


@pytest.fixture(scope="session")
def toy_prompts() -> list[list[dict[str, str]]]:
    return task_prompts(6)


@pytest.fixture(scope="session")
def toy_models() -> tuple[Any, Any]:
    assert toy_available(), "the shipped toy checkpoints (zoo/toy-base, zoo/toy-reasoner) are missing"
    return lmn.load("toy-base", dtype="float32"), lmn.load("toy-reasoner", dtype="float32")
