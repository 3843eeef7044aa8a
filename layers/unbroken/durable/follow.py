"""Following a response's journal from any process: its committed events after a cursor, live until the terminal
one. A follower that finds the producer's lease expired (it was killed, or its invocation ended) takes the response
over, so a reader never waits on a response nobody is generating."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from unbroken.durable.producer import ResponseRun
from unbroken.durable.runtime import Runtime
from unbroken.durable.takeover import nobody_produces, take_over
from unbroken.journal.feed import follow
from unbroken.journal.store import TERMINAL_EVENT_TYPES


async def journal_events(runtime: Runtime, response_id: str, after: int, run: ResponseRun | None = None
                         ) -> AsyncIterator[dict[str, Any]]:
    """The response's committed events after `after`. `run` is this process's producer of it, if any: a journal it
    cannot write ends the follow with its error."""
    store = runtime.store
    assert store is not None
    last = after
    while True:
        try:
            async for event in follow(store, response_id, last, max_wait=runtime.settings.lease_seconds):
                last = event["sequence_number"]
                yield event
                if event["type"] in TERMINAL_EVENT_TYPES:
                    return
            return
        except TimeoutError:
            pass
        if run is not None and run.store_error is not None:
            raise run.store_error
        header = await store.get(response_id, snapshots=False)
        if header is None or header.terminal:
            continue  # follow ends at once for a finished response (or raises NotFound)
        if nobody_produces(header):
            run = await take_over(runtime, response_id, header.owner_epoch) or run


def failure_events(last_seq: int, message: str) -> list[dict[str, Any]]:
    """Events that close a stream whose journal cannot be written: not durable, but never a cut body."""
    return [
        {"type": "error", "sequence_number": last_seq + 1,
         "error": {"type": "server_error", "code": "journal_unavailable", "message": message, "param": None}},
    ]
