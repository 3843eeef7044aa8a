"""A `SimulatedUpstream` serving from its own event loop in a daemon thread, for synchronous tests and benchmarks."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Protocol


class Servable(Protocol):
    """What the thread needs of a server (`SimulatedUpstream`; server.py imports this module, not the reverse)."""

    port: int

    @property
    def base_url(self) -> str: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class SimulatedUpstreamThread:
    """A `SimulatedUpstream` serving from its own event loop in a daemon thread. `stop()` is idempotent."""

    def __init__(self, upstream: Servable, start_timeout: float = 10.0) -> None:
        self.upstream = upstream
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="simulated-upstream", daemon=True)
        self._thread.start()
        if not self._ready.wait(start_timeout):
            raise RuntimeError("simulated upstream did not start in time")
        if self._error is not None:
            raise RuntimeError("simulated upstream failed to start") from self._error

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self.upstream.start())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            self._loop.close()
            return
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            pending = [t for t in asyncio.all_tasks(self._loop) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                self._loop.run_until_complete(asyncio.wait(pending, timeout=5.0))
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    @property
    def base_url(self) -> str:
        return self.upstream.base_url

    @property
    def port(self) -> int:
        return self.upstream.port

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop.is_closed() or not self._thread.is_alive():
            return
        future = asyncio.run_coroutine_threadsafe(self.upstream.close(), self._loop)
        with contextlib.suppress(Exception):
            future.result(timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)

    def __enter__(self) -> SimulatedUpstreamThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
