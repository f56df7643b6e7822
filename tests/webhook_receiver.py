"""A real webhook receiver for tests: an HTTP server on loopback that records every request
(path, headers, body) and answers each path from a script of status codes."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    def __init__(self, script: dict[str, list[int]] | None = None) -> None:
        """`script[path]`: the status of each request to `path` in turn (the last repeats);
        paths not in it answer 200. A 3xx answers with Location: /redirected."""
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.received: list[Received] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                status = receiver._answer(self.path, dict(self.headers.items()), body)
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", "/redirected")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _answer(self, path: str, headers: dict[str, str], body: bytes) -> int:
        with self._lock:
            self.received.append(Received(path, {k.lower(): v for k, v in headers.items()}, body))
            codes = self.script.get(path)
            if not codes:
                return 200
            return codes.pop(0) if len(codes) > 1 else codes[0]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_port}{path}"

    def at(self, path: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.path == path]

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
