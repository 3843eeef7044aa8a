"""The HTTP server: h11 on top of `asyncio.start_server`, on a socket of its own (so a shared instance can release it
after its event loop has gone), keep-alive and pipelining, a client that leaves cancelling its answer at once.
It serves `POST /v1/chat/completions` (`completions.py`) and `GET /v1/models`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import socket
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Any

import h11

from unbroken.simulator.completions import answer, validate_body
from unbroken.simulator.controls import HOLD_LIMIT_SECONDS, Controls
from unbroken.simulator.conversation import prefix_keys
from unbroken.simulator.errors import ApiError
from unbroken.simulator.exchange import ConnectionAborted, Exchange
from unbroken.simulator.faults import AttemptLog, Fault
from unbroken.simulator.thread import SimulatedUpstreamThread

log = logging.getLogger("unbroken.simulated")

# How long an idle keep-alive connection waits for its next request (httpx's own pool expiry is shorter).
KEEPALIVE_IDLE_SECONDS = 120.0
MAX_BODY_BYTES = 32 * 1024 * 1024
MAX_CACHED_PREFIXES = 10_000


class SimulatedUpstream:
    """An OpenAI Chat Completions server on `host` (loopback): `await start()`, use `base_url`, `await close()`.

    `received` keeps the most recent request bodies (bounded) for assertions; `attempts(key)` tells how many
    requests carried a given `sim_request` key; `connections_accepted` counts TCP connections (keep-alive checks)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, models: Sequence[str] = ("simulated",)) -> None:
        self.host = host
        self.port = port
        self.models = tuple(models)
        self.received: deque[dict[str, Any]] = deque(maxlen=256)
        # Controls applied over every request's `sim_*` metadata (a benchmark degrades a running upstream with it).
        self.overrides: dict[str, str] = {}
        self._rng = random.Random(0)  # draws for `sim_fail_rate`: the same sequence every run
        self._prompt_cache: OrderedDict[str, None] = OrderedDict()  # prefix digests seen (`sim_prompt_cache`)
        self.connections_accepted = 0
        self._attempts = AttemptLog()
        self._server: asyncio.Server | None = None
        self._sock: socket.socket | None = None
        self._closing: asyncio.Event | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("SimulatedUpstream is not started")
        return f"http://{self.host}:{self.port}/v1"

    async def start(self) -> None:
        if self._server is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._closing = asyncio.Event()
        # Own the listening socket so it can be released even after its event loop has gone (shared instance).
        # proto=IPPROTO_TCP: asyncio only turns Nagle off for sockets that say they are TCP.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(512)
        sock.setblocking(False)
        self._sock = sock
        self._server = await asyncio.start_server(self._on_connection, sock=sock, limit=256 * 1024)
        self.port = sock.getsockname()[1]

    async def close(self) -> None:
        if self._server is None:
            return
        assert self._closing is not None
        self._closing.set()
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=5.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 5.0)
        self._server = None

    def _release_orphaned(self) -> None:
        """Close the listening socket of an instance whose event loop is closed (nothing else can)."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._server = None

    async def __aenter__(self) -> SimulatedUpstream:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @classmethod
    def start_in_thread(cls, host: str = "127.0.0.1", port: int = 0, *,
                        models: Sequence[str] = ("simulated",)) -> SimulatedUpstreamThread:
        """Start a server on its own event loop in a daemon thread, for synchronous tests and benchmarks."""
        return SimulatedUpstreamThread(cls(host, port, models=models))

    def attempts(self, request_key: str) -> int:
        return self._attempts.get(request_key)

    # -- connections ----------------------------------------------------------------------------------------

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        self.connections_accepted += 1
        # A zero high-water mark makes drain() wait until every byte is in the kernel: real back-pressure, and a
        # `cut` fault aborts only after the chunks before it have left the process.
        writer.transport.set_write_buffer_limits(high=0)
        # No Nagle: a frame must leave at once, not wait for the client's delayed ACK of the previous one (40 ms).
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        aborted = False
        try:
            while self._closing is not None and not self._closing.is_set():
                got = await self._read_request(conn, reader, writer)
                if got is None:
                    break
                ex = Exchange(conn, writer, f"req_sim_{secrets.token_hex(8)}")
                await self._serve(ex, reader, got[0], got[1])
                aborted = ex.aborted
                if not ex.keep_alive or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break
                conn.start_next_cycle()
        except (ConnectionError, h11.LocalProtocolError, asyncio.CancelledError):
            pass  # the client went away, or the server is closing: nothing to answer
        except Exception:  # a bug here must not take the server down
            log.exception("simulated upstream: connection handler failed")
        finally:
            self._connections.discard(task)
            if not aborted:
                writer.close()

    async def _read_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[h11.Request, bytes] | None:
        request: h11.Request | None = None
        body = bytearray()
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    with contextlib.suppress(Exception):
                        ex = Exchange(conn, writer, "req_sim_bad")
                        await ex.json(exc.error_status_hint, ApiError(exc.error_status_hint, "Malformed HTTP "
                                      "request.").body, [("connection", "close")])
                return None
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b"")
                try:
                    async with asyncio.timeout(KEEPALIVE_IDLE_SECONDS):
                        data = await reader.read(65536)
                except (TimeoutError, ConnectionError):
                    return None
                conn.receive_data(data)  # b"" tells h11 the peer closed
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY_BYTES:
                    ex = Exchange(conn, writer, "req_sim_big")
                    await ex.json(413, ApiError(413, "Request body too large.").body, [("connection", "close")])
                    return None
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                return request, bytes(body)
            else:  # ConnectionClosed or PAUSED
                return None

    async def _serve(self, ex: Exchange, reader: asyncio.StreamReader, request: h11.Request, body: bytes) -> None:
        """Answer one request while watching the socket: a client that leaves cancels the answer at once, even
        while it sleeps (pacing) or holds (stall, timeout), so nothing lingers."""
        respond = asyncio.create_task(self._respond(ex, request, body))
        watch: asyncio.Task[bytes] | None = asyncio.create_task(reader.read(65536))
        try:
            while True:
                waiting = {respond} if watch is None else {respond, watch}
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if respond in done:
                    break
                assert watch is not None
                try:
                    data = watch.result()
                except ConnectionError:
                    data = b""
                if not data:  # the client is gone
                    ex.keep_alive = False
                    respond.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await respond
                    return
                ex.conn.receive_data(data)  # a pipelined request: h11 keeps it for the next cycle
                watch = None
            respond.result()
        except ConnectionAborted:
            pass
        finally:
            for task in (respond, watch):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            # The watcher may have read the client's next request (or its EOF) just as the answer ended.
            if watch is not None and watch.done() and not watch.cancelled():
                data = watch.result() if watch.exception() is None else b""
                if data:
                    ex.conn.receive_data(data)
                else:
                    ex.keep_alive = False

    async def _respond(self, ex: Exchange, request: h11.Request, raw: bytes) -> None:
        path = request.target.split(b"?", 1)[0].rstrip(b"/")
        method = request.method
        try:
            if path in (b"/v1/chat/completions", b"/chat/completions"):
                if method != b"POST":
                    raise ApiError(405, "Method not allowed; use POST.")
                await self._chat(ex, raw)
            elif path in (b"/v1/models", b"/models"):
                if method != b"GET":
                    raise ApiError(405, "Method not allowed; use GET.")
                await ex.json(200, {"object": "list", "data": [
                    {"id": m, "object": "model", "created": 0, "owned_by": "unbroken-simulated"} for m in self.models
                ]})
            else:
                raise ApiError(404, f"Unknown path {path.decode('latin-1')!r}.", code="unknown_url")
        except ApiError as err:
            await ex.json(err.status, err.body, err.headers)
        except (ConnectionAborted, ConnectionError, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("simulated upstream: request handler failed")
            if ex.conn.our_state is h11.SEND_RESPONSE:
                await ex.json(500, ApiError(500, "Simulated upstream bug.", "server_error").body)
            else:
                ex.abort()

    # -- chat completions -----------------------------------------------------------------------------------

    async def _hold(self) -> None:
        """Stay silent until the server closes (the client leaving cancels us), at most HOLD_LIMIT_SECONDS."""
        assert self._closing is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), HOLD_LIMIT_SECONDS)

    async def _chat(self, ex: Exchange, raw: bytes) -> None:
        body = validate_body(raw)
        self.received.append(body)
        metadata = body.get("metadata")
        if self.overrides:
            metadata = {**(metadata if isinstance(metadata, dict) else {}), **self.overrides}
        controls = Controls.from_metadata(metadata)
        fault = self._attempts.fault_for(controls.faults, controls.fault_attempts, controls.request_key)
        if fault is None and controls.fail_rate and self._rng.random() < controls.fail_rate:
            fault = Fault("http", status=503)
        cached = self._cached_tokens(body["messages"]) if controls.prompt_cache else 0
        await answer(ex, body, controls, fault, self._hold, cached)

    def _cached_tokens(self, messages: list[Any]) -> int:
        """Prompt tokens of the longest prefix seen before (the whole prompt minus its last message at most);
        then remember every prefix of this prompt (bounded, least recently used first out)."""
        keys = prefix_keys(messages)
        cached = 0
        for digest, tokens in keys[:-1]:
            if digest in self._prompt_cache:
                cached = tokens
                self._prompt_cache.move_to_end(digest)
        for digest, _ in keys:
            self._prompt_cache[digest] = None
        while len(self._prompt_cache) > MAX_CACHED_PREFIXES:
            self._prompt_cache.popitem(last=False)
        return cached
