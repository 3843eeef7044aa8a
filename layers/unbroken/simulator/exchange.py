"""One HTTP request/response on a connection, written through h11: each h11 event leaves in a single socket write,
and `abort` drops the connection on purpose (a FIN, or a TCP reset) for the faults that cut a stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
from collections.abc import Sequence
from typing import Any

import h11


class ConnectionAborted(Exception):
    """Raised inside a response after the server dropped the connection on purpose (cut, reset, stall end)."""


class Exchange:
    """One request/response on a connection: writes h11 events, each in a single socket write."""

    def __init__(self, conn: h11.Connection, writer: asyncio.StreamWriter, request_id: str) -> None:
        self.conn = conn
        self.writer = writer
        self.request_id = request_id
        self.keep_alive = True
        self.aborted = False

    async def _send(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def start(self, status: int, headers: Sequence[tuple[str, str]]) -> None:
        all_headers = [*headers, ("x-request-id", self.request_id), ("server", "unbroken-simulated")]
        await self._send(h11.Response(status_code=status, headers=[(k.encode(), v.encode()) for k, v in all_headers]))

    async def data(self, payload: bytes) -> None:
        await self._send(h11.Data(data=payload))

    async def end(self) -> None:
        await self._send(h11.EndOfMessage())

    async def json(self, status: int, obj: Any, headers: Sequence[tuple[str, str]] = ()) -> None:
        payload = json.dumps(obj).encode()
        await self.start(status, [("content-type", "application/json"), ("content-length", str(len(payload))),
                                  *headers])
        await self.data(payload)
        await self.end()

    def abort(self, *, reset: bool = False) -> None:
        """Drop the connection now. `reset` makes the kernel send a TCP RST (SO_LINGER 0) instead of a FIN."""
        self.aborted = True
        self.keep_alive = False
        transport = self.writer.transport
        if reset:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
