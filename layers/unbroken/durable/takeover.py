"""Becoming the producer of a response another process started: a dead producer's response (its lease expired), a
background response a worker starts, or a handoff from an invocation that ran out of time. `revive` decides where a
reader's takeover runs: in the worker Lambda when the runtime launches one (AWS), else in the reader's process."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from unbroken import logs
from unbroken.config import PublicModel
from unbroken.durable import spend
from unbroken.durable.producer import ResponseRun
from unbroken.durable.runtime import Runtime
from unbroken.ir import GenerationRequest
from unbroken.journal.feed import LOCAL_FEEDS
from unbroken.journal.store import Fenced, ResponseHeader
from unbroken.protocol.compaction import expand_compaction_for
from unbroken.protocol.request import ResponsesRequest, response_skeleton
from unbroken.protocol.responses import Event, ResponseEmitter, restore_emitter, streamed_chars
from unbroken.resilience.attempts import GenerationOptions, RunControl, unrecorded_attempt

log = logging.getLogger("unbroken.producer")


def header_is_stale(header: ResponseHeader, now: float) -> bool:
    """A non-terminal response whose producer stopped renewing its lease: nobody is generating it."""
    return not header.terminal and header.lease_expires_at < now


def nobody_produces(header: ResponseHeader) -> bool:
    """Its lease expired and no writer of it runs in this process: the response needs a new producer."""
    return header_is_stale(header, time.time()) and not LOCAL_FEEDS.has_writer(header.id)


def stored_skeleton(header: ResponseHeader, parsed: ResponsesRequest | None = None) -> dict[str, Any]:
    """The response object before any output, rebuilt from the stored request as its creator built it."""
    body = (parsed or ResponsesRequest.from_stored(header.request)).body
    skeleton = response_skeleton(body, header.id, body.model or "")
    skeleton["created_at"] = int(header.created_at)
    return skeleton


async def take_over(runtime: Runtime, response_id: str, expected_epoch: int, *,
                    deadline: float | None = None, hand_off_at_deadline: bool = False) -> ResponseRun | None:
    """Bump the epoch (conditional), rebuild the partial output from the journal and continue it. None if another
    process got there first or the response finished meanwhile."""
    store = runtime.store
    assert store is not None
    settings = runtime.settings
    now = time.time()
    try:
        epoch = await store.take_over(response_id, expected_epoch, now + settings.lease_seconds)
    except Fenced:
        return None
    header = await store.get(response_id)
    if header is None:
        return None
    events = await store.read_events(response_id, -1)
    parsed = ResponsesRequest.from_stored(header.request)
    body = parsed.body
    if events:
        emitter = restore_emitter(events, hold_tool_arguments=settings.hold_tool_arguments)
    else:  # nothing was produced yet (a queued background response): start it as its creator would have
        emitter = ResponseEmitter(stored_skeleton(header, parsed), hold_tool_arguments=settings.hold_tool_arguments)
    request = parsed.to_ir(expand_compaction=expand_compaction_for(header.tenant, settings.compaction_key))
    model = runtime.config.model(body.model or "")
    key_id = header.request.get(spend.KEY_ID_FIELD)
    account = spend.Account(header.tenant, key_id if isinstance(key_id, str) else None)
    if model is not None:
        emitter.previous_attempts = previous_attempts(header, events, request, model)
        unrecorded = emitter.previous_attempts[len(_recorded(header)):]
        if unrecorded and runtime.counters is not None:  # a dead owner's estimated work: charged by its heir
            spend.charge(runtime.counters, account, model.name, map(spend.charge_of, unrecorded), now)
    logs.bind(correlation_id=response_id, tenant=header.tenant, model=body.model)
    options = GenerationOptions(queued=header.background, header_hold_seconds=math.inf,
                                recovery_events=bool(header.request.get("_recovery_events")),
                                hand_off_at_deadline=hand_off_at_deadline)
    control = RunControl(deadline if deadline is not None else now + settings.stream_deadline_seconds)
    generation = runtime.generation(request, body.model or "", emitter, options, control, account=account)
    log.warning("taking over response", extra={"response_id": response_id, "epoch": epoch, "events": len(events)})
    return ResponseRun(runtime, response_id, epoch, generation, control).start()


async def revive(runtime: Runtime, response_id: str, epoch: int, *, in_process: bool = False) -> ResponseRun | None:
    """Give a response nobody produces (found by a reader at `epoch`) a new producer. With a worker launcher (AWS)
    the worker Lambda takes it over (an asynchronous invoke: the generation is bound to no reader's invocation, the
    reader follows the journal) and this returns None; a duplicate launch is fenced by the epoch, harmless. Without
    one, with `in_process`, or when the launch fails (the response must not stay without a producer because Lambda
    refused an invoke), this process takes it over: the run, or None if another reader got there first."""
    launch = runtime.launch_background
    if launch is not None and not in_process:
        try:
            await launch(response_id, epoch)
        except Exception:  # any launch failure (throttled, denied, network): produce here instead
            log.exception("worker launch failed; taking the response over in this process",
                          extra={"response_id": response_id, "epoch": epoch})
        else:
            log.info("takeover handed to the worker", extra={"response_id": response_id, "epoch": epoch})
            return None
    return await take_over(runtime, response_id, epoch)


def previous_attempts(header: ResponseHeader, events: list[Event], request: GenerationRequest,
                      model: PublicModel) -> list[dict[str, Any]]:
    """What earlier owners did, for the new owner's accounting to add to: the attempts an owner recorded when it
    handed off (the header's snapshot, `router.journaled_through`), plus one estimated attempt for the output
    journaled after that, which an owner that died mid-attempt never recorded (priced at the deployment the
    recorded attempts last used, else at the model's first)."""
    recorded = (header.response or {}).get("router") if not header.terminal else None
    attempts = _recorded(header)
    through = int(recorded.get("journaled_through", -1)) if isinstance(recorded, dict) else -1
    chars = streamed_chars(events, after=through)
    if chars and model.deployments:
        last = attempts[-1]["deployment"] if attempts else None
        deployment = next((d for d in model.deployments if d.name == last), model.deployments[0])
        attempts.append(unrecorded_attempt(request, deployment, chars))
    return attempts


def _recorded(header: ResponseHeader) -> list[dict[str, Any]]:
    """The attempts earlier owners recorded when they handed the response on (already charged by them)."""
    recorded = (header.response or {}).get("router") if not header.terminal else None
    return list(recorded.get("attempts") or []) if isinstance(recorded, dict) else []
