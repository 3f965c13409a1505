"""Load on a running `lmn serve` over loopback, for the process tests and `benchmarks/soak_serve.py`.

`start_serve` runs `lmn serve` as a subprocess on a free 127.0.0.1 port and waits for ``/health``;
`run_load` sends ``clients`` x ``per_client`` requests from threads, a share of them malformed, streamed,
or hung up mid-stream, and returns what went wrong (an empty list when every good request was answered
and every malformed one got a 4xx error body). Bounded: every request has a timeout, every thread a join
deadline.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

QUESTION = [{"role": "user", "content": "What is 2+3?"}]


def lmn(*args: str) -> list[str]:
    return [sys.executable, "-m", "latent_merge_nnsight.cli", *args]


def env(**extra: str) -> dict[str, str]:
    """This process's environment without a server key, offline, one thread per process."""
    base = {k: v for k, v in os.environ.items() if k != "LMN_API_KEY"}
    return base | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"} | extra


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int:
    """Resident memory of a process (Linux ``/proc``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


@contextmanager
def start_serve(
    system: Path, *flags: str, timeout: float = 120.0, launcher: list[str] | None = None
) -> Iterator[tuple[subprocess.Popen, str]]:
    """`lmn serve SYSTEM FLAGS` on 127.0.0.1; yields (the process, its base URL ending in /v1).
    ``launcher`` runs it instead of `lmn` (its arguments then start with ``serve``: `serve_steps.py`)."""
    port = free_port()
    proc = subprocess.Popen(
        (launcher or lmn()) + ["serve", str(system), "--port", str(port), *flags],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"lmn serve did not start: {proc.stderr.read()[-2000:]}")
            time.sleep(0.2)
        yield proc, f"{url}/v1"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def greedy(url: str, model: str) -> str:
    body = {"model": model, "messages": QUESTION, "max_tokens": 16, "temperature": 0}
    return httpx.post(f"{url}/chat/completions", json=body, timeout=60).json()["choices"][0]["message"][
        "content"
    ]


def malformed(model: str) -> list[bytes]:
    return [
        b'{"model": "' + model.encode() + b'", "messages": [',
        json.dumps({"model": model, "messages": QUESTION, "max_tokens": 2**70}).encode(),
        json.dumps({"model": "nope", "messages": QUESTION}).encode(),
        json.dumps({"model": model}).encode(),
        json.dumps({"model": model, "messages": QUESTION, "seed": -1}).encode(),
    ]


def run_load(
    url: str,
    model: str,
    *,
    clients: int = 16,
    per_client: int = 30,
    malformed_every: int = 10,
    stream_every: int = 10,
    disconnect_every: int | None = None,
    max_tokens: int = 4,
    deadline_s: float = 240.0,
) -> list[str]:
    """Send the load; returns the failures. Request ``n`` is malformed when ``n % malformed_every == 3``,
    streamed when ``n % stream_every == 5``, hung up after the first bytes of its stream when
    ``n % disconnect_every == 7`` (by default only request 7)."""
    failures: list[str] = []
    bad = malformed(model)

    def worker(k: int) -> None:
        with httpx.Client(timeout=60) as session:
            for j in range(per_client):
                n = per_client * k + j
                try:
                    if n % malformed_every == 3:
                        r = session.post(
                            f"{url}/chat/completions",
                            content=bad[n % len(bad)],
                            headers={"Content-Type": "application/json"},
                        )
                        if not 400 <= r.status_code < 500 or "error" not in r.json():
                            failures.append(f"malformed {n}: {r.status_code}")
                        continue
                    content = f"Compute {n % 7}+2."
                    body = {"model": model, "messages": [{"role": "user", "content": content}],
                            "max_tokens": max_tokens, "stream": n % stream_every == 5}  # fmt: skip
                    hang_up = n == 7 if disconnect_every is None else n % disconnect_every == 7
                    if hang_up:
                        with session.stream(
                            "POST", f"{url}/chat/completions", json=body | {"stream": True}
                        ) as r:
                            next(r.iter_raw())
                        continue
                    r = session.post(f"{url}/chat/completions", json=body)
                    if r.status_code != 200 or (body["stream"] and "[DONE]" not in r.text):
                        failures.append(f"good {n}: {r.status_code} {r.text[:200]}")
                except httpx.HTTPError as exc:
                    failures.append(f"request {n}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(clients)]
    stop_at = time.monotonic() + deadline_s
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, stop_at - time.monotonic()))
    if any(t.is_alive() for t in threads):
        failures.append(f"the load did not finish within {deadline_s} s")
    return failures
