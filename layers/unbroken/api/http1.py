"""The HTTP/1.1 server protocol the router runs under: uvicorn's h11 protocol, except that a response's status line
and headers go to the socket in one write with its first body chunk when that chunk follows in the same loop turn.

Why: uvicorn writes the head the moment the app sends `http.response.start`, and the first body chunk in a second
write. A POST stream sends its status only once its first batch is durable and has that batch in hand, so the two
writes come microseconds apart, and each wakes the reader: on loopback (the Lambda Web Adapter in front of the app,
a client on the same machine) the second wake-up and the reader's second read cost the first token about 0.3-0.6 ms
(`python -m benchmarks.first_token_trace`). One write, one wake-up.

The head is held for at most one loop turn: a response whose body is not ready at once (a GET stream waiting for
its first event) gets its head on the next turn, as before. What is held is written before the transport closes;
interim responses (`100 Continue`) are never held. Only timing changes, never bytes or their order.

Run it with `uvicorn --http unbroken.api.http1:H11Protocol` or `uvicorn.Config(app, http=H11Protocol)`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http import h11_impl

# h11 writes a response's head as one bytes object starting with its status line; a chunked body write starts with
# the chunk's size in hex, so it never looks like this. (A fixed-length body that happens to start so is held for
# the same loop turn, harmlessly.)
_HEAD = b"HTTP/1.1 "
_INTERIM = b"HTTP/1.1 1"


class _HeadWithFirstChunk:
    """A transport that holds a response head until the next write (written together) or the next loop turn."""

    __slots__ = ("_flush_handle", "_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held = b""
        self._flush_handle: asyncio.Handle | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        # Every body chunk of every stream comes through here: one truth test, and for a head two prefix tests
        # (no slicing). h11 writes bytes; anything else goes straight through.
        if self._held:
            self._transport.write(self._take_held() + data)
        elif type(data) is bytes and data.startswith(_HEAD) and not data.startswith(_INTERIM):
            self._held = data
            self._flush_handle = self._loop.call_soon(self._flush)
        else:
            self._transport.write(data)

    def _take_held(self) -> bytes:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        held, self._held = self._held, b""
        return held

    def _flush(self) -> None:
        if self._held:
            self._transport.write(self._take_held())

    def writelines(self, data: Any) -> None:
        self.write(b"".join(data))

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._take_held()
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:  # everything else is the socket transport's own
        return getattr(self._transport, name)


class H11Protocol(h11_impl.H11Protocol):
    """uvicorn's h11 protocol over a transport that writes a response's head with its first body chunk."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        wrapped: Any = _HeadWithFirstChunk(transport, self.loop)  # type: ignore[arg-type]
        super().connection_made(wrapped)
