"""Turning a source of events into an SSE response: events pumped through a queue so that heartbeats go out while
the source is quiet, whatever is queued written in one go (whole frames only), `data: [DONE]` last."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse

from unbroken.protocol import sse
from unbroken.protocol.responses import Event

_END = object()


class SourceFailed(Exception):
    """The event source broke after the stream started; `events` are the terminal events to close it with."""

    def __init__(self, events: list[Event]) -> None:
        super().__init__("event source failed")
        self.events = events


def sse_response(
    source: AsyncIterator[Event],
    *,
    heartbeat: float,
    with_ids: bool = False,
    on_failure: Callable[[BaseException], list[Event]] | None = None,
    on_close: Callable[[bool], Any] | None = None,
    first: Event | None = None,
) -> StreamingResponse:
    """`on_failure(exc)` gives the events that close a stream whose source raised; `on_close(finished)` runs when
    the body ends, `finished` False if the client went away first."""
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for event in source:
                queue.put_nowait(event)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            queue.put_nowait(SourceFailed(on_failure(exc) if on_failure else []))
        finally:
            queue.put_nowait(_END)

    async def body() -> AsyncIterator[bytes]:
        task = asyncio.get_running_loop().create_task(pump())
        finished = False
        item: Any = first if first is not None else await queue.get()
        try:
            while True:
                frames: list[bytes] = []
                while True:
                    if item is _END:
                        break
                    if isinstance(item, SourceFailed):
                        frames.extend(sse.frame(e, with_id=with_ids) for e in item.events)
                    else:
                        frames.append(sse.frame(item, with_id=with_ids))
                    if queue.empty():
                        break
                    item = queue.get_nowait()
                if item is _END:
                    frames.append(sse.DONE)
                    finished = True
                    yield b"".join(frames)
                    return
                if frames:
                    yield b"".join(frames)
                while True:
                    try:
                        async with asyncio.timeout(heartbeat):
                            item = await queue.get()
                        break
                    except TimeoutError:
                        yield sse.HEARTBEAT  # keeps proxies (API Gateway idle timeout) from closing a quiet stream
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if on_close is not None:
                on_close(finished)

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
