"""nnsight mounts `.save` on `object`; anyio (httpx, starlette, openai) must still import and run after it.

Each case runs in a fresh interpreter, so neither pytest's anyio plugin nor this process's earlier imports
can decide the order.
"""

import subprocess
import sys

import pytest

_RUN_ANYIO = """
import anyio, anyio.streams.tls, anyio.streams.file
from anyio import TypedAttributeSet, typed_attribute

class Annotated(TypedAttributeSet):
    size: int = typed_attribute()

try:
    class NotAnnotated(TypedAttributeSet):
        size = typed_attribute()
except TypeError as e:
    assert "'size' is missing its type annotation" in str(e), e
else:
    raise SystemExit("anyio's own check was switched off")

async def main():
    return 41 + 1

assert anyio.run(main) == 42
assert "save" in vars(object), "nnsight's .save mount was lost"
print("ok")
"""


@pytest.mark.parametrize(
    "imports",
    [
        "import nnsight; import latent_merge_nnsight",  # the user imported nnsight first
        "import latent_merge_nnsight; latent_merge_nnsight.load('toy-base')",  # nnsight comes in with a model
        "import latent_merge_nnsight; import nnsight; import httpx, starlette.applications",
        "import latent_merge_nnsight, latent_merge_nnsight; import nnsight",  # idempotent
    ],
)
def test_anyio_works_after_nnsight_in_any_import_order(imports: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", imports + "\n" + _RUN_ANYIO], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_without_the_guard_anyio_fails_after_nnsight() -> None:
    """The failure the guard exists for is real in this environment (so the test above can fail)."""
    out = subprocess.run(
        [sys.executable, "-c", "import nnsight\n" + _RUN_ANYIO], capture_output=True, text=True, timeout=120
    )
    assert out.returncode != 0 and "missing its type annotation" in out.stderr
