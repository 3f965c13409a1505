"""A scripted OpenAI-compatible chat server on 127.0.0.1 for tests (no network beyond loopback).

``script(request_json, index)`` decides each reply and returns ``(status, body)`` or
``(status, body, headers)``; a dict body is sent as JSON, a str as-is. ``index`` counts requests from
0. Every request is recorded (path, headers, parsed body) in ``server.requests``.
"""

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Reply = tuple[int, Any] | tuple[int, Any, dict[str, str]]
Script = Callable[[dict[str, Any], int], Reply]


def completion(content: str | None, model: str = "judge") -> dict[str, Any]:
    """A minimal, valid ``chat.completion`` response body with one choice."""
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def error(status: int, message: str = "scripted error") -> tuple[int, dict[str, Any]]:
    """An OpenAI-style error body with the given status."""
    return status, {"error": {"message": message, "type": "server_error", "code": status}}


def user_text(request: dict[str, Any]) -> str:
    """The content of the last user message of a chat request."""
    return [m["content"] for m in request["messages"] if m["role"] == "user"][-1]


@dataclass(frozen=True)
class RecordedRequest:
    path: str
    headers: dict[str, str]  # names lower-cased
    body: dict[str, Any]


class LoopbackServer:
    """Context manager running a `ThreadingHTTPServer` on an ephemeral loopback port."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None, "server not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> "LoopbackServer":
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
                data = (json.dumps(body) if not isinstance(body, str) else body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(*error(404, f"no route {self.path}"))
                    return
                body = json.loads(raw)
                with owner._lock:
                    index = len(owner.requests)
                    owner.requests.append(
                        RecordedRequest(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                    )
                reply = owner.script(body, index)
                self._send(*reply)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
