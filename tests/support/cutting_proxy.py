"""A TCP proxy on 127.0.0.1 that breaks connections the way a network does: the Nth connection through it is closed
after `cut_after[N]` bytes of the server's answer have reached the client (None: never). For testing clients that
resume, with the router untouched behind it."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Sequence


class CuttingProxy:
    def __init__(self, target_port: int, cut_after: Sequence[int | None]) -> None:
        self.target_port = target_port
        self.cut_after = list(cut_after)
        self.connections = 0
        self.cuts = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        index = self.connections
        self.connections += 1
        limit = self.cut_after[index] if index < len(self.cut_after) else None
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.close()
            return

        async def upstream() -> None:
            with contextlib.suppress(Exception):
                while data := await client_r.read(65536):
                    server_w.write(data)
                    await server_w.drain()

        async def downstream() -> None:
            sent = 0
            with contextlib.suppress(Exception):
                while data := await server_r.read(65536):
                    if limit is not None and sent + len(data) > limit:
                        client_w.write(data[: max(0, limit - sent)])
                        await client_w.drain()
                        self.cuts += 1
                        return
                    sent += len(data)
                    client_w.write(data)
                    await client_w.drain()

        up = asyncio.ensure_future(upstream())
        await downstream()
        up.cancel()
        for writer in (client_w, server_w):
            with contextlib.suppress(Exception):
                writer.transport.abort()  # a reset, not a clean end: what a dropped network looks like

    def __enter__(self) -> CuttingProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        async def shut() -> None:
            if self._server is not None:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shut(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
