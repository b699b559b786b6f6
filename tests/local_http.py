"""A loopback HTTP server for the OpenAI-compatible clients' tests: each POSTed JSON body goes to a reply function,
whose ``(status, payload)`` is sent back (JSON, or raw bytes for error bodies)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer
from types import SimpleNamespace
from typing import Any

Reply = Callable[[dict[str, Any]], tuple[int, Any]]


@contextmanager
def json_server(reply: Reply) -> Iterator[SimpleNamespace]:
    """Serve on 127.0.0.1 (a free port) until the block ends; yields ``url`` (the ``/v1`` API base) and ``seen``
    (every request: ``{"path", "auth", "body"}``)."""
    seen: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            status, payload = reply(body)
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{server.server_address[1]}/v1", seen=seen)
    finally:
        server.shutdown()
        server.server_close()


def user_text(body: dict[str, Any]) -> str:
    """The text part of the first message of a chat-completions request."""
    return next(c["text"] for c in body["messages"][0]["content"] if c["type"] == "text")
