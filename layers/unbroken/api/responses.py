"""`POST /v1/responses`: validate, route, run the attempt loop, and answer as one JSON object or as an SSE stream.

A stream's HTTP status is decided by its first event: while no deployment has produced anything (and for at most the
header hold), a failure can still be an honest 4xx/5xx; after that it is an `error` + `response.failed` or a
`response.incomplete` event, never a cut body."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from unbroken.api.auth import authenticate
from unbroken.api.compact import expand_compaction_for
from unbroken.api.errors import APIError
from unbroken.api.request import CreateResponseBody, generation_request, items_from_input, response_skeleton
from unbroken.api.streaming import END, queued_sse, sse_response, start_generation
from unbroken.config import PublicModel
from unbroken.journal.store import AlreadyExists, ResponseHeader
from unbroken.producer import (
    ResponseRun,
    failure_events,
    journal_events,
    output_as_input,
    request_input_items,
    stored_request,
)
from unbroken.protocol import sse
from unbroken.protocol.responses import TERMINAL_EVENT_TYPES, Event, ResponseEmitter, new_id, restore_emitter
from unbroken.resilience.engine import Generation, NoOutput
from unbroken.runtime import Runtime

log = logging.getLogger("unbroken.api")
router = APIRouter()

RECOVERY_HEADER = "x-unbroken-recovery-events"
# How long a stream may wait for its first upstream output before committing to 200 and the start events.
HEADER_HOLD_SECONDS = 5.0


def runtime_of(request: Request) -> Runtime:
    return request.app.state.runtime


def public_model(runtime: Runtime, name: str | None) -> PublicModel:
    """The served model a request names: 400 when it names none, 404 when this router does not serve it."""
    if not name:
        raise APIError(400, "Missing required parameter: 'model'.", param="model", code="missing_required_parameter")
    model = runtime.config.model(name)
    if model is None:
        raise APIError(404, f"The model '{name}' does not exist or you do not have access to it.",
                       param="model", code="model_not_found")
    return model


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
    model = public_model(runtime, body.model)
    journaled = runtime.store is not None and body.store
    if body.background and not journaled:
        raise APIError(400, "background responses need store: true (and a router with a store).", param="background")
    if body.previous_response_id is not None and runtime.store is None:
        raise APIError(400, "previous_response_id needs a router with a store.", param="previous_response_id")
    idempotency_key = request.headers.get("idempotency-key")
    dumped = body.model_dump(mode="json", by_alias=True, exclude_unset=True)
    body_hash = hashlib.sha256(json.dumps(dumped, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    if idempotency_key is not None:
        if not journaled:
            raise APIError(400, "Idempotency-Key needs store: true (and a router with a store).",
                           param="Idempotency-Key")
        existing = await runtime.store.find_by_idempotency_key(tenant, idempotency_key)  # type: ignore[union-attr]
        if existing is not None:
            return await _attach(runtime, existing, body_hash, body.stream)
    input_items = request_input_items(dumped.get("input"))
    if body.previous_response_id is not None:
        input_items = await _previous_context(runtime, tenant, body.previous_response_id) + input_items
    items = items_from_input(_reparse_input(input_items), expand_compaction=expand_compaction_for(tenant, runtime))
    if not items:
        raise APIError(400, "Missing required parameter: 'input'.", param="input", code="missing_required_parameter")
    gen_request = generation_request(body, items)
    response_id = new_id("resp")
    skeleton = response_skeleton(body, response_id, body.model)
    emitter = ResponseEmitter(skeleton, hold_tool_arguments=runtime.settings.hold_tool_arguments)
    streaming = body.stream
    recovery = _wants_recovery_events(request)
    generation = runtime.generation(
        gen_request, model.name, emitter, deadline=stream_deadline(request, runtime), queued=body.background,
        header_hold_seconds=HEADER_HOLD_SECONDS if streaming and not body.background else math.inf,
        recovery_events=recovery,
    )
    log.info("response created", extra={"response_id": response_id, "tenant": tenant, "model": model.name,
                                         "stream": streaming, "journaled": journaled})
    if not journaled:
        if not streaming:
            return await _complete(generation)
        return await _stream(runtime, generation, response_id)
    now = time.time()
    header = ResponseHeader(
        id=response_id, tenant=tenant, created_at=now, expires_at=now + runtime.settings.retention_seconds,
        status="queued" if body.background else "in_progress", lease_expires_at=now + runtime.settings.lease_seconds,
        request={**stored_request(dumped, input_items), "_recovery_events": recovery},
        idempotency_key=idempotency_key, body_hash=body_hash, background=body.background,
    )
    try:
        await runtime.store.create(header)  # type: ignore[union-attr]
    except AlreadyExists:
        existing = await runtime.store.find_by_idempotency_key(tenant, idempotency_key or "")  # type: ignore
        if existing is None:
            raise APIError(409, "A request with this Idempotency-Key is being created.", code="conflict") from None
        return await _attach(runtime, existing, body_hash, body.stream)
    if body.background:
        # Committed before anything else: `queued` is what a poll sees until a worker picks it up.
        generation.deadline = time.time() + runtime.settings.max_total_seconds
    if body.background and os.environ.get("UNBROKEN_WORKER_FUNCTION"):
        # On AWS a background response is produced by the worker Lambda, which outlives this request and hands
        # off to a fresh invocation before its 15 minutes run out.
        from unbroken.worker import invoke_worker

        await asyncio.to_thread(invoke_worker, {"kind": "background", "response_id": response_id, "epoch": 0})
        run = None
    else:
        run = ResponseRun(runtime, response_id, 0, generation).start()
    if body.background:
        queued = dict(skeleton, status="queued")
        if not streaming:
            return JSONResponse(queued)
        return _journal_stream(runtime, response_id, -1, run=run, request=request)
    assert run is not None
    outcome = await run.first
    if outcome.error is not None:
        raise outcome.error
    if not streaming:
        return JSONResponse(await _final_response(runtime, response_id, run))
    return _journal_stream(runtime, response_id, -1, run=run, request=request)


def _reparse_input(items: list[dict[str, Any]]) -> Any:
    """Input items as dicts (stored form) → the validated item models the IR conversion takes."""
    return CreateResponseBody.model_validate({"input": items}).input


async def _previous_context(runtime: Runtime, tenant: str, previous_id: str) -> list[dict[str, Any]]:
    """`prev.input + prev.output`, as input items, for `previous_response_id` (the caller's own responses only)."""
    assert runtime.store is not None
    prev = await runtime.store.get(previous_id)
    if prev is None or prev.tenant != tenant:
        raise APIError(404, f"Previous response '{previous_id}' not found.", param="previous_response_id",
                       code="previous_response_not_found")
    if not prev.terminal or prev.response is None:
        raise APIError(409, f"Previous response '{previous_id}' is still in progress.",
                       param="previous_response_id", code="previous_response_in_progress")
    return list(prev.request.get("input", [])) + output_as_input(prev.response.get("output", []))


async def _attach(runtime: Runtime, existing: ResponseHeader, body_hash: str, stream: bool) -> Response:
    """A retried POST with the same Idempotency-Key: the same response, replayed from its start (never a second
    model call); the same key with another body is a conflict."""
    if existing.body_hash != body_hash:
        raise APIError(409, "This Idempotency-Key was used with a different request body.", param="Idempotency-Key",
                       code="idempotency_key_reused")
    if stream:
        return _journal_stream(runtime, existing.id, -1)
    return JSONResponse(await _final_response(runtime, existing.id, None))


async def _final_response(runtime: Runtime, response_id: str, run: ResponseRun | None) -> dict[str, Any]:
    final: dict[str, Any] | None = None
    async for event in journal_events(runtime, response_id, -1, run):
        if event["type"] in TERMINAL_EVENT_TYPES:
            final = event["response"]
    if final is None:
        raise APIError(500, "The response ended without a terminal event.", code="server_error")
    return final


def _journal_stream(runtime: Runtime, response_id: str, after: int, *, run: ResponseRun | None = None,
                    request: Request | None = None, with_ids: bool = False) -> Response:
    last = {"seq": after}

    async def source() -> AsyncIterator[Event]:
        async for event in journal_events(runtime, response_id, after, run):
            last["seq"] = event["sequence_number"]
            yield event

    def on_failure(exc: BaseException) -> list[Event]:
        return failure_events(last["seq"], "The journal could not be written; the stream ends here. Resume it "
                              "with GET /v1/responses/{id}?stream=true.")

    def on_close(finished: bool) -> None:
        if not finished and run is not None:
            run.detach()  # the client left: the response completes into the journal, within the detached cap

    return sse_response(source(), heartbeat=runtime.settings.heartbeat_seconds, with_ids=with_ids,
                        on_failure=on_failure, on_close=on_close)


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



async def _stream(runtime: Runtime, generation: Generation, response_id: str) -> Response:
    """An unjournaled stream: events go to the client as the generation emits them."""
    queue, first, task = await start_generation(runtime, generation, f"generate {response_id}")
    emitter = generation.emitter

    def render(item: Any) -> tuple[list[bytes], bool]:
        if item is END:
            return [sse.DONE], True
        if isinstance(item, Exception):
            # The producer died after the stream started: close with a terminal event of our own.
            return [*(sse.frame(e) for e in emitter.fail("server_error", "The router failed while streaming.")),
                    sse.DONE], True
        return [sse.frame(item)], False

    return queued_sse(queue, task, heartbeat=runtime.settings.heartbeat_seconds, render=render, first=first)


# -- stored responses ---------------------------------------------------------------------------------------------


async def _owned(runtime: Runtime, response_id: str, tenant: str) -> ResponseHeader:
    """The tenant's own response; anything else (absent, expired, another tenant's) is the same 404."""
    if runtime.store is None:
        raise APIError(404, f"Response '{response_id}' not found (this router keeps no responses).",
                       code="not_found", param="response_id")
    header = await runtime.store.get(response_id)
    if header is None or header.tenant != tenant:
        raise APIError(404, f"Response '{response_id}' not found.", code="not_found", param="response_id")
    return header


async def _snapshot(runtime: Runtime, header: ResponseHeader) -> dict[str, Any]:
    """The response object as it stands: the stored snapshot once terminal, else rebuilt from the journal."""
    if header.terminal and header.response is not None:
        return header.response
    assert runtime.store is not None
    events = await runtime.store.read_events(header.id, -1)
    if not events:
        return dict(header.response or {}, status=header.status)
    emitter = restore_emitter(events)
    emitter.response["status"] = header.status
    return emitter.snapshot()


@router.get("/v1/responses/{response_id}", response_model=None)
async def get_response(
    request: Request,
    response_id: str,
    tenant: Annotated[str, Depends(authenticate)],
    stream: bool = False,
    starting_after: Annotated[int | None, Query(ge=-1)] = None,
    include_event_ids: bool = False,
) -> Response:
    """The response as it stands, or (`stream=true`) its events after `starting_after` followed live until the
    terminal one. `Last-Event-ID` is accepted as the cursor; `id:` lines only with `include_event_ids=true`."""
    runtime = runtime_of(request)
    header = await _owned(runtime, response_id, tenant)
    if not stream:
        return JSONResponse(await _snapshot(runtime, header))
    after = starting_after
    if after is None:
        last_event_id = request.headers.get("last-event-id")
        try:
            after = int(last_event_id) if last_event_id is not None else -1
        except ValueError:
            raise APIError(400, "Last-Event-ID must be a sequence number.", param="Last-Event-ID") from None
    return _journal_stream(runtime, response_id, after, with_ids=include_event_ids)


CANCEL_WAIT_SECONDS = 10.0


@router.post("/v1/responses/{response_id}/cancel", response_model=None)
async def cancel_response(request: Request, response_id: str,
                          tenant: Annotated[str, Depends(authenticate)]) -> Response:
    """Stop generation wherever it runs (the owner sees the flag at its next commit) and answer with the response
    once it has ended; cancelling a finished response returns it unchanged."""
    runtime = runtime_of(request)
    header = await _owned(runtime, response_id, tenant)
    if not header.terminal:
        assert runtime.store is not None
        await runtime.store.request_cancel(response_id)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CANCEL_WAIT_SECONDS):
                async for _ in journal_events(runtime, response_id, header.last_seq):
                    pass
        header = await _owned(runtime, response_id, tenant)
    return JSONResponse(await _snapshot(runtime, header))


@router.delete("/v1/responses/{response_id}", response_model=None)
async def delete_response(request: Request, response_id: str,
                          tenant: Annotated[str, Depends(authenticate)]) -> Response:
    runtime = runtime_of(request)
    header = await _owned(runtime, response_id, tenant)
    assert runtime.store is not None
    if not header.terminal:
        await runtime.store.request_cancel(response_id)  # a running producer stops at its next commit
    await runtime.store.delete(response_id)
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})
