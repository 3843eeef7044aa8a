"""Running one response's generation into the journal.

`ResponseRun` owns a generation task: it feeds every event the attempt loop emits to a `JournalWriter` (group commit,
fenced by the owner epoch), so clients — followers of the journal, in this process or another — only ever see
committed events. The first outcome (the first batch of output is durable, or nothing could be produced) is
signalled separately, so the POST handler can still answer a request that failed before any output with an error of
its own, and sends nothing, not even its status, before the response's header and first batch are durable.

Whatever happens, a response the run owns ends in a terminal state in the journal: completed, incomplete, or
`failed` when nothing could be produced or the router itself failed. Only a store that cannot be written (or a
newer owner) leaves it to the next owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from unbroken.durable.runtime import BackgroundLauncher, Runtime
from unbroken.errors import Failure
from unbroken.journal.store import TERMINAL_EVENT_TYPES, Fenced, ResponseHeader, StoreError
from unbroken.journal.writer import JournalWriter
from unbroken.protocol.responses import Event
from unbroken.providers.base import REQUEST_WRITTEN
from unbroken.resilience.attempts import Generation, NoOutput, RunControl

log = logging.getLogger("unbroken.producer")

ROUTER_FAILED = "The router failed while generating this response."


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """What the POST handler waits for: output started (failure None), or why nothing was produced."""

    failure: Failure | None = None


def _store_unavailable() -> Failure:
    return Failure("unavailable", "The response store is unavailable; the response could not be recorded. Try again.",
                   code="store_unavailable")


def _task_name(response_id: str) -> str:
    return f"produce {response_id}"


def crash_producer(runtime: Runtime, response_id: str) -> bool:
    """Stop this process's producer of the response as a crash would, for demonstrations (`unbroken serve
    --demo-controls`): its task is cancelled, nothing pending is committed, no terminal event is written and the
    lease is no longer renewed, so a reader of the response takes it over once the lease expires. False when no
    producer of it runs in this process."""
    tasks = [t for t in runtime.tasks if t.get_name() == _task_name(response_id) and not t.done()]
    for task in tasks:
        task.cancel()
    return bool(tasks)


class ResponseRun:
    def __init__(self, runtime: Runtime, response_id: str, epoch: int, generation: Generation,
                 control: RunControl, *, hand_on: BackgroundLauncher | None = None) -> None:
        self.runtime = runtime
        self.response_id = response_id
        self.epoch = epoch
        self.generation = generation
        self.control = control
        self.first: asyncio.Future[RunOutcome] = asyncio.get_running_loop().create_future()
        # Done once the run's upstream request is out, or the run cannot get there (`head_start`).
        self.request_out: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.first_batch: list[Event] = []  # the events of the first commit (read-only: followers share them)
        self.task: asyncio.Task[None] | None = None
        # Set when the journal could not be written: followers end with an error event of their own.
        self.store_error: BaseException | None = None
        # Who continues a generation that hands off at its deadline (the worker Lambda, from this run's epoch).
        self.hand_on = hand_on
        # The header's create when it is still in flight as the run starts (`start(header=...)`).
        self.header: asyncio.Future[None] | None = None
        # The header not yet written (`start(create=...)`): the run's first commit writes it with the first batch.
        self._create: ResponseHeader | None = None
        self._journaled = False  # an event of the generation went to the writer

    def start(self, *, header: Coroutine[Any, Any, None] | None = None,
              create: ResponseHeader | None = None) -> ResponseRun:
        """Start the run's task. When the upstream call is not to wait for the response's header:
        - `create` is the header, which the run's first commit writes together with the first batch of output (one
          write before the first token, and none before the upstream call); its failure is the run's `first`;
        - `header` is its create, already started: it runs right after the run's task (so the upstream request
          goes out before the create's signing and I/O), the run's writer appends nothing before it has succeeded,
          and whoever started the run awaits `self.header` and answers its failure (`abort`)."""
        self._create = create
        self.task = self.runtime.spawn(self._run(), name=_task_name(self.response_id))
        self.task.add_done_callback(lambda _: self._request_written())  # also a run cancelled before its first turn
        if header is not None:
            self.header = asyncio.ensure_future(header)
        return self

    async def head_start(self) -> None:
        """Let the run go first until its upstream request is out (its adapter says so: `request_written`), or it
        cannot get that far (its first outcome, or its end). So the caller's work (the handler's answer, the
        server's call of it) does not come between the request and its socket: counting loop turns instead, the
        request went out a few tenths of a millisecond later on a journaled stream than on a direct one, whose
        handler waits for its first event."""
        await asyncio.shield(self.request_out)

    def _request_written(self) -> None:
        if not self.request_out.done():
            self.request_out.set_result(None)

    def detach(self) -> None:
        """The client went away: finish into the journal, but within the detached cap (and end there, not hand
        the response on)."""
        self.control.shorten_to(time.time() + self.runtime.settings.detached_cap_seconds)
        self.control.hand_off = False

    def _signal(self, outcome: RunOutcome) -> None:
        self._request_written()  # as far as a run gets before its first outcome
        if not self.first.done():
            self.first.set_result(outcome)

    async def _run(self) -> None:
        REQUEST_WRITTEN.set(self._request_written)  # this task's context, and its attempts' (they copy it)
        settings = self.runtime.settings
        assert self.runtime.store is not None
        writer = JournalWriter(self.runtime.store, self.response_id, self.epoch,
                               batch_bytes=settings.journal_batch_bytes, batch_ms=settings.journal_batch_ms,
                               lease_seconds=settings.lease_seconds, next_seq=self.generation.emitter.seq,
                               header=self.header, create=self._create, prepare_after=self.request_out,
                               on_commit=self._committed,
                               on_failure=self._writer_failed)
        self.control.cancelled = lambda: writer.cancel_requested
        handed_off = False
        try:
            # Closed however the loop is left: a cancel that finds the run in `_write` (the writer yields the loop
            # at an item's first content, or waits for room) closes the upstream call now, not at collection.
            async with contextlib.aclosing(self.generation.run()) as events:
                async for event in events:
                    if await self._write(writer, event):
                        return
            # A handoff: the next owner continues from what is committed, and adds to the attempts recorded here.
            emitter = self.generation.emitter
            snapshot = emitter.snapshot()
            snapshot["router"] = self.generation.accounting()
            await writer.set_status(snapshot.get("status") or "in_progress", snapshot)
            handed_off = True
        except NoOutput as exc:
            self._signal(RunOutcome(exc.failure))
            await self._end_failed(writer, exc.failure.code or "upstream_error", exc.failure.message)
        except Fenced:
            log.warning("producer fenced: another process owns the response", extra={"response_id": self.response_id})
        except StoreError as exc:
            # Nothing that is not durable goes out: followers of this run end with an error event of their own, and
            # a POST still waiting for the first batch answers with an error.
            self.store_error = exc
            self._signal(RunOutcome(_store_unavailable()))
            if not writer.header_failed():  # that one is answered (and logged) by whoever created the header
                log.error("journal unavailable", extra={"response_id": self.response_id,
                                                        "error": type(exc).__name__})
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A bug below: one log line here, and a terminal `response.failed` in the journal, so every reader, a
            # resume and an Idempotency-Key retry all see the same ending instead of a response in progress forever.
            log.error("generation crashed", exc_info=exc, extra={"response_id": self.response_id,
                                                                 "error": type(exc).__name__})
            self._signal(RunOutcome(Failure("internal", "The router failed before producing any output.")))
            await self._end_failed(writer, "server_error", ROUTER_FAILED)
        finally:
            self._signal(RunOutcome(Failure("internal", "The router failed before producing any output.")))
            await writer.aclose()
        if handed_off and self.hand_on is not None:
            await self._hand_on(self.hand_on)

    def _writer_failed(self, error: BaseException) -> None:
        """The journal cannot be written. Before the first output (the header written with the first batch could
        not be), the POST is answered now and the upstream call stops, even if the upstream sends nothing more;
        later, the run learns of it at its next write."""
        answered = self.first.done() and not self.first.cancelled()  # cancelled: its POST went away
        if answered or self.task is None or isinstance(error, Fenced):
            return
        self.store_error = error
        self._signal(RunOutcome(_store_unavailable()))
        self.task.cancel()

    def _committed(self, events: list[Event]) -> None:
        if not self.first.done():  # the first batch is durable: the POST may answer, starting with it
            self.first_batch = events
            self._signal(RunOutcome())

    async def abort(self) -> None:
        """Stop the run before anything of it was committed (its header could not be created): the upstream call
        is cancelled, nothing is written."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task

    async def stopped(self) -> None:
        """Wait for a run whose first outcome was a failure to end: it records the failure in its header, or (a
        store that cannot be written) it has been cancelled. A caller cancelled meanwhile stops the run too."""
        if self.task is None or self.task.done():
            return
        try:
            await asyncio.shield(self.task)
        except asyncio.CancelledError:
            if self.task.done():  # the run's own cancellation, not this caller's
                return
            self.task.cancel()
            raise
        except Exception:
            return  # the run logged its own failure

    async def _hand_on(self, launch: BackgroundLauncher) -> None:
        """Start the next owner once everything is committed and this writer has stopped. It takes over from this
        run's epoch (a conditional write): a reader that took the response over first fences it, harmlessly. If
        the launch fails, the lease expires and the next reader or poll takes the response over."""
        try:
            await launch(self.response_id, self.epoch)
        except Exception as exc:
            log.error("could not hand the response on", extra={"response_id": self.response_id,
                                                               "error": type(exc).__name__})
        else:
            log.info("response handed on", extra={"response_id": self.response_id, "epoch": self.epoch})

    async def _write(self, writer: JournalWriter, event: Event) -> bool:
        """Journal one event; True once the terminal one is committed."""
        if event["type"] in TERMINAL_EVENT_TYPES:
            emitter = self.generation.emitter
            await writer.finish(event, status=emitter.response["status"], response=emitter.snapshot())
            return True
        self._journaled = True
        if event["type"] == "response.in_progress":
            writer.mark_status("in_progress")  # the header leaves `queued` in the batch that holds this event
        await writer.emit(event)
        if event["type"] == "response.output_item.done":
            await writer.boundary()
        return False

    async def _end_failed(self, writer: JournalWriter, code: str, message: str) -> None:
        """Close the response as failed: in the stream if it had started, else in its header alone (the POST
        answers with the failure itself, and a later reader finds the response failed)."""
        emitter = self.generation.emitter
        try:
            # Nothing journaled (a crash may come after the emitter made start events it never yielded): the
            # header alone says failed.
            if emitter.seq == 0 or not self._journaled:
                failed = dict(emitter.response, status="failed", error={"code": code, "message": message})
                await writer.set_status("failed", failed)
                return
            if emitter.closed:
                return  # the terminal event was produced; only its commit failed, and that raised StoreError
            *events, terminal = emitter.fail(code, message)
            for event in events:
                await writer.emit(event)
            await writer.finish(terminal, status="failed", response=emitter.snapshot())
        except Fenced:
            pass
        except StoreError as exc:
            self.store_error = exc
        except Exception as exc:  # the failure path must not fail the task: followers would wait for the lease
            self.store_error = exc
            with contextlib.suppress(Exception):
                log.error("could not record the failure", extra={"response_id": self.response_id,
                                                                 "error": type(exc).__name__})
