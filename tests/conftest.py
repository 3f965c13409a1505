import os

# beartype must be imported before nnsight: importing nnsight adds `.save()` to `object`, after which
# beartype fails at import (unhashable instancemethod in its table of slot wrappers).
import beartype  # noqa: F401
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
