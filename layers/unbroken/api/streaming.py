"""SSE response bodies. Every stream is a task feeding a queue and one body that drains it: whatever is queued is
rendered and written in one go (whole frames only: fewer syscalls when the producer is faster than the client),
and heartbeat comments go out while the queue is quiet. Items are events, then `END`; an exception the producer
raised after starting is queued before `END` for the renderer to close the stream with."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi.responses import StreamingResponse
from starlette.types import Send

from unbroken.durable.runtime import Runtime
from unbroken.errors import Failure
from unbroken.protocol import sse
from unbroken.protocol.responses import Event
from unbroken.resilience.attempts import Generation, NoOutput

log = logging.getLogger("unbroken.api")

END = object()  # the producer is done

# A rendered item: the bytes to write and whether the stream is over after them.
Render = Callable[[Any], tuple[list[bytes], bool]]


_SSE_MEDIA_TYPE = "text/event-stream"
_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def sse_stream(body: AsyncIterator[bytes]) -> StreamingResponse:
    """`body` as an SSE response (its media type, and headers that keep caches and proxy buffers out of it)."""
    return StreamingResponse(body, media_type=_SSE_MEDIA_TYPE, headers=_SSE_HEADERS)


def queued_sse(queue: asyncio.Queue[Any], task: asyncio.Task[None], *, heartbeat: float, render: Render,
               first: Any = None, on_close: Callable[[bool], Any] | None = None) -> StreamingResponse:
    """The SSE response over the running `task`'s queue (`queued_body`)."""
    return sse_stream(queued_body(queue, lambda: task, heartbeat=heartbeat, render=render, first=first,
                                  on_close=on_close))


def queued_body(queue: asyncio.Queue[Any], start: Callable[[], asyncio.Task[None]], *, heartbeat: float,
                render: Render, first: Any = None,
                on_close: Callable[[bool], Any] | None = None) -> AsyncIterator[bytes]:
    """The SSE body over the queue of the task `start()` gives (starts, or returns running). It is called when the
    body starts, after `first` is written if there is one: the task's set-up is not on the first frames' path, and
    a body never read starts nothing. `first` is an item already taken from the queue (None: take one);
    `on_close(finished)` runs when the body ends, `finished` False if the client went away first."""

    async def body() -> AsyncIterator[bytes]:
        finished = False
        producer: asyncio.Task[None] | None = None
        try:
            if first is None:
                producer = start()
            item: Any = first if first is not None else await queue.get()
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
                    if producer is not None:  # its last word is out: let its task wind down rather than cancel it
                        await asyncio.wait({producer}, timeout=5.0)
                    return
                if frames:
                    yield b"".join(frames) if len(frames) > 1 else frames[0]
                if producer is None:
                    producer = start()
                while True:
                    try:
                        async with asyncio.timeout(heartbeat):
                            item = await queue.get()
                        break
                    except TimeoutError:
                        yield sse.HEARTBEAT  # keeps proxies (API Gateway idle timeout) from closing a quiet stream
        finally:
            if producer is not None and not producer.done():
                producer.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await producer
            if on_close is not None:
                on_close(finished)

    return body()


class OpeningSSE(StreamingResponse):
    """An SSE response returned before its stream can start: `opening()` runs when the server calls it, and gives
    the body and the headers that depend on how the stream started. So a handler returns at once and its routing,
    middleware and response set-up happen while the upstream call is in flight, not between the first output
    being durable and its status going out. Nothing is sent before `opening` returns: what it raises is answered
    as any error of the handler would be (an error object with its status)."""

    def __init__(self, opening: Callable[[], Awaitable[tuple[AsyncIterator[bytes], dict[str, str]]]]) -> None:
        super().__init__(_Unopened(), media_type=_SSE_MEDIA_TYPE, headers=_SSE_HEADERS)
        self._opening = opening

    async def stream_response(self, send: Send) -> None:
        self.body_iterator, headers = await self._opening()
        self.headers.update(headers)
        await super().stream_response(send)


class _Unopened:
    """An `OpeningSSE`'s body until it is opened: reading it is a bug."""

    def __aiter__(self) -> _Unopened:
        return self

    async def __anext__(self) -> bytes:
        raise RuntimeError("an OpeningSSE body is read before it was opened")


def sse_body(
    source: AsyncIterator[Event],
    *,
    heartbeat: float,
    with_ids: bool = False,
    on_failure: Callable[[BaseException], list[Event]] | None = None,
    on_close: Callable[[bool], Any] | None = None,
    first: list[Event] | None = None,
) -> AsyncIterator[bytes]:
    """Open Responses events from `source` (e.g. a journal follower) as an SSE body, `data: [DONE]` last.
    `on_failure(exc)` gives the events that close a stream whose source raised. `first`: events already in hand
    that come before `source`'s (the POST's first committed batch), written as soon as the body starts rather than
    after a hop through the pump task, which starts after them."""
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for event in source:
                queue.put_nowait(event)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(END)

    def render(item: Any) -> tuple[list[bytes], bool]:
        if item is END:
            return [sse.DONE], True
        if isinstance(item, Exception):
            closing = on_failure(item) if on_failure is not None else []
            return [*(sse.frame(e, with_id=with_ids) for e in closing), sse.DONE], True
        if isinstance(item, list):
            return [sse.frame(e, with_id=with_ids) for e in item], False
        return [sse.frame(item, with_id=with_ids)], False

    def start() -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(pump())

    return queued_body(queue, start, heartbeat=heartbeat, render=render, on_close=on_close, first=first or None)


async def start_generation(runtime: Runtime, generation: Generation, name: str
                           ) -> tuple[asyncio.Queue[Any], Any, asyncio.Task[None]]:
    """Run a generation (unjournaled) in a task feeding a queue; return (queue, first item, task) once the first
    item is there. A generation that ends in `NoOutput` raises its failure here: nothing was sent yet."""
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def produce() -> None:
        try:
            async for event in generation.run():
                queue.put_nowait(event)
        except NoOutput as exc:
            queue.put_nowait(exc)
        except Exception as exc:
            log.error("generation crashed", exc_info=exc, extra={"task": name, "error": type(exc).__name__})
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(END)

    task = runtime.spawn(produce(), name=name)
    first = await queue.get()
    if isinstance(first, NoOutput):
        await queue.get()  # END
        raise first.failure
    if first is END or isinstance(first, Exception):
        raise Failure("internal", "The router failed before producing any output.", code="server_error")
    return queue, first, task
