"""A small kept-alive HTTP/1.1 client pool for one origin: h11 (the state machine httpcore itself uses) over asyncio
streams. Only what the DynamoDB store needs: one request with a whole body in, one status + headers + whole body out.

- Connections are opened with `asyncio.open_connection`, TLS by `ssl.create_default_context()` (certificate and
  hostname checked, SNI sent) for https, under the connect timeout.
- At most `max_connections` requests are in flight, so at most that many connections are open; an idle connection
  is reused last-in first-out and dropped once idle for `keepalive_expiry` seconds or seen closed by its peer.
- A connection goes back to the pool only when h11 says both sides finished the exchange cleanly and may start
  another (`our_state` and `their_state` DONE: not after `Connection: close`, a body cut short, an HTTP/1.0 peer);
  on any error, timeout or cancellation it is closed.
- The exchange (send, then read the whole answer) runs under the read timeout.
- A pool belongs to the event loop it was first used on.

No retries here: a failed request raises `HTTPFailure` and the caller decides (the store's `_call`).
"""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from collections.abc import Sequence

import certifi
import h11

_READ_CHUNK = 65536


class HTTPFailure(Exception):
    """No usable answer: connect, TLS, send or read failure, timeout, or an answer h11 rejects. The request may have
    reached the server."""


class _Connection:
    __slots__ = ("h11", "idle_since", "reader", "tls", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tls: bool) -> None:
        self.reader = reader
        self.writer = writer
        self.tls = tls
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0

    def usable(self) -> bool:
        """Still open as far as we can tell without a read: the peer has not closed it, and sent nothing unasked (a
        server may write a 408 on an idle connection before closing it: that must not be read as the next answer)."""
        unread = getattr(self.reader, "_buffer", b"")  # StreamReader's buffer, private but there since 3.4
        return not self.writer.transport.is_closing() and not self.reader.at_eof() and not unread

    def close(self) -> None:
        # Not awaited: callers may be cancelled, and nothing is owed to a peer we are dropping.
        transport = self.writer.transport
        if transport.is_closing():
            return
        if self.tls:
            transport.abort()  # no TLS close_notify round trip for a connection given up on
        else:
            transport.close()


class Response:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers  # names lower-cased; a repeated header keeps its last value
        self.body = body


class Pool:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: bool,
        max_connections: int = 32,
        keepalive_expiry: float = 20.0,
        connect_timeout: float = 3.0,
        read_timeout: float = 10.0,
    ) -> None:
        self.host = host
        self.port = port
        self._tls = tls
        self._ssl: ssl.SSLContext | None = None
        self._keepalive_expiry = keepalive_expiry
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._slots = asyncio.Semaphore(max(1, max_connections))
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._closed = False

    async def _connect(self) -> _Connection:
        if self._tls and self._ssl is None:
            # The CA bundle botocore would use (AWS_CA_BUNDLE), else certifi's (httpx's own): not the system store,
            # which a slim Lambda container image may lack. Loaded once per pool.
            self._ssl = ssl.create_default_context(cafile=os.environ.get("AWS_CA_BUNDLE") or certifi.where())
        try:
            async with asyncio.timeout(self._connect_timeout):
                reader, writer = await asyncio.open_connection(
                    self.host,
                    self.port,
                    ssl=self._ssl if self._tls else None,
                    server_hostname=self.host if self._tls else None,
                    limit=_READ_CHUNK,
                )
        except TimeoutError:
            raise HTTPFailure(f"connect to {self.host}:{self.port} timed out after {self._connect_timeout} s") from None
        except OSError as exc:  # refused, unreachable, DNS (socket.gaierror), TLS (ssl.SSLError)
            raise HTTPFailure(f"connect to {self.host}:{self.port}: {type(exc).__name__}: {exc}") from exc
        conn = _Connection(reader, writer, self._tls)
        self._open.add(conn)
        return conn

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if now - conn.idle_since < self._keepalive_expiry and conn.usable():
                return conn
            self._discard(conn)
        return None

    def _discard(self, conn: _Connection) -> None:
        self._open.discard(conn)
        conn.close()

    async def request(
        self, method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]], body: bytes
    ) -> Response:
        """Send one request (`headers` must hold Host; Content-Length is added) and read its whole answer."""
        if self._closed:
            raise HTTPFailure("pool is closed")
        async with self._slots:
            conn = self._take_idle() or await self._connect()
            try:
                async with asyncio.timeout(self._read_timeout):
                    response = await self._exchange(conn, method, target, headers, body)
            except BaseException as exc:
                self._discard(conn)
                if isinstance(exc, TimeoutError):
                    raise HTTPFailure(f"no complete answer within {self._read_timeout} s") from None
                if isinstance(exc, OSError | h11.ProtocolError | EOFError):
                    raise HTTPFailure(f"{type(exc).__name__}: {exc}") from exc
                raise
            if (
                not self._closed
                and conn.h11.our_state is h11.DONE
                and conn.h11.their_state is h11.DONE
                and not conn.h11.trailing_data[0]
                and conn.usable()
            ):
                conn.h11.start_next_cycle()
                conn.idle_since = time.monotonic()
                self._idle.append(conn)
            else:
                self._discard(conn)  # Connection: close, HTTP/1.0, or closed while we waited
            return response

    @staticmethod
    async def _exchange(
        conn: _Connection, method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]], body: bytes
    ) -> Response:
        machine = conn.h11
        head = machine.send(
            h11.Request(method=method, target=target, headers=[*headers, (b"content-length", b"%d" % len(body))])
        )
        data = machine.send(h11.Data(data=body)) if body else b""
        end = machine.send(h11.EndOfMessage())
        conn.writer.write(b"".join((head or b"", data or b"", end or b"")))
        await conn.writer.drain()
        status = 0
        answer: dict[str, str] = {}
        chunks: list[bytes] = []
        while True:
            event = machine.next_event()
            if event is h11.NEED_DATA:
                received = await conn.reader.read(_READ_CHUNK)
                machine.receive_data(received)  # b"" is the peer's EOF: h11 then raises or ends the body
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                answer = {name.decode("latin-1"): value.decode("latin-1") for name, value in event.headers}
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return Response(status, answer, b"".join(chunks))
            elif isinstance(event, h11.ConnectionClosed):
                raise EOFError("connection closed before a complete answer")
            # h11.InformationalResponse (100 Continue and the like): skipped

    async def aclose(self) -> None:
        """Close every connection of the pool; requests in flight fail, later ones raise `HTTPFailure`."""
        self._closed = True
        conns, self._idle = list(self._open), []
        self._open.clear()
        for conn in conns:
            conn.close()
        for conn in conns:
            try:
                async with asyncio.timeout(1.0):
                    await conn.writer.wait_closed()
            except (OSError, TimeoutError):
                pass
