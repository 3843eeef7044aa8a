"""Durable responses as a service with no HTTP in it: create a response (journaled or not, in the foreground or in
the background), attach an Idempotency-Key retry to the response it already made, and read, cancel or delete a
stored response. Route handlers parse, call one of these and encode what they get back."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any

from unbroken import logs
from unbroken.config import PolicyName, PublicModel
from unbroken.durable.follow import journal_events
from unbroken.durable.producer import ResponseRun
from unbroken.durable.runtime import Runtime
from unbroken.durable.spend import KEY_ID_FIELD, Account
from unbroken.durable.takeover import nobody_produces, revive, stored_skeleton
from unbroken.errors import Failure, invalid
from unbroken.ir import GenerationRequest
from unbroken.journal.store import TERMINAL_EVENT_TYPES, AlreadyExists, ResponseHeader, Store, StoreError
from unbroken.protocol.compaction import expand_compaction_for
from unbroken.protocol.request import (
    ResponsesRequest,
    input_item_resource,
    output_as_input,
    own_input,
    response_skeleton,
)
from unbroken.protocol.responses import Event, ResponseEmitter, new_id, restore_emitter
from unbroken.resilience.attempts import Generation, GenerationOptions, RunControl
from unbroken.routing.affinity import Predecessor
from unbroken.routing.tokens import prefix_tokens

log = logging.getLogger("unbroken.api")

# How long a stream may wait for its first upstream output before committing to 200 and the start events.
HEADER_HOLD_SECONDS = 5.0
# How long a cancel waits for the producer to end the response before answering with it as it stands.
CANCEL_WAIT_SECONDS = 10.0
# A foreground stream handed on at its deadline goes on for at most this many more stream deadlines: on AWS the
# worker's invocations (worker.MAX_HOPS), locally as many stream deadlines in this process.
HAND_ON_HOPS = 8


@dataclass(frozen=True, slots=True)
class Caller:
    """Who asks, and what the transport knows about the call."""

    tenant: str
    deadline: float  # when a stream served to this caller must end (the Lambda invocation's end, or the setting)
    idempotency_key: str | None = None
    recovery_events: bool = False  # the caller opted in to `router:` events and the `router` field
    policy: PolicyName | None = None  # X-Unbroken-Policy: this request's routing policy (None: the model's)
    explain: bool = False  # X-Unbroken-Explain: `router.routing` says how the deployments were ranked
    key_id: str | None = None  # the API key's id, which spend is charged to (with the tenant)


@dataclass(frozen=True, slots=True)
class Direct:
    """An unjournaled response: the caller runs the generation and sends its events as they come."""

    response_id: str
    generation: Generation


@dataclass(frozen=True, slots=True)
class Journaled:
    """A response in the journal. `run` is this process's producer of it (None when another process or a worker
    produces it, or for an Idempotency-Key retry); `queued` is a background response's object as created."""

    response_id: str
    run: ResponseRun | None = None
    queued: dict[str, Any] | None = None
    # When a stream of it must end with `router:stream.resume` if the response has not ended (opted-in callers).
    until: float = math.inf
    # Its caller can find it again before its first output reaches them (an Idempotency-Key retry attaches to it).
    findable: bool = False


async def first_output(created: Journaled) -> None:
    """Wait for a new foreground response's first output to be durable (`create_response` returns before): the
    caller may answer with it from then on. Raises the `Failure` of a response that nothing could be produced for,
    once its run is over (its upstream call, its failure's record). Cancelled while waiting (the client went away,
    the server shuts down): a response its caller can find again goes on into the journal, within the detached
    cap; any other is stopped, since nobody could ever read it."""
    run = created.run
    if run is None or created.queued is not None:  # a background response answers with its queued object
        return
    try:
        # Not shielded (a shield costs the first token a loop turn): a cancel here cancels `run.first`, which the
        # run then no longer signals.
        outcome = await run.first
    except asyncio.CancelledError:
        if created.findable:
            run.detach()
        else:
            await run.abort()
        raise
    if outcome.failure is not None:
        await run.stopped()
        raise outcome.failure


def served_model(runtime: Runtime, name: str | None) -> PublicModel:
    """The served model a request names: a 400 when it names none, a 404 when this router has no such model, a 503
    when it has one but every deployment of it is switched off (the message says why: no key, `enabled: false`)."""
    if not name:
        raise invalid("Missing required parameter: 'model'.", param="model", code="missing_required_parameter")
    model = runtime.config.model(name)
    if model is None:
        configured = runtime.config.configured_model(name)
        if configured is not None:
            raise Failure("unavailable", f"The model '{name}' is not available: every deployment of it is switched "
                          f"off in this router's configuration ({configured.why_off}).", param="model",
                          code="model_unavailable")
        raise Failure("not_found", f"The model '{name}' does not exist or you do not have access to it.",
                      param="model", code="model_not_found")
    return model


