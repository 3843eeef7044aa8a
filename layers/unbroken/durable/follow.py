"""Following a response's journal from any process: its committed events after a cursor, live until the terminal
one. A follower that finds the producer's lease expired (it was killed, or its invocation ended) takes the response
over (on AWS by launching the worker Lambda; `takeover.revive`), so a reader never waits on a response nobody is
generating."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from typing import Any

from unbroken.durable.producer import ResponseRun
from unbroken.durable.runtime import Runtime
from unbroken.durable.takeover import nobody_produces, revive
from unbroken.journal.feed import follow
from unbroken.journal.store import TERMINAL_EVENT_TYPES

# How long a follower that reached its `until` waits for this process's producer to hand the response on (its
# last batch committed, the next owner launched) before it ends anyway.
HAND_ON_WAIT_SECONDS = 10.0


class HandedOn(Exception):
    """A follow ended at its `until`, before the terminal event: the response goes on (in the worker, or in this
    process past the HTTP stream's end) and is read on with `starting_after=last_seq`."""

    def __init__(self, last_seq: int) -> None:
        super().__init__(f"the stream ends here; resume after {last_seq}")
        self.last_seq = last_seq


async def journal_events(runtime: Runtime, response_id: str, after: int, run: ResponseRun | None = None, *,
                         until: float = math.inf) -> AsyncIterator[dict[str, Any]]:
    """The response's committed events after `after`. `run` is this process's producer of it, if any: a journal it
    cannot write ends the follow with its error. At `until` (the end of the HTTP stream this follow feeds) a
    response that has not ended raises `HandedOn`, once a `run` that hands off there has done so and its last
    events are yielded."""
    store = runtime.store
    assert store is not None
    last = after
    launched: int | None = None  # the epoch this follow asked the worker to take over from
    while True:
        try:
            wait = min(runtime.settings.lease_seconds, max(0.0, until - time.time()))
            async for event in follow(store, response_id, last, max_wait=wait):
                last = event["sequence_number"]
                yield event
                if event["type"] in TERMINAL_EVENT_TYPES:
                    return
            return
        except TimeoutError:
            pass
        if run is not None and run.store_error is not None:
            raise run.store_error
        if time.time() >= until:
            if run is not None and run.task is not None and run.generation.options.hand_off_at_deadline:
                await asyncio.wait({run.task}, timeout=HAND_ON_WAIT_SECONDS)  # it stops at the same deadline
            for event in await store.read_events(response_id, last):
                if event["sequence_number"] != last + 1:
                    break
                last = event["sequence_number"]
                yield event
                if event["type"] in TERMINAL_EVENT_TYPES:
                    return
            if run is not None and run.store_error is not None:
                raise run.store_error
            raise HandedOn(last)
        header = await store.get(response_id, snapshots=False)
        if header is None or header.terminal:
            continue  # follow ends at once for a finished response (or raises NotFound)
        if nobody_produces(header):
            # A worker launched a lease ago that has not claimed the epoch yet (throttled, queued): this process
            # produces it rather than keep the reader waiting; a worker that starts later is fenced.
            in_process = launched == header.owner_epoch
            launched = header.owner_epoch
            run = await revive(runtime, response_id, header.owner_epoch, in_process=in_process) or run


def failure_events(last_seq: int, message: str) -> list[dict[str, Any]]:
    """Events that close a stream whose journal cannot be written: not durable, but never a cut body."""
    return [
        {"type": "error", "sequence_number": last_seq + 1,
         "error": {"type": "server_error", "code": "journal_unavailable", "message": message, "param": None}},
    ]


RESUME_EVENT = "router:stream.resume"


def resume_events(response_id: str, last_seq: int) -> list[dict[str, Any]]:
    """What ends a stream handed on at its deadline, for clients that opted in to recovery events: the extension
    event telling them to reconnect with `starting_after`. It is not in the journal: its `sequence_number` is the
    last committed one (a replay never sends it, and a client that does not know it drops it as seen)."""
    return [{"type": RESUME_EVENT, "sequence_number": last_seq, "response_id": response_id,
             "starting_after": last_seq}]
