"""`POST /v1/responses`: validate, route, run the attempt loop, and answer as one JSON object or as an SSE stream.

A stream's HTTP status is decided by its first event: while no deployment has produced anything (and for at most the
header hold), a failure can still be an honest 4xx/5xx; after that it is an `error` + `response.failed` or a
`response.incomplete` event, never a cut body."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from unbroken.api.auth import authenticate
from unbroken.api.compact import expand_compaction_for
from unbroken.api.errors import APIError
from unbroken.api.request import CreateResponseBody, generation_request, items_from_input, response_skeleton
from unbroken.protocol import sse
from unbroken.protocol.responses import TERMINAL_EVENT_TYPES, Event, ResponseEmitter, new_id
from unbroken.resilience.engine import Generation, NoOutput
from unbroken.runtime import Runtime

log = logging.getLogger("unbroken.api")
router = APIRouter()

RECOVERY_HEADER = "x-unbroken-recovery-events"
# How long a stream may wait for its first upstream output before committing to 200 and the start events.
HEADER_HOLD_SECONDS = 5.0


def runtime_of(request: Request) -> Runtime:
    return request.app.state.runtime


def stream_deadline(request: Request, runtime: Runtime) -> float:
    """Now plus the configured stream deadline, or earlier if the Lambda invocation ends earlier."""
    if not os.environ.get("AWS_LAMBDA_FUNCTION_NAME"):
        return time.time() + runtime.settings.stream_deadline_seconds
    from unbroken.api.identity import stream_deadline as lambda_bound

    return lambda_bound(request.headers, runtime.settings.stream_deadline_seconds, time.time())


def _wants_recovery_events(request: Request) -> bool:
    return request.headers.get(RECOVERY_HEADER, "").lower() in ("1", "true", "yes")


@router.post("/v1/responses", response_model=None)
async def create_response(
    request: Request,
    body: Annotated[CreateResponseBody, Body()],
    tenant: Annotated[str, Depends(authenticate)],
) -> Response:
    runtime = runtime_of(request)
    if not body.model:
        raise APIError(400, "Missing required parameter: 'model'.", param="model", code="missing_required_parameter")
    model = runtime.config.model(body.model)
    if model is None:
        raise APIError(404, f"The model '{body.model}' does not exist or you do not have access to it.",
                       param="model", code="model_not_found")
    items = items_from_input(body.input, expand_compaction=expand_compaction_for(tenant, runtime))
    if not items and body.previous_response_id is None:
        raise APIError(400, "Missing required parameter: 'input'.", param="input", code="missing_required_parameter")
    gen_request = generation_request(body, items)
    response_id = new_id("resp")
    skeleton = response_skeleton(body, response_id, body.model)
    candidates = runtime.health.rank(model)
    emitter = ResponseEmitter(skeleton, hold_tool_arguments=runtime.settings.hold_tool_arguments)
    streaming = body.stream
    generation = Generation(
        request=gen_request,
        model_name=model.name,
        candidates=candidates,
        emitter=emitter,
        pool=runtime.pool,
        health=runtime.health,
        settings=runtime.settings,
        deadline=stream_deadline(request, runtime),
        start_events=lambda: emitter.start() + emitter.in_progress(),
        header_hold_seconds=HEADER_HOLD_SECONDS if streaming else math.inf,
        recovery_events=_wants_recovery_events(request),
    )
    log.info("response created", extra={"response_id": response_id, "tenant": tenant, "model": model.name,
                                         "stream": streaming})
    if not streaming:
        return await _complete(generation)
    return await _stream(runtime, generation, response_id)


async def _complete(generation: Generation) -> Response:
    final: Event | None = None
    try:
        async for event in generation.run():
            if event["type"] in TERMINAL_EVENT_TYPES:
                final = event
    except NoOutput as exc:
        raise exc.error from None
    assert final is not None
    return JSONResponse(final["response"])


_END = object()


async def _stream(runtime: Runtime, generation: Generation, response_id: str) -> Response:
    """Run the generation in its own task, feeding a queue; the SSE body reads the queue. The first item decides
    between an HTTP error and a 200 stream."""
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def produce() -> None:
        try:
            async for event in generation.run():
                queue.put_nowait(event)
        except NoOutput as exc:
            queue.put_nowait(exc)
        except Exception as exc:
            log.exception("generation crashed", extra={"response_id": response_id})
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(_END)

    task = runtime.spawn(produce(), name=f"generate {response_id}")
    first = await queue.get()
    if isinstance(first, NoOutput):
        await queue.get()  # _END
        raise first.error
    if first is _END or isinstance(first, Exception):
        raise APIError(500, "The router failed before producing any output.", code="server_error")
    heartbeat = runtime.settings.heartbeat_seconds
    emitter = generation.emitter

    async def body() -> AsyncIterator[bytes]:
        item: Any = first
        try:
            while True:
                # Whatever is queued goes out in one write: whole frames only, fewer syscalls when the upstream
                # is faster than the client.
                frames: list[bytes] = []
                while True:
                    if item is _END:
                        break
                    if isinstance(item, Exception):
                        # The producer died after the stream started: close with a terminal event of our own.
                        frames.extend(sse.frame(e) for e in emitter.fail("server_error",
                                                                         "The router failed while streaming."))
                        item = _END
                        break
                    frames.append(sse.frame(item))
                    if queue.empty():
                        break
                    item = queue.get_nowait()
                if item is _END:
                    frames.append(sse.DONE)
                    yield b"".join(frames)
                    return
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
