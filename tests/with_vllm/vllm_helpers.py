"""Helpers of the vLLM tests: run a driver script in a subprocess and read the JSON it writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


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
