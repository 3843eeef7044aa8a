"""`/v1/responses` routes: parse, call the durable-responses service, encode the answer as one JSON object or as
an SSE stream.

A stream's HTTP status is decided by its first event: while no deployment has produced anything (and for at most the
header hold), a failure can still be an honest 4xx/5xx; after that it is an `error` + `response.failed` or a
`response.incomplete` event, never a cut body."""

from __future__ import annotations

import math
import re
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from unbroken import logs
from unbroken.api.auth import authenticate, authenticate_principal
from unbroken.api.identity import stream_deadline
from unbroken.api.streaming import END, OpeningSSE, queued_sse, sse_body, sse_stream, start_generation
from unbroken.durable import limits, service
from unbroken.durable.follow import HandedOn, failure_events, resume_events
from unbroken.durable.keys import Principal
from unbroken.durable.producer import ResponseRun
from unbroken.durable.runtime import Runtime
from unbroken.durable.service import Caller, Direct
from unbroken.errors import invalid
from unbroken.journal.store import TERMINAL_EVENT_TYPES
from unbroken.protocol import sse
from unbroken.protocol.body import parse_json
from unbroken.protocol.request import ResponsesRequest
from unbroken.protocol.responses import Event
from unbroken.resilience.attempts import Generation, NoOutput
from unbroken.routing.policy import POLICY_HEADER, parse_policy

router = APIRouter()

RECOVERY_HEADER = "x-unbroken-recovery-events"
EXPLAIN_HEADER = "x-unbroken-explain"
_TRUE = ("1", "true", "yes")
_SEQUENCE_NUMBER = re.compile(r"-?[0-9]+", re.ASCII)


