"""Turning a source of events into an SSE response: events pumped through a queue so that heartbeats go out while
the source is quiet, whatever is queued written in one go (whole frames only), `data: [DONE]` last."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse

from unbroken.protocol import sse
from unbroken.protocol.responses import Event

log = logging.getLogger("unbroken.api")

END = object()  # the generation (or the source) is done
_END = END


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


# A rendered batch: the bytes to write and whether the stream is over after them.
Render = Callable[[Any], tuple[list[bytes], bool]]


async def start_generation(runtime: Any, generation: Any, name: str) -> tuple[asyncio.Queue[Any], Any, Any]:
    """Run a generation (unjournaled) in a task feeding a queue; return (queue, first item, task) once the first
    item is there. A first item that is `NoOutput` is raised as its HTTP error: nothing was sent yet.

    Items are events, then `END`; an exception the generation raised after starting is put in the queue before
    `END`, for the renderer to close the stream with."""
    from unbroken.api.errors import APIError
    from unbroken.resilience.engine import NoOutput

    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def produce() -> None:
        try:
            async for event in generation.run():
                queue.put_nowait(event)
        except NoOutput as exc:
            queue.put_nowait(exc)
        except Exception as exc:
            log.exception("generation crashed", extra={"task": name})
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(END)

    task = runtime.spawn(produce(), name=name)
    first = await queue.get()
    if isinstance(first, NoOutput):
        await queue.get()  # END
        raise first.error
    if first is END or isinstance(first, Exception):
        raise APIError(500, "The router failed before producing any output.", code="server_error")
    return queue, first, task


def queued_sse(queue: asyncio.Queue[Any], first: Any, task: asyncio.Task[None], *, heartbeat: float,
               render: Render) -> StreamingResponse:
    """The SSE body over a generation's queue: whatever is queued is rendered and written in one go (whole frames
    only: fewer syscalls when the upstream is faster than the client), heartbeats while it is quiet."""

    async def body() -> AsyncIterator[bytes]:
        item: Any = first
        try:
            while True:
                frames: list[bytes] = []
                while True:
                    out, finished = render(item)
                    frames.extend(out)
                    if finished or queue.empty():
                        break
                    item = queue.get_nowait()
                if finished:
                    yield b"".join(frames)
                    # The generation's last word is out: let its task wind down rather than cancel it.
                    await asyncio.wait({task}, timeout=5.0)
                    return
                if frames:
                    yield b"".join(frames) if len(frames) > 1 else frames[0]
                while True:
                    try:
                        async with asyncio.timeout(heartbeat):
                            item = await queue.get()
                        break
                    except TimeoutError:
                        yield sse.HEARTBEAT  # keeps proxies (API Gateway idle timeout) from closing a quiet stream
        finally:
            if not task.done():
                # Without a journal nobody can pick the response up again: stop spending on it.
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
