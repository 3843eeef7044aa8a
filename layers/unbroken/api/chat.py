"""`POST /v1/chat/completions`: Chat Completions clients on the same IR, routing and attempt loop as
`POST /v1/responses`, so failover and mid-stream continuation apply to them too.

The generation emits Open Responses events exactly as for `/v1/responses`; `ChatChunker` turns them into chat
chunks after the loop. As there, a stream's HTTP status is decided by its first event: a failure before any output
is an honest 4xx/5xx (NoOutput), after that it is an in-band `{"error": ...}` chunk.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from unbroken import logs
from unbroken.api.auth import authenticate_principal
from unbroken.api.responses import accounting_headers, caller_of, runtime_of, streaming_headers
from unbroken.api.streaming import END, queued_sse, start_generation
from unbroken.durable import limits
from unbroken.durable.keys import Principal
from unbroken.durable.runtime import Runtime
from unbroken.durable.service import HEADER_HOLD_SECONDS, served_model
from unbroken.journal.store import TERMINAL_EVENT_TYPES
from unbroken.protocol import sse
from unbroken.protocol.body import parse_json, validate
from unbroken.protocol.chat import ChatChunker, ChatCompletionBody, completion_from_response, generation_request
from unbroken.protocol.request import CreateResponseBody, response_skeleton
from unbroken.protocol.responses import Event, ResponseEmitter, new_id
from unbroken.resilience.attempts import Generation, GenerationOptions, NoOutput, RunControl

log = logging.getLogger("unbroken.api")
router = APIRouter()


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(request: Request,
                                 principal: Annotated[Principal, Depends(authenticate_principal)]) -> Response:
    runtime = runtime_of(request)
    tenant = principal.tenant
    body = validate(ChatCompletionBody, parse_json(await request.body()))
    model = served_model(runtime, body.model)
    caller = caller_of(request, tenant)
    await limits.admit(runtime, principal, model.name)  # the key's models, budgets and rate limits
    gen_request = generation_request(body)
    response_id = new_id("resp")
    logs.bind(correlation_id=response_id, tenant=tenant, model=model.name)
    # The chat id carries the response id's random part, so logs of both shapes line up.
    completion_id = "chatcmpl-" + response_id.removeprefix("resp_")
    created = int(time.time())
    # The emitter needs a response object to build; chat clients never see it.
    emitter = ResponseEmitter(response_skeleton(CreateResponseBody(model=model.name), response_id, model.name),
                              hold_tool_arguments=runtime.settings.hold_tool_arguments)
    streaming = bool(body.stream)
    # Chat has no place for `router:` events (recovery events stay off) nor for a `router` field: an explanation
    # shows in the log line and, streamed, in `X-Unbroken-Deployment`.
    options = GenerationOptions(header_hold_seconds=HEADER_HOLD_SECONDS if streaming else math.inf)
    generation = runtime.generation(gen_request, model.name, emitter, options, RunControl(caller.deadline),
                                    policy=caller.policy, account=principal.account)
    log.info("chat completion created", extra={"response_id": response_id, "tenant": tenant, "model": model.name,
                                                "stream": streaming})
    chunker = ChatChunker(completion_id, created, model.name, include_usage=streaming and body.include_usage,
                          answering_model=lambda: emitter.upstream_model)
    if not streaming:
        return await _complete(generation, chunker)
    stream = await _stream(runtime, generation, chunker, response_id)
    if caller.explain:
        stream.headers.update(streaming_headers(generation))
    return stream


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
        raise exc.failure from None
    assert final is not None
    response = final["response"]
    # `model` names the upstream model that answered (failover accounting), as on /v1/responses.
    return JSONResponse(completion_from_response(response, chunker.completion_id, chunker.created,
                                                 response.get("model") or chunker.model, error_event),
                        headers=accounting_headers(response))


def _error_chunk(error: dict[str, Any]) -> bytes:
    return sse.data_frame({"error": error})


async def _stream(runtime: Runtime, generation: Generation, chunker: ChatChunker, response_id: str) -> Response:
    """The generation's Open Responses events, rendered as Chat Completions chunks."""
    queue, first, task = await start_generation(runtime, generation, f"chat {response_id}")

    def render(item: Any) -> tuple[list[bytes], bool]:
        frames: list[bytes] = []
        if item is END or isinstance(item, Exception):
            # The producer died (or ended without a terminal event): an in-band error, never a silent cut.
            chunker.finished = True
            chunker.error = chunker.error or {"message": "The router failed while streaming.",
                                              "type": "server_error", "param": None, "code": "server_error"}
        else:
            frames.extend(sse.data_frame(chunk) for chunk in chunker.feed(item))
        if not chunker.finished:
            return frames, False
        # OpenAI's mid-stream failure shape is an error object with no [DONE] after it.
        frames.append(_error_chunk(chunker.error) if chunker.error is not None else sse.DONE)
        return frames, True

    return queued_sse(queue, task, heartbeat=runtime.settings.heartbeat_seconds, render=render, first=first)