def runtime_of(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def caller_of(request: Request, tenant: str, key_id: str | None = None) -> Caller:
    """What the transport knows of the call: the tenant, its stream deadline (earlier when the Lambda invocation
    ends earlier), its Idempotency-Key and whether it opted in to recovery events."""
    runtime = runtime_of(request)
    deadline = stream_deadline(request.headers, runtime.settings.stream_deadline_seconds, time.time(),
                               env=request.app.state.lambda_env)
    return Caller(tenant=tenant, deadline=deadline, idempotency_key=request.headers.get("idempotency-key"),
                  recovery_events=request.headers.get(RECOVERY_HEADER, "").lower() in _TRUE,
                  policy=parse_policy(request.headers.get(POLICY_HEADER)),
                  explain=request.headers.get(EXPLAIN_HEADER, "").lower() in _TRUE, key_id=key_id)


@router.post("/v1/responses", response_model=None)
async def create_response(request: Request,
                          principal: Annotated[Principal, Depends(authenticate_principal)]) -> Response:
    runtime = runtime_of(request)
    parsed = ResponsesRequest.parse(parse_json(await request.body()))
    caller = caller_of(request, principal.tenant, principal.key_id)
    # The key's models, budgets and rate limits, before any upstream call (and after every 400 of the request).
    await limits.admit(runtime, principal, service.served_model(runtime, parsed.body.model).name)
    created = await service.create_response(runtime, parsed, caller)
    streaming = parsed.body.stream
    if isinstance(created, Direct):
        if not streaming:
            try:
                return accounted_json(await service.run_direct(created.generation))
            except NoOutput as exc:
                raise exc.failure from None
        return await _direct_stream(runtime, created.generation, created.response_id, explain=caller.explain)
    if not streaming:
        if created.queued is not None:
            return JSONResponse(created.queued)
        await service.first_output(created)
        return accounted_json(await service.final_response(runtime, created.response_id, created.run))

    async def opening() -> tuple[AsyncIterator[bytes], dict[str, str]]:
        # Called by the server once this handler has returned: the response's status waits for its first output.
        await service.first_output(created)
        run = created.run
        body = _journal_body(runtime, created.response_id, -1, run=run, until=created.until)
        return body, streaming_headers(run.generation) if caller.explain and run is not None else {}

    return OpeningSSE(opening)


def streaming_headers(generation: Generation) -> dict[str, str]:
    """`X-Unbroken-Deployment` of a stream (opt-in, `X-Unbroken-Explain`): the deployment streaming when the
    response started; a later failover is in the terminal response's `router.served_by`."""
    deployment = generation.current_deployment
    return {"x-unbroken-deployment": deployment} if deployment else {}


def accounting_headers(response: dict[str, Any]) -> dict[str, str]:
    """`X-Unbroken-Cost-USD` (every attempt of every owner) and `X-Unbroken-Deployment` (the one that served the
    answer), from the response's `router` field."""
    router = response.get("router")
    if not isinstance(router, dict):
        return {}
    out = {"x-unbroken-cost-usd": f"{float(router.get('cost_usd') or 0.0):.8f}"}
    if router.get("served_by"):
        out["x-unbroken-deployment"] = str(router["served_by"])
    return out


def accounted_json(response: dict[str, Any]) -> JSONResponse:
    return JSONResponse(response, headers=accounting_headers(response))


def _journal_body(runtime: Runtime, response_id: str, after: int, *, run: ResponseRun | None = None,
                  with_ids: bool = False, until: float = math.inf) -> AsyncIterator[bytes]:
    # The POST's own stream starts with the batch whose commit it waited for: it is durable, and in hand.
    first = run.first_batch if run is not None and after == -1 else None
    if first:
        after = first[-1]["sequence_number"]
    last = {"seq": after}

    async def source() -> AsyncIterator[Event]:
        if first and first[-1]["type"] in TERMINAL_EVENT_TYPES:
            return  # the whole response was in its first batch
        async for event in service.follow_response(runtime, response_id, after, run, until=until):
            last["seq"] = event["sequence_number"]
            yield event

    def on_failure(exc: BaseException) -> list[Event]:
        if isinstance(exc, HandedOn):  # the response goes on past this stream's deadline: resume to read on
            return resume_events(response_id, exc.last_seq)
        return failure_events(last["seq"], "The journal could not be written; the stream ends here. Resume it "
                              "with GET /v1/responses/{id}?stream=true.")

    def on_close(finished: bool) -> None:
        if not finished and run is not None:
            run.detach()  # the client left: the response completes into the journal, within the detached cap

    return sse_body(source(), heartbeat=runtime.settings.heartbeat_seconds, with_ids=with_ids,
                    on_failure=on_failure, on_close=on_close, first=first)


async def _direct_stream(runtime: Runtime, generation: Generation, response_id: str, *,
                         explain: bool = False) -> Response:
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

    stream = queued_sse(queue, task, heartbeat=runtime.settings.heartbeat_seconds, render=render, first=first)
    if explain:
        stream.headers.update(streaming_headers(generation))
    return stream


# -- stored responses ---------------------------------------------------------------------------------------------


def _cursor(request: Request, starting_after: str | None) -> tuple[int, str]:
    """The resume cursor and the parameter it came from: `starting_after`, else `Last-Event-ID`, else -1."""
    if starting_after is not None:
        raw, param = starting_after, "starting_after"
    else:
        last_event_id = request.headers.get("last-event-id")
        if last_event_id is None:
            return -1, "starting_after"
        raw, param = last_event_id, "Last-Event-ID"
    # ASCII digits only: `int()` would also take `1_0`, `\u0663` (an Arabic-Indic 3) or padding of any Unicode
    # whitespace, none of which a sequence number is written as. Over 4300 digits `int()` refuses (ValueError).
    text = raw.strip(" \t")
    try:
        if _SEQUENCE_NUMBER.fullmatch(text) is None:
            raise ValueError(text)
        return int(text), param
    except ValueError:
        raise invalid(f"{param} must be a sequence number (an integer).", param=param) from None


@router.get("/v1/responses/{response_id}", response_model=None)
async def get_response(request: Request, response_id: str, tenant: Annotated[str, Depends(authenticate)],
                       stream: bool = False, starting_after: str | None = None,
                       include_event_ids: bool = False) -> Response:
    """The response as it stands, or (`stream=true`) its events after `starting_after` followed live until the
    terminal one. `Last-Event-ID` is accepted as the cursor; `id:` lines only with `include_event_ids=true`."""
    runtime = runtime_of(request)
    logs.bind(correlation_id=response_id)
    if not stream:
        return JSONResponse(await service.poll_response(runtime, response_id, tenant))
    header = await service.owned_response(runtime, response_id, tenant)
    model = str(header.request.get("model") or "")
    logs.bind(model=model)
    after, param = _cursor(request, starting_after)
    service.check_cursor(header, after, param)
    if starting_after is not None or "last-event-id" in request.headers:
        logs.emit_metrics({"model": model}, {"Resumes": 1})  # a configured model's name: bounded
    return sse_stream(_journal_body(runtime, response_id, after, with_ids=include_event_ids,
                                    until=service.stream_until(header, caller_of(request, tenant))))


@router.get("/v1/responses/{response_id}/input_items", response_model=None)
async def list_input_items(request: Request, response_id: str, tenant: Annotated[str, Depends(authenticate)],
                           limit: Annotated[int, Query(ge=1, le=100)] = 20,
                           order: Literal["asc", "desc"] = "desc", after: str | None = None,
                           include: Annotated[list[str] | None, Query()] = None,
                           include_brackets: Annotated[list[str] | None, Query(alias="include[]")] = None
                           ) -> Response:
    """The input items of a response, a page at a time (`include[]=` is how the openai SDK sends the list)."""
    return JSONResponse(await service.list_input_items(
        runtime_of(request), response_id, tenant, limit=limit, order=order, after=after,
        include=[*(include or ()), *(include_brackets or ())]))


@router.post("/v1/responses/{response_id}/cancel", response_model=None)
async def cancel_response(request: Request, response_id: str,
                          tenant: Annotated[str, Depends(authenticate)]) -> Response:
    return JSONResponse(await service.cancel_response(runtime_of(request), response_id, tenant))


@router.delete("/v1/responses/{response_id}", response_model=None)
async def delete_response(request: Request, response_id: str,
                          tenant: Annotated[str, Depends(authenticate)]) -> Response:
    await service.delete_response(runtime_of(request), response_id, tenant)
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})
