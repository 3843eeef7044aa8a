"""A response's status and headers reach the socket in one write with its first body chunk (api/http1.py): a
journaled POST stream's status, headers and first durable batch (the first text delta in it), an unjournaled
stream's status and first frames, a JSON answer's head and body. One write wakes the reader once: on loopback (the
Lambda Web Adapter, a client on the machine) a second write costs the first token a second wake-up.

A real router (uvicorn on 127.0.0.1, the router's own protocol) whose socket transports record each write; the same
router under uvicorn's stock h11 protocol shows what the test tells apart (the head written alone)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
from uvicorn.protocols.http import h11_impl

from tests.support.client import post_json, post_stream
from tests.support.server import RouterThread, base_config, sim_model
from unbroken.api import http1
from unbroken.journal.sqlite import SQLiteStore

DELTA = b"response.output_text.delta"


class _RecordingTransport:
    """A socket transport that notes each write before it makes it."""

    def __init__(self, transport: Any, writes: list[bytes], lock: threading.Lock) -> None:
        self._transport, self._writes, self._lock = transport, writes, lock

    def write(self, data: bytes) -> None:
        with self._lock:
            self._writes.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _Recorder:
    """Every write that reaches a socket transport, per connection, in order."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.connections: list[list[bytes]] = []

    def wrap(self, transport: Any) -> Any:
        writes: list[bytes] = []
        with self.lock:
            self.connections.append(writes)
        return _RecordingTransport(transport, writes, self.lock)

    def firsts(self) -> list[bytes]:
        """The first write of each connection that carried an answer (one request per connection here)."""
        with self.lock:
            return [next(w for w in c if w) for c in self.connections if any(c)]


def _protocol(base: type[h11_impl.H11Protocol], recorder: _Recorder) -> type[asyncio.Protocol]:
    class Recorded(base):  # type: ignore[valid-type, misc]
        def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
            super().connection_made(recorder.wrap(transport))

    return Recorded


def _router(tmp_path: Path, base: type[h11_impl.H11Protocol], recorder: _Recorder) -> RouterThread:
    return RouterThread(base_config(sim_model(deployments=1, length=8)), SQLiteStore(tmp_path / "r.db"),
                        http=_protocol(base, recorder))


@pytest.mark.parametrize("store", [True, False], ids=["journaled", "unjournaled"])
def test_a_streams_status_goes_out_with_its_first_frames(tmp_path: Path, store: bool) -> None:
    recorder = _Recorder()
    with _router(tmp_path, http1.H11Protocol, recorder) as router:
        response, stream = post_stream(router.base_url, {"model": "demo", "input": "hi", "store": store})
        assert response.status_code == 200 and stream.terminal["type"] == "response.completed"
    [first] = recorder.firsts()
    assert first.startswith(b"HTTP/1.1 200 ") and b"text/event-stream" in first
    assert b"response.created" in first  # the head and the first frames: one write
    if store:
        # The first durable batch is in hand when the status goes: it holds the first text delta.
        assert DELTA in first


def test_a_json_answer_is_one_write(tmp_path: Path) -> None:
    recorder = _Recorder()
    with _router(tmp_path, http1.H11Protocol, recorder) as router:
        answer = post_json(router.base_url, "/responses", {"model": "demo", "input": "hi"})
        assert answer.status_code == 200
        missing = post_json(router.base_url, "/responses", {"model": "nope", "input": "hi"})
        assert missing.status_code == 404
    writes = recorder.firsts()
    assert len(writes) == 2
    for write, status in zip(writes, (b"200", b"404"), strict=True):
        head, _, body = write.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 " + status) and body.startswith(b"{")


def test_under_the_stock_protocol_the_head_goes_alone(tmp_path: Path) -> None:
    """What the tests above tell apart: uvicorn's own h11 protocol writes the status and headers by themselves."""
    recorder = _Recorder()
    with _router(tmp_path, h11_impl.H11Protocol, recorder) as router:
        response, _ = post_stream(router.base_url, {"model": "demo", "input": "hi"})
        assert response.status_code == 200
    [first] = recorder.firsts()
    assert first.startswith(b"HTTP/1.1 200 ") and first.endswith(b"\r\n\r\n") and DELTA not in first
