"""Running the app: `start_server` (a background thread, for tests and notebooks) and `run_serve` (`lmn
serve`, until interrupted), both on a socket bound before the models load, with the key from the
arguments or ``LMN_API_KEY`` and a warning when a public address is served without one."""

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeAlias

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.net import is_loopback
from latent_merge_nnsight.serve.app import create_app
from latent_merge_nnsight.serve.wire import ServedSystem
from latent_merge_nnsight.systems.loaded import load_system
from latent_merge_nnsight.systems.spec import System

# uvicorn (the `eval` extra) is imported inside functions: the package works without it.

__all__ = ["run_serve", "start_server"]

logger = logging.getLogger(__name__)

AppOption: TypeAlias = int | float | str | bool | None
"""One of `create_app`'s keyword arguments (limits, the API key, ``openai_finish_reasons``)."""
SystemLike: TypeAlias = str | Path | System | ServedSystem
"""What can be served: a system YAML's path, a `System`, or a loaded one."""

API_KEY_ENV = "LMN_API_KEY"


def _as_system(system: SystemLike) -> ServedSystem:
    if isinstance(system, str | Path | System):
        return load_system(system)
    return system


def _warn_if_public(host: str, api_key: str | None) -> None:
    """A warning when a non-loopback address (IPv4 or IPv6, ``::`` included) is served without a key."""
    if api_key is None and not is_loopback(host):
        logger.warning(
            "serving on %s without authentication: anyone who can reach it can use the model; "
            "set --api-key (or LMN_API_KEY) to require 'Authorization: Bearer <key>'",
            host,
        )


def _url(host: str, port: int) -> str:
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


def _resolve_key(app_kwargs: dict[str, AppOption]) -> dict[str, AppOption]:
    """``api_key`` from the arguments, else from ``LMN_API_KEY`` (never logged)."""
    if app_kwargs.get("api_key") is None and os.environ.get(API_KEY_ENV):
        app_kwargs = {**app_kwargs, "api_key": os.environ[API_KEY_ENV]}
    return app_kwargs


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port), or a `LatentMergeError` naming them."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise LatentMergeError(f"port={port!r} is not a TCP port; expected 0 <= port <= 65535 (0: any free)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise LatentMergeError(f"cannot listen on host={host!r} port={port}: {exc.strerror or exc}") from None
    return sock


def start_server(
    system: SystemLike,
    port: int = 0,
    host: str = "127.0.0.1",
    *,
    timeout: float = 30.0,
    **app_kwargs: AppOption,
) -> tuple[str, Callable[[], None]]:
    """Serve ``system`` from a background thread; returns (base URL ending in ``/v1``, stop function).

    ``port=0`` picks a free port. ``app_kwargs`` go to `create_app`. For tests and notebooks.
    """
    import uvicorn

    app_kwargs = _resolve_key(app_kwargs)
    sock = _bind(host, port)
    _warn_if_public(host, app_kwargs.get("api_key"))
    try:
        app = create_app(_as_system(system), **app_kwargs)
    except BaseException:
        sock.close()
        raise
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="lmn-serve")
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"the server did not start within {timeout} s")
        time.sleep(0.01)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()

    return _url(host, sock.getsockname()[1]), stop


def run_serve(system: SystemLike, host: str = "127.0.0.1", port: int = 8000, **app_kwargs: AppOption) -> None:
    """Serve ``system`` (a YAML path, `System` or `LoadedSystem`) until interrupted (`lmn serve`).

    The address is bound before the models load, so a bad or busy port fails at once.
    """
    import uvicorn

    app_kwargs = _resolve_key(app_kwargs)
    sock = _bind(host, port)
    try:
        _warn_if_public(host, app_kwargs.get("api_key"))
        loaded = _as_system(system)
        app = create_app(loaded, **app_kwargs)
        logger.warning("serving %r at %s", loaded.name, _url(host, sock.getsockname()[1]))
        uvicorn.Server(uvicorn.Config(app, log_level="info", lifespan="on")).run(sockets=[sock])
    finally:
        sock.close()
