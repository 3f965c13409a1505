"""Helpers of the `vllm serve` tests: export the shipped toy pair (lerp on layers 2 and 3, alpha 0.5), serve
it on 127.0.0.1 (the compiled model, no --enforce-eager), stop it; the `engine="fast"` text an answer is
checked against."""

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from vllm_helpers import vllm_env

import latent_merge_nnsight as lmn
from latent_merge_nnsight.evaluation.tasks import chat_messages, make_eval_set

NEW = 12
LAYERS = [2, 3]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(proc: subprocess.Popen, url: str, log, timeout: float = 420) -> None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read()[-6000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    pytest.fail("vllm serve did not come up")


def export_toy(tmp: Path) -> Path:
    system = tmp / "system.yaml"
    system.write_text(yaml.safe_dump({
        "name": "toy-merge", "kind": "latent", "base": "toy-base", "sources": ["toy-reasoner"],
        "recipe": {"op": "lerp", "layers": LAYERS, "alpha": 0.5}, "dtype": "float32",
    }))  # fmt: skip
    export = tmp / "export"
    done = subprocess.run(
        [sys.executable, "-m", "latent_merge_nnsight.cli", "export", "vllm", str(system), str(export)],
        env=vllm_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return export


@contextmanager
def served(tmp: Path, *flags: str) -> Iterator[tuple[int, subprocess.Popen, Path]]:
    """`vllm serve` of the toy export with `flags` added, up: (its port, its process, its log file)."""
    export = export_toy(tmp)
    port = free_port()
    log_path = tmp / "serve.log"
    cmd = [
        sys.executable, "-m", "latent_merge_nnsight.vllm_engine.cli", "serve", str(export),
        "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "toy-merge", "--dtype", "float32",
        "--max-model-len", "256", "--block-size", "32", "--gpu-memory-utilization", "0.05",
        "--kv-cache-memory-bytes", str(256 * 2**20), *flags,
    ]  # fmt: skip
    env = vllm_env()
    env["VLLM_CPU_CI_ENV"] = "1"  # compiled (no --enforce-eager), with dynamo's "eager" backend
    with open(log_path, "w+") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until_up(proc, f"http://127.0.0.1:{port}/health", log)
            yield port, proc, log_path
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def question_messages() -> list[dict[str, str]]:
    return chat_messages(make_eval_set("reasoning", 1, seed=11)[0].prompt)


def fast_text(question, alpha: float) -> str:
    """The toy pair's merged greedy text (lerp on LAYERS at `alpha`) from `engine="fast"`."""
    base = lmn.load("toy-base", dtype="float32")
    ft = lmn.load("toy-reasoner", dtype="float32")
    recipe = lmn.Recipe(op="lerp", layers=dict.fromkeys(LAYERS, alpha))
    return lmn.generate(
        base, ft, [question], recipe, engine="fast", max_new_tokens=NEW, ignore_eos=True
    ).texts[0]
