"""`POST /v1/chat/completions`: Chat Completions clients on the same IR, routing and attempt loop as
`POST /v1/responses`, so failover and mid-stream continuation apply to them too.

The generation emits Open Responses events exactly as for `/v1/responses`; `ChatChunker` turns them into chat
chunks after the loop. As there, a stream's HTTP status is decided by its first event: a failure before any output
is an honest 4xx/5xx (NoOutput), after that it is an in-band `{"error": ...}` chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from unbroken.api.auth import authenticate
from unbroken.api.errors import APIError
from unbroken.api.request import CreateResponseBody, response_skeleton
from unbroken.api.responses import HEADER_HOLD_SECONDS, runtime_of, stream_deadline
from unbroken.protocol import sse
from unbroken.protocol.chat import ChatChunker, ChatCompletionBody, completion_from_response, generation_request
from unbroken.protocol.responses import TERMINAL_EVENT_TYPES, Event, ResponseEmitter, new_id
from unbroken.resilience.engine import Generation, NoOutput
from unbroken.runtime import Runtime

log = logging.getLogger("unbroken.api")
router = APIRouter()

_END = object()


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(
    request: Request,
    body: Annotated[ChatCompletionBody, Body()],
    tenant: Annotated[str, Depends(authenticate)],
) -> Response:
    runtime = runtime_of(request)
    if not body.model:
        raise APIError(400, "Missing required parameter: 'model'.", param="model", code="missing_required_parameter")
    model = runtime.config.model(body.model)
    if model is None:
        raise APIError(404, f"The model '{body.model}' does not exist or you do not have access to it.",
                       param="model", code="model_not_found")
    gen_request = generation_request(body)
    response_id = new_id("resp")
    # The chat id carries the response id's random part, so logs of both shapes line up.
    completion_id = "chatcmpl-" + response_id.removeprefix("resp_")
    created = int(time.time())
    # The emitter needs a response object to build; chat clients never see it.
    emitter = ResponseEmitter(response_skeleton(CreateResponseBody(model=body.model), response_id, body.model),
                              hold_tool_arguments=runtime.settings.hold_tool_arguments)
    streaming = bool(body.stream)
    generation = Generation(
        request=gen_request,
        model_name=model.name,
        candidates=runtime.health.rank(model),
        emitter=emitter,
        pool=runtime.pool,
        health=runtime.health,
        settings=runtime.settings,
        deadline=stream_deadline(request, runtime),
        start_events=lambda: emitter.start() + emitter.in_progress(),
        header_hold_seconds=HEADER_HOLD_SECONDS if streaming else math.inf,
        recovery_events=False,  # chat has no place for `router:` events
    )
    log.info("chat completion created", extra={"response_id": response_id, "tenant": tenant, "model": model.name,
                                                "stream": streaming})
    chunker = ChatChunker(completion_id, created, body.model, include_usage=streaming and body.include_usage,
                          answering_model=lambda: emitter.upstream_model)
    if not streaming:
        return await _complete(generation, chunker)
    return await _stream(runtime, generation, chunker, response_id)


async def _complete(generation: Generation, chunker: ChatChunker) -> Response:
    final: Event | None = None
    error_event: dict[str, Any] | None = None
    try:
        async for event in generation.run():
            if event["type"] == "error":
                error_event = event.get("error")
            elif event["type"] in TERMINAL_EVENT_TYPES:
                final = event
    except NoOutput as exc:
        raise exc.error from None
    assert final is not None
    response = final["response"]
    # `model` names the upstream model that answered (failover accounting), as on /v1/responses.
    return JSONResponse(completion_from_response(response, chunker.completion_id, chunker.created,
                                                 response.get("model") or chunker.model, error_event))


def _error_chunk(error: dict[str, Any]) -> bytes:
    return sse.data_frame({"error": error})


async def _stream(runtime: Runtime, generation: Generation, chunker: ChatChunker, response_id: str) -> Response:
    """The generation runs in its own task feeding a queue; the body reads the queue. The first item decides
    between an HTTP error and a 200 stream."""
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def produce() -> None:
        try:
            async for event in generation.run():
                queue.put_nowait(event)
        except NoOutput as exc:
            queue.put_nowait(exc)
        except Exception as exc:
            log.exception("chat generation crashed", extra={"response_id": response_id})
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(_END)

    task = runtime.spawn(produce(), name=f"chat {response_id}")
    first = await queue.get()
    if isinstance(first, NoOutput):
        await queue.get()  # _END
        raise first.error
    if first is _END or isinstance(first, Exception):
        raise APIError(500, "The router failed before producing any output.", code="server_error")
    heartbeat = runtime.settings.heartbeat_seconds

    async def body() -> AsyncIterator[bytes]:
        item: Any = first
        try:
            while True:
                # Whatever is queued goes out in one write (whole frames only): fewer syscalls when the upstream is
                # faster than the client, as on /v1/responses.
                frames: list[bytes] = []
                while True:
                    if item is _END or isinstance(item, Exception):
                        # The producer died after the stream started: an in-band error, never a silent cut.
                        chunker.finished = True
                        chunker.error = chunker.error or {"message": "The router failed while streaming.",
                                                          "type": "server_error", "param": None,
                                                          "code": "server_error"}
                        break
                    frames.extend(sse.data_frame(chunk) for chunk in chunker.feed(item))
                    if chunker.finished or queue.empty():
                        break
                    item = queue.get_nowait()
                if chunker.finished:
                    # OpenAI's mid-stream failure shape is an error object with no [DONE] after it.
                    frames.append(_error_chunk(chunker.error) if chunker.error is not None else sse.DONE)
                    yield b"".join(frames)
                    # The terminal event was the generation's last word: let its task wind down, not cancel it.
                    await asyncio.wait({task}, timeout=5.0)
                    return
                if frames:  # lifecycle events have no chat form; an empty write would say nothing
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
                # Without a journal nobody can pick the answer up again: stop spending on it.
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
