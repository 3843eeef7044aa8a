"""The worker Lambda's entry point: produce background responses and continue responses across invocations.

Events (events/README.md): `{"kind": "background" | "handoff", "response_id", "epoch", "hop"?}`. The worker claims
the response by a conditional takeover from `epoch` (so a duplicate or stale event does nothing), produces until
the response ends or the invocation is about to end, and then hands the rest to a fresh invocation of itself.
The same functions run locally in tests, with any store."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from unbroken import aws
from unbroken.api.identity import context_deadline
from unbroken.app import app_from_env
from unbroken.durable.runtime import Runtime
from unbroken.durable.takeover import take_over

log = logging.getLogger("unbroken.worker")

# Stop producing this long before the invocation's end: time to flush the journal and invoke the next worker.
HANDOFF_MARGIN_SECONDS = 30.0
MAX_HOPS = 8

_loop: asyncio.AbstractEventLoop | None = None
_runtime: Runtime | None = None


def invoke_worker(payload: dict[str, Any]) -> None:
    """Start another invocation of this worker."""
    aws.invoke_worker(os.environ["UNBROKEN_WORKER_FUNCTION"], payload)


async def run_event(runtime: Runtime, event: dict[str, Any], deadline: float,
                    invoke: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    kind = event.get("kind")
    response_id = str(event.get("response_id", ""))
    try:
        epoch = int(event.get("epoch", 0))
        hop = int(event.get("hop", 0))
    except (TypeError, ValueError):
        kind = None
    if kind not in ("background", "handoff") or not response_id:
        log.error("worker event not understood", extra={"kind": kind})
        return {"status": "ignored"}
    last_hop = hop >= MAX_HOPS
    run = await take_over(runtime, response_id, epoch, deadline=deadline - HANDOFF_MARGIN_SECONDS,
                          hand_off_at_deadline=not last_hop)
    if run is None:
        return {"status": "skipped", "response_id": response_id}
    assert run.task is not None
    await run.task
    if runtime.counters is not None:
        await runtime.counters.flush()  # spend (h-keys): in the store before Lambda freezes this environment
    if run.generation.handed_off:
        invoke({"kind": "handoff", "response_id": response_id, "epoch": run.epoch, "hop": hop + 1,
                "reason": "deadline"})
        return {"status": "handed_off", "response_id": response_id, "epoch": run.epoch}
    return {"status": "done", "response_id": response_id}


def handle_event(event: dict[str, Any], context: object) -> dict[str, Any]:
    """Lambda entry (functions/worker/handler.py). The runtime and its loop live as long as the container."""
    global _loop, _runtime
    if _loop is None:
        _loop = asyncio.new_event_loop()
    if _runtime is None:
        _runtime = app_from_env().state.runtime
    deadline = context_deadline(context, time.time()) or time.time() + 900
    return _loop.run_until_complete(run_event(_runtime, event, deadline, invoke_worker))
