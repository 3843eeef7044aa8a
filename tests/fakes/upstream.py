"""A real HTTP server on 127.0.0.1 that plays scripted upstream responses, for every provider's fake.

Each provider's fake (tests/fakes/<provider>.py) turns a fixture or a scenario into a `Script`: the status, the
headers and the body chunks to write, plus transport faults (a TCP reset after N chunks, a stall after N chunks).
Provider-level faults (an in-band error frame, a malformed chunk, a missing terminator) are just chunks the fake
puts in, or leaves out, of the script. The server records every request it received for assertions.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# Upper bound on how long a stalled response holds its connection (the server's stop releases it earlier).
STALL_LIMIT_SECONDS = 30.0


@dataclass
class Script:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)
    reset_after: int | None = None  # send this many chunks, then a TCP RST
    stall_after: int | None = None  # send this many chunks, then hold the connection open, silent
    close_after: bool = False  # close the connection once the body is written, as an idle timeout would


@dataclass
class ReceivedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


Handler = Callable[[ReceivedRequest], Script]


class FakeUpstream:
    """`with FakeUpstream(handler) as fake:` serves on `fake.base_url` until the block ends."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[ReceivedRequest] = []
        self.connections = 0  # TCP connections accepted (a client that keeps its connection alive opens one)
        self._count_lock = threading.Lock()
        self._stop = threading.Event()
        outer = self

        class _RequestHandler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with outer._count_lock:
                    outer.connections += 1

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                req = ReceivedRequest(self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                                      body)
                outer.requests.append(req)
                script = outer.handler(req)
                self.send_response(script.status)
                for k, v in script.headers.items():
                    self.send_header(k, v)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for i, chunk in enumerate(script.chunks):
                    if script.reset_after is not None and i >= script.reset_after:
                        self._reset()
                        return
                    if script.stall_after is not None and i >= script.stall_after:
                        outer._stop.wait(STALL_LIMIT_SECONDS)
                        self._reset()
                        return
                    if chunk:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        self.wfile.flush()
                if script.reset_after is not None and script.reset_after >= len(script.chunks):
                    self._reset()
                    return
                if script.stall_after is not None and script.stall_after >= len(script.chunks):
                    outer._stop.wait(STALL_LIMIT_SECONDS)
                    self._reset()
                    return
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
                if script.close_after:  # no `Connection: close`: the client finds out when it next uses it
                    self.close_connection = True

            def _reset(self) -> None:
                # SO_LINGER 0 makes close() send RST: the client sees a connection reset, not a clean EOF.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

            do_POST = _serve
            do_GET = _serve

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _RequestHandler)
        self._server.daemon_threads = True
        # A short poll interval: shutdown() waits for it, and every test stops a fake.
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def sse(data: Any, event: str | None = None) -> bytes:
    """One SSE frame: optional `event:` line and a `data:` line with `data` as JSON (or as-is if a str)."""
    payload = data if isinstance(data, str) else json.dumps(data)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()
