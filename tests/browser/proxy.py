"""The cutting proxy (tests/support/cutting_proxy.py) with a rule a browser can be tested under: a browser opens
connections of its own accord (the page, its scripts, kept-alive sockets reused for the API), so which connection
carries the stream is not known by its index. This one cuts the first `cuts` event streams instead: a connection is
cut once `cut_after` bytes have followed a `text/event-stream` answer header on it (an event stream is the last
answer on its connection). `target_port` is read for every new connection, so a test can switch the router
behind the proxy."""

from __future__ import annotations

import asyncio
import contextlib

from tests.support.cutting_proxy import CuttingProxy

_EVENT_STREAM = b"content-type: text/event-stream"


class EventStreamCuttingProxy(CuttingProxy):
    def __init__(self, target_port: int, *, cut_after: int | None = None, cuts: int = 1) -> None:
        super().__init__(target_port, [])
        self.stream_cut_after = cut_after
        self.max_cuts = cuts

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.transport.abort()
            return

        async def upstream() -> None:
            with contextlib.suppress(Exception):
                while data := await client_r.read(65536):
                    server_w.write(data)
                    await server_w.drain()

        async def downstream() -> None:
            tail = b""  # the answer's last bytes, to find the header across reads
            budget: int | None = None  # bytes this connection may still carry, once it carries a stream to cut
            with contextlib.suppress(Exception):
                while data := await server_r.read(65536):
                    if budget is None and self.stream_cut_after is not None and self.cuts < self.max_cuts:
                        window = tail + data
                        at = window.lower().find(_EVENT_STREAM)
                        if at >= 0:
                            after = len(window) - at - len(_EVENT_STREAM)  # bytes of `data` after the header
                            budget = len(data) - after + self.stream_cut_after
                        tail = window[-len(_EVENT_STREAM):]
                    if budget is not None:
                        if len(data) > budget:
                            client_w.write(data[:budget])
                            await client_w.drain()
                            self.cuts += 1
                            return
                        budget -= len(data)
                    client_w.write(data)
                    await client_w.drain()

        up = asyncio.ensure_future(upstream())
        await downstream()
        up.cancel()
        for writer in (client_w, server_w):
            with contextlib.suppress(Exception):
                writer.transport.abort()  # a reset, not a clean end: what a dropped network looks like
