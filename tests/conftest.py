import os

# beartype must be imported before nnsight: importing nnsight adds `.save()` to `object`, after which
# beartype fails at import (unhashable instancemethod in its table of slot wrappers).
import beartype  # noqa: F401
import pytest
import torch

import latent_merge_nnsight as lmn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and do not fight other jobs on a shared 2-core CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def pair():
    """The shipped toy pair (base, reasoner), loaded once per test module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield lmn.load("toy-base"), lmn.load("toy-reasoner")
    torch.set_num_threads(threads)