def _body_hash(raw: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


async def create_response(runtime: Runtime, parsed: ResponsesRequest, caller: Caller) -> Direct | Journaled:
    """Start a response. A journaled foreground response is returned as soon as its run has started: the caller
    awaits `first_output` before it answers (so a request that no deployment could answer is still a `Failure` of
    its own), and builds its answer meanwhile."""
    body = parsed.body
    model = served_model(runtime, body.model)
    store = runtime.store
    journaled = store is not None and body.store
    if body.background and not journaled:
        raise invalid("background responses need store: true (and a router with a store).", param="background")
    if body.previous_response_id is not None and store is None:
        raise invalid("previous_response_id needs a router with a store.", param="previous_response_id")
    body_hash = _body_hash(parsed.raw)
    if caller.idempotency_key is not None:
        if store is None or not journaled:
            raise invalid("Idempotency-Key needs store: true (and a router with a store).", param="Idempotency-Key")
        existing = await store.find_by_idempotency_key(caller.tenant, caller.idempotency_key)
        if existing is not None:
            return _attach(existing, body_hash, caller)
    context: list[dict[str, Any]] = []
    predecessor: Predecessor | None = None
    previous: ResponseHeader | None = None
    if body.previous_response_id is not None:
        context, previous = await _previous_context(runtime, caller.tenant, body.previous_response_id)
    request = parsed.to_ir(context=context,
                           expand_compaction=expand_compaction_for(caller.tenant, runtime.settings.compaction_key))
    if previous is not None:
        predecessor = _predecessor(previous, request)
    response_id = new_id("resp")
    logs.bind(correlation_id=response_id, tenant=caller.tenant, model=model.name)
    emitter = ResponseEmitter(response_skeleton(body, response_id, model.name),
                              hold_tool_arguments=runtime.settings.hold_tool_arguments)
    # An opted-in foreground stream is not bound to this call either: at the call's deadline its HTTP stream ends
    # with `router:stream.resume` and the generation goes on, handed to the worker on AWS, in this process
    # elsewhere. Other clients (and non-streamed calls) end `incomplete` at the deadline.
    hands_on = journaled and body.stream and not body.background and caller.recovery_events
    to_worker = hands_on and runtime.launch_background is not None
    options = GenerationOptions(
        queued=body.background,
        header_hold_seconds=HEADER_HOLD_SECONDS if body.stream and not body.background else math.inf,
        recovery_events=caller.recovery_events,
        hand_off_at_deadline=to_worker,
        explain=caller.explain,
    )
    if body.background:  # not bound to this call: it may run for the whole of the attempt loop's bounds
        run_deadline = time.time() + runtime.settings.max_total_seconds
    elif hands_on and not to_worker:
        run_deadline = _run_deadline(runtime, caller.deadline)
    else:
        run_deadline = caller.deadline
    control = RunControl(run_deadline)
    generation = runtime.generation(request, model.name, emitter, options, control, policy=caller.policy,
                                    predecessor=predecessor, account=Account(caller.tenant, caller.key_id))
    log.info("response created", extra={"response_id": response_id, "tenant": caller.tenant, "model": model.name,
                                         "stream": body.stream, "journaled": journaled})
    if store is None or not journaled:
        return Direct(response_id, generation)
    now = time.time()
    settings = runtime.settings
    header = ResponseHeader(
        id=response_id, tenant=caller.tenant, created_at=now, expires_at=now + settings.retention_seconds,
        status="queued" if body.background else "in_progress", lease_expires_at=now + settings.lease_seconds,
        request={**parsed.stored(context), "_recovery_events": caller.recovery_events, KEY_ID_FIELD: caller.key_id},
        idempotency_key=caller.idempotency_key, body_hash=body_hash, background=body.background,
    )
    if body.background:
        # Committed before anything else: `queued` is what a poll sees until a producer picks it up.
        attached = await _create_header(store, header, body_hash, caller)
        if attached is not None:
            return attached
        queued = dict(emitter.response, status="queued")
        if runtime.launch_background is not None:
            try:
                await runtime.launch_background(response_id, 0)
            except Exception:  # the client must still get its id: produce it here (a stale poll relaunches it)
                log.exception("worker launch failed; producing the background response in this process",
                              extra={"response_id": response_id})
            else:
                return Journaled(response_id, None, queued)
        return Journaled(response_id, ResponseRun(runtime, response_id, 0, generation, control).start(), queued)
    # A foreground response's upstream call does not wait for its header: the header is written with the first
    # batch of output, one commit before the first token (and a store that cannot write it answers as the run's
    # first outcome). With an Idempotency-Key the header must be findable before any output (a retry attaches to
    # it rather than call a model again): its create runs alongside the upstream call, and its outcome is answered
    # here, before the run's; a header that cannot be created cancels the run (and its upstream call).
    run = ResponseRun(runtime, response_id, 0, generation, control,
                      hand_on=runtime.launch_background if to_worker else None)
    attached = None
    try:
        if caller.idempotency_key is None:
            run.start(create=header)
            # Before this handler's answer is set up: a direct stream's handler, which awaits its generation's
            # first event, lets its upstream call go first too.
            await run.head_start()
        else:
            run.start(header=store.create(header))
            attached = await _create_header(store, header, body_hash, caller, run.header)
    except BaseException:  # the header failed, or the client went away: nobody could ever read this response
        await run.abort()
        raise
    if attached is not None:
        await run.abort()
        return attached
    return Journaled(response_id, run, until=caller.deadline if hands_on else math.inf,
                     findable=caller.idempotency_key is not None)


async def _create_header(store: Store, header: ResponseHeader, body_hash: str, caller: Caller,
                         created: Awaitable[None] | None = None) -> Journaled | None:
    """Create the response's header (or await `created`, its create already in flight). None once it exists; an
    Idempotency-Key retry that lost the race to another request with the same key is attached to that response."""
    try:
        await (store.create(header) if created is None else created)
    except AlreadyExists:
        existing = await store.find_by_idempotency_key(caller.tenant, caller.idempotency_key or "")
        if existing is None:
            raise Failure("conflict", "A request with this Idempotency-Key is being created.") from None
        return _attach(existing, body_hash, caller)
    except StoreError as exc:
        log.error("response header not created", extra={"response_id": header.id, "error": type(exc).__name__})
        raise Failure("unavailable", "The response store is unavailable; nothing was generated. Try again.",
                      code="store_unavailable") from None
    return None


def _run_deadline(runtime: Runtime, stream_deadline: float) -> float:
    """Where no worker takes a handed-on stream over, its generation goes on in this process past the stream's
    end (the same run, its epoch and lease unchanged), for as long as the worker's hops would give it."""
    return stream_deadline + HAND_ON_HOPS * runtime.settings.stream_deadline_seconds


def stream_until(header: ResponseHeader, caller: Caller) -> float:
    """When a stream of a stored response served to `caller` ends with `router:stream.resume` (if the response
    has not ended by then): the caller's deadline for a response created with recovery events, else never."""
    return caller.deadline if header.request.get("_recovery_events") else math.inf


def _attach(existing: ResponseHeader, body_hash: str, caller: Caller) -> Journaled:
    """A retried POST with the same Idempotency-Key: the same response, replayed from its start (never a second
    model call); the same key with another body is a conflict."""
    if existing.body_hash != body_hash:
        raise Failure("conflict", "This Idempotency-Key was used with a different request body.",
                      param="Idempotency-Key", code="idempotency_key_reused")
    return Journaled(existing.id, until=stream_until(existing, caller))


def _predecessor(previous: ResponseHeader, request: GenerationRequest) -> Predecessor | None:
    """Cache affinity: the deployment that served the previous response (its `router.served_by`), sharing with this
    request the prompt that was sent to it (instructions, tools and the previous input items)."""
    router = (previous.response or {}).get("router")
    served = router.get("served_by") if isinstance(router, dict) else None
    if not isinstance(served, str):
        return None
    return Predecessor(served, prefix_tokens(request, len(previous.request.get("input", []))), "previous_response_id")


async def _previous_context(runtime: Runtime, tenant: str, previous_id: str
                            ) -> tuple[list[dict[str, Any]], ResponseHeader]:
    """`prev.input + prev.output`, as input items, for `previous_response_id` (the caller's own responses only),
    and the previous response's header."""
    assert runtime.store is not None
    prev = await runtime.store.get(previous_id)
    if prev is None or prev.tenant != tenant:
        raise Failure("not_found", f"Previous response '{previous_id}' not found.", param="previous_response_id",
                      code="previous_response_not_found")
    if not prev.terminal or prev.response is None:
        raise Failure("conflict", f"Previous response '{previous_id}' is still in progress.",
                      param="previous_response_id", code="previous_response_in_progress")
    return list(prev.request.get("input", [])) + output_as_input(prev.response.get("output", [])), prev


async def final_response(runtime: Runtime, response_id: str, run: ResponseRun | None) -> dict[str, Any]:
    """The response object once it has ended (waiting for it, taking it over if its producer died)."""
    final: dict[str, Any] | None = None
    async for event in journal_events(runtime, response_id, -1, run):
        if event["type"] in TERMINAL_EVENT_TYPES:
            final = event["response"]
    if final is None:
        raise Failure("internal", "The response ended without a terminal event.", code="server_error")
    return final


async def run_direct(generation: Generation) -> dict[str, Any]:
    """An unjournaled, non-streaming response: run it to its end and return the final response object."""
    final: Event | None = None
    async for event in generation.run():
        if event["type"] in TERMINAL_EVENT_TYPES:
            final = event
    if final is None:
        raise Failure("internal", "The response ended without a terminal event.", code="server_error")
    response: dict[str, Any] = final["response"]
    return response


# -- stored responses ---------------------------------------------------------------------------------------------


async def owned_response(runtime: Runtime, response_id: str, tenant: str) -> ResponseHeader:
    """The tenant's own response; anything else (absent, expired, another tenant's) is the same 404."""
    if runtime.store is None:
        raise Failure("not_found", f"Response '{response_id}' not found (this router keeps no responses).",
                      param="response_id")
    header = await runtime.store.get(response_id)
    if header is None or header.tenant != tenant:
        raise Failure("not_found", f"Response '{response_id}' not found.", param="response_id")
    return header


async def snapshot(runtime: Runtime, header: ResponseHeader) -> dict[str, Any]:
    """The response object as it stands: the stored snapshot once terminal, else rebuilt from the journal (the
    output so far, an open content part with its text so far), or, before any event, from the stored request."""
    if header.terminal and header.response is not None:
        return header.response
    assert runtime.store is not None
    events = await runtime.store.read_events(header.id, -1)
    if not events:
        return dict(header.response or stored_skeleton(header), status=header.status)
    emitter = restore_emitter(events)
    emitter.response["status"] = header.status
    return emitter.snapshot()


async def poll_response(runtime: Runtime, response_id: str, tenant: str) -> dict[str, Any]:
    """A non-streaming GET: the response as it stands. A response nobody produces any more (its producer died,
    its lease expired) gets a new producer first, as a streaming reader would give it: the next polls see it go
    on. On AWS the worker takes it over (this invocation ends with its answer); elsewhere, or when the launch
    fails, this process does (`takeover.revive`)."""
    header = await owned_response(runtime, response_id, tenant)
    if nobody_produces(header):
        # Each stale poll launches the worker again (a duplicate is fenced); a failed launch produces it here.
        await revive(runtime, response_id, header.owner_epoch)
    return await snapshot(runtime, header)


INPUT_ITEMS_INCLUDE_ENCRYPTED = "reasoning.encrypted_content"


async def list_input_items(runtime: Runtime, response_id: str, tenant: str, *, limit: int, order: str,
                           after: str | None, include: list[str]) -> dict[str, Any]:
    """`GET /v1/responses/{id}/input_items`: the input items the request itself sent (not the previous_response_id
    chain it continued), each with its id, newest first for `order=desc`, a page of `limit` after the item `after`."""
    header = await owned_response(runtime, response_id, tenant)
    encrypted = INPUT_ITEMS_INCLUDE_ENCRYPTED in include
    items = [input_item_resource(item, f"{response_id}/{i}", encrypted_reasoning=encrypted)
             for i, item in enumerate(own_input(header.request))]
    if order == "desc":
        items.reverse()
    start = 0
    if after is not None:
        start = next((i + 1 for i, item in enumerate(items) if item["id"] == after), -1)
        if start < 0:
            raise invalid(f"No input item '{after}' in response '{response_id}'.", param="after")
    page = items[start:start + limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": start + limit < len(items)}


def check_cursor(header: ResponseHeader, after: int, param: str) -> int:
    """A resume cursor: -1 (from the start) up to the stream's last sequence number."""
    if not -1 <= after <= header.last_seq:
        raise invalid(f"{param} must be between -1 and {header.last_seq}, the last sequence number of this "
                      f"response's stream so far; got {after}.", param=param)
    return after


def follow_response(runtime: Runtime, response_id: str, after: int, run: ResponseRun | None = None, *,
                    until: float = math.inf) -> AsyncIterator[Event]:
    return journal_events(runtime, response_id, after, run, until=until)


async def cancel_response(runtime: Runtime, response_id: str, tenant: str) -> dict[str, Any]:
    """Stop generation wherever it runs (the owner sees the flag at its next commit) and return the response once
    it has ended, or as it stands after `CANCEL_WAIT_SECONDS`; a finished response is returned unchanged."""
    header = await owned_response(runtime, response_id, tenant)
    if not header.terminal:
        assert runtime.store is not None
        await runtime.store.request_cancel(response_id)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CANCEL_WAIT_SECONDS):
                async for _ in journal_events(runtime, response_id, header.last_seq):
                    pass
        header = await owned_response(runtime, response_id, tenant)
    return await snapshot(runtime, header)


async def delete_response(runtime: Runtime, response_id: str, tenant: str) -> None:
    header = await owned_response(runtime, response_id, tenant)
    assert runtime.store is not None
    if not header.terminal:
        await runtime.store.request_cancel(response_id)  # a running producer stops at its next commit
    await runtime.store.delete(response_id)
