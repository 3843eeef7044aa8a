"""Becoming the producer of a response another process started: a dead producer's response (its lease expired), a
background response a worker starts, or a handoff from an invocation that ran out of time."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from unbroken.durable.producer import ResponseRun
from unbroken.durable.runtime import Runtime
from unbroken.journal.feed import LOCAL_FEEDS
from unbroken.journal.store import Fenced, ResponseHeader
from unbroken.protocol.compaction import expand_compaction_for
from unbroken.protocol.request import ResponsesRequest, response_skeleton
from unbroken.protocol.responses import ResponseEmitter, restore_emitter
from unbroken.resilience.attempts import GenerationOptions, RunControl

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
    options = GenerationOptions(queued=header.background, header_hold_seconds=math.inf,
                                recovery_events=bool(header.request.get("_recovery_events")),
                                hand_off_at_deadline=hand_off_at_deadline)
    control = RunControl(deadline if deadline is not None else now + settings.stream_deadline_seconds)
    generation = runtime.generation(request, body.model or "", emitter, options, control)
    log.warning("taking over response", extra={"response_id": response_id, "epoch": epoch, "events": len(events)})
    return ResponseRun(runtime, response_id, epoch, generation, control).start()
