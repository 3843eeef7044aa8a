"""Write-ahead group commit: the only way the API layer writes a response's events.

The producer calls `emit` per event; that only appends to the open batch (no I/O, no serialisation of text deltas),
which is what keeps the per-token cost low. One committer task appends batches to the store in order, one append at
a time, and calls `on_commit(events)` only after the store has committed them: the API layer sends events to clients
from there, so nothing leaves the process before it is durable.

When the open batch goes out decides what a client waits for:
- at once if it holds the first content of an output item (`response.output_item.added`, or the item's first
  delta): the first token of a response, or of a tool call after a message, is never held for a batch window;
- at once if no commit is in flight and none went out in the last `batch_ms`: a quiet stream pays one commit;
- otherwise `batch_ms` after the last commit started, or when the commit in flight ends if that is later: what
  arrives while a commit is in flight gathers in the next batch. So a stream costs about one write per `batch_ms`
  plus a few per output item, and a delivered token waits at most `batch_ms` plus one commit.
"At once" is the committer's next loop turn, not inside `emit`: everything one upstream chunk produces in the same
turn up to the item's first delta (response.created, in_progress, the item, its part and that delta) goes out in one
append; `emit` of that delta yields the loop so that the commit, and what it wakes, go before the producer's next
work.
A writer may start before the response's header is in the store, so that the upstream call does not wait for it:
- `create=`: the header is not written yet; the writer's first commit writes it together with the first batch
  (`store.create(header, events)`), so the first token waits for one write, not for a create and then an append,
  and nothing of the response exists in the store before its first output does (lease renewals wait for it too).
  The writer prepares that create on its cue (`prepare_after`: once the producer's upstream request is out, while
  the call is in flight; `store.prepare`), so a large
  request's encoding and snapshot items are not on the first token's path either;
- `header=`: the store's `create` is in flight (a response with an Idempotency-Key, which must be findable before
  its first output); the first append waits for it, and its failure stops the writer as a store failure does.
Either way the header's write counts as the response's first commit, and the first batch's window starts with its
first event. So the start events (response.created, in_progress), which come from the upstream's first chunk
(OpenAI's role-only chunk, say), wait in the open batch for the first content to join them (the next chunk, usually)
instead of taking a commit of their own before the first token, however long the upstream took to that chunk.
A batch also closes at `batch_bytes`, `boundary()`, `flush()`, `set_status()` and the terminal event; closed batches
go out as soon as the committer is free, and closed batches that queue up behind a slow store go out together in one
append (group commit). The same task renews the lease when no commit did so for `lease_seconds / 3`.

A store failure (`Fenced`, `StoreUnavailable`, anything) stops the writer for good: what was pending is dropped, never
written, and the error is raised from the next `emit` / `boundary` / `finish` / `set_status` / `flush`.
Always end a writer with `finish` or `aclose` (or use it as an async context manager): its task renews the lease
until then.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from unbroken.journal.codec import TEXT_DELTA
from unbroken.journal.feed import LOCAL_FEEDS, LocalFeeds
from unbroken.journal.store import ResponseHeader, Store, StoreError

log = logging.getLogger("unbroken.journal")

OnCommit = Callable[[list[dict[str, Any]]], Awaitable[None] | None]

# Approximate serialized size of a text delta without its text: keys, ids, indices. Text deltas are the hot path, so
# their size is estimated rather than measured by serialising them.
_DELTA_OVERHEAD = 130
_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_ITEM_ADDED = "response.output_item.added"
_DELTA_SUFFIX = ".delta"  # output_text, refusal, reasoning, reasoning_summary_text, function_call_arguments...
# Window timers are armed this much early and a window counts as over this much early: the event loop wakes up to
# a millisecond late (epoll rounds its timeout up, the kernel adds its timer slack), and the batch then takes a few
# loop turns to its readers; the longest gap a stream shows is the latest of its windows, so without this it is
# `batch_ms` plus one commit plus that millisecond.
_TIMER_SLACK = 0.002


class WriterClosed(RuntimeError):
    """The writer was finished or closed; nothing more can be written through it."""


class _Batch:
    __slots__ = ("done", "events", "final", "response", "size", "status")

    def __init__(
        self,
        events: list[dict[str, Any]],
        size: int,
        *,
        status: str | None = None,
        response: dict[str, Any] | None = None,
        final: bool = False,
    ) -> None:
        self.events = events
        self.size = size
        self.status = status
        self.response = response
        self.final = final
        self.done: list[asyncio.Future[None]] = []


def _event_size(event: dict[str, Any]) -> int:
    if event.get("type") == TEXT_DELTA:
        delta = event.get("delta")
        if type(delta) is str:
            return len(delta) + _DELTA_OVERHEAD
    return len(_compact(event))


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
        future.add_done_callback(lambda f: f.exception())  # nobody may be waiting: no "never retrieved" noise


class JournalWriter:
    def __init__(
        self,
        store: Store,
        response_id: str,
        epoch: int,
        *,
        batch_bytes: int = 4096,
        batch_ms: float = 50.0,
        lease_seconds: float = 30.0,
        on_commit: OnCommit | None = None,
        feeds: LocalFeeds | None = None,
        max_pending_bytes: int | None = None,
        max_append_bytes: int | None = None,
        next_seq: int | None = None,
        header: Awaitable[None] | None = None,
        create: ResponseHeader | None = None,
        prepare_after: asyncio.Future[Any] | None = None,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        """`next_seq` is the sequence number of the first event this writer will write, when the caller knows it:
        in-process followers then need no store read to start following (`LocalFeeds.committed_after`).
        `header` is the response header's create, still in flight: nothing is appended before it has succeeded.
        `create` is the header itself, not yet written: the first commit creates it with the first batch; it is
        prepared once `prepare_after` is done (the producer's upstream request is out), or on the next loop turn
        without it.
        `on_failure(error)` is called once when a store failure stops the writer (the producer may be waiting on
        an upstream that sends nothing, and would otherwise learn of it only at its next `emit`)."""
        self._store = store
        self.response_id = response_id
        self.epoch = epoch
        self._batch_bytes = batch_bytes
        self._batch_s = batch_ms / 1000.0
        self._lease_seconds = lease_seconds
        self._renew_every = lease_seconds / 3.0
        self._on_commit = on_commit
        self._feeds = LOCAL_FEEDS if feeds is None else feeds
        # Backpressure: a producer faster than the store waits once this much is closed but not yet committed.
        self._max_pending = max_pending_bytes if max_pending_bytes is not None else max(64 * batch_bytes, 256 * 1024)
        # Group commit: when the store falls behind, closed batches waiting their turn go out in one append, up to
        # this size (one store write instead of many; the DynamoDB store still cuts items at 64 KB compressed).
        self._max_append = max_append_bytes if max_append_bytes is not None else 16 * batch_bytes
        self._loop = asyncio.get_running_loop()

        self._open: list[dict[str, Any]] = []
        self._open_bytes = 0
        self._open_status: str | None = None  # a status to commit with the open batch (`mark_status`)
        self._ready: deque[_Batch] = deque()
        self._ready_bytes = 0  # closed and not yet committed, the batch in flight included
        self._inflight: _Batch | None = None
        self._wake = asyncio.Event()
        self._space = asyncio.Event()
        self._error: BaseException | None = None
        self._finishing = False
        self._stopped = False
        self._cancel = False
        self._committed_seq: int | None = None
        self._lease_due = self._loop.time() + self._renew_every
        # The open batch holds the first content of an output item: it goes out on the committer's next turn.
        self._open_urgent = False
        # An output item started and none of its deltas was emitted yet (items come one after another).
        self._item_fresh = False
        self._header = None if header is None else asyncio.ensure_future(header)
        self._create = create
        # The header's create, prepared while the upstream call is in flight (`Store.prepare`: a large request is
        # encoded, and on DynamoDB its snapshot written, before the first output is there to wait for it). Started
        # on its cue, once the producer's upstream request is out (the writer starts first, and the encoding would
        # delay the request by as long); a first commit that comes before that creates the header unprepared, in
        # the same turn.
        self._prepared: asyncio.Future[ResponseHeader] | None = None
        self._prepare_waiting = create is not None  # for its cue; False once created unprepared, or closed
        if create is not None:
            if prepare_after is None:
                self._loop.call_soon(self._prepare_cued)
            else:
                prepare_after.add_done_callback(lambda _: self._prepare_cued())
        self._on_failure = on_failure
        # Loop time from which a batch that is not urgent may go out: `batch_ms` after the last append carrying
        # events started (lease renewals carry none and do not count). In the past at first: the first batch goes
        # at once; but while the header is not written (its write is the first commit), the first batch's window
        # starts with its first event (`_first_window`), so start events that come after a long wait for the
        # upstream's first chunk still wait for the first content (which usually follows at once) instead of
        # taking a commit of their own.
        self._window_end = float("-inf")
        self._first_window = header is not None or create is not None
        # Timers are loop callbacks, not timeouts in the committer: at most one window timer per batch, armed when
        # its first event finds the window still running; no task, no timer per token.
        self._batch_timer: asyncio.TimerHandle | None = None
        self._lease_timer: asyncio.TimerHandle | None = None
        self._feeds.writer_started(response_id, next_seq)
        self._task = self._loop.create_task(self._run(), name=f"journal-writer-{response_id}")

    # -- producer side ----------------------------------------------------------------------------------------------

    @property
    def cancel_requested(self) -> bool:
        """Whether a cancel was requested, as seen at the last commit or lease renewal."""
        return self._cancel

    @property
    def committed_seq(self) -> int | None:
        """The sequence number of the last event this writer committed (None before its first commit)."""
        return self._committed_seq

    @property
    def error(self) -> BaseException | None:
        return self._error

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self._finishing or self._stopped:
            raise WriterClosed(f"journal writer of {self.response_id} is finished")

    async def emit(self, event: dict[str, Any]) -> None:
        """Queue one event (it must carry the next `sequence_number`; do not mutate it afterwards)."""
        if self._error is not None or self._finishing or self._stopped:
            self._check()
        first = not self._open
        self._open.append(event)
        self._open_bytes += _event_size(event)
        kind = event.get("type")
        # Per token this is one string compare; the suffix test runs only between an item's start and its first
        # delta.
        first_content = False
        if kind == _ITEM_ADDED or (self._item_fresh and type(kind) is str and kind.endswith(_DELTA_SUFFIX)):
            first_content = kind != _ITEM_ADDED
            self._item_fresh = not first_content
            if not self._open_urgent:
                self._open_urgent = True
                self._cancel_batch_timer()
                self._wake.set()
        elif first:
            self._schedule_open()
        if self._open_bytes >= self._batch_bytes:
            self._close_open()
            if self._ready_bytes > self._max_pending:
                await self._wait_for_space()
        if first_content:
            # An item's first content is what a reader waits for (the first token): the producer lets the loop go
            # round twice before it goes on with the upstream's next bytes, once for the committer to take the
            # batch (a SQLite commit runs then and there), once for whoever that commit woke (the POST's status and
            # first frames, followers) to send it. Two loop turns per output item.
            await asyncio.sleep(0)
            await asyncio.sleep(0)

    async def boundary(self) -> None:
        """An item boundary: close the open batch now so that it commits without waiting for size or time."""
        self._check()
        if self._open:
            self._close_open()

    async def flush(self) -> None:
        """Wait until everything emitted so far is committed (and passed to on_commit)."""
        self._check()
        if self._open:
            batch = self._close_open()
        elif self._ready:
            batch = self._ready[-1]
        elif self._inflight is not None:
            batch = self._inflight
        else:
            return
        await self._wait_for(batch)

    def mark_status(self, status: str) -> None:
        """Commit `status` with the open batch, which the next `emit` joins if none is open: no commit of its own
        and no wait, e.g. a queued response's `in_progress` in the batch of its `response.in_progress` event."""
        self._check()
        self._open_status = status

    async def set_status(self, status: str, response: dict[str, Any] | None = None) -> None:
        """Commit a status (and optionally a response snapshot) after what was emitted so far; waits for it."""
        self._check()
        await self._wait_for(self._close_open(status=status, response=response))

    async def finish(self, terminal_event: dict[str, Any], *, status: str, response: dict[str, Any]) -> None:
        """Commit everything pending plus the terminal event, with the final status and response, atomically in the
        last batch. Returns once it is committed and passed to on_commit; the writer is then closed."""
        self._check()
        self._open.append(terminal_event)
        self._open_bytes += _event_size(terminal_event)
        batch = self._close_open(status=status, response=response, final=True)
        self._finishing = True
        try:
            await self._wait_for(batch)
            await self._task
        finally:
            self._stop()

    async def aclose(self) -> None:
        """Stop at once. Nothing pending is committed (a commit already in flight may still land)."""
        if not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._drop(self._error or WriterClosed(f"journal writer of {self.response_id} was closed"))
        self._stop()

    async def __aenter__(self) -> JournalWriter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- internals --------------------------------------------------------------------------------------------------

    def _close_open(
        self, *, status: str | None = None, response: dict[str, Any] | None = None, final: bool = False
    ) -> _Batch:
        self._cancel_batch_timer()
        if status is None:
            status = self._open_status
        self._open_status = None
        batch = _Batch(self._open, self._open_bytes, status=status, response=response, final=final)
        self._open = []
        self._open_bytes = 0
        self._open_urgent = False
        self._ready.append(batch)
        self._ready_bytes += batch.size
        self._wake.set()
        return batch

    def _prepare_cued(self) -> None:
        if self._prepare_waiting:
            self._start_prepare()

    def _start_prepare(self) -> asyncio.Future[ResponseHeader]:
        self._prepare_waiting = False
        if self._prepared is None:
            assert self._create is not None
            self._prepared = asyncio.ensure_future(self._store.prepare(self._create))
            self._prepared.add_done_callback(lambda f: f.cancelled() or f.exception())  # read at the first commit
        return self._prepared

    def _cancel_batch_timer(self) -> None:
        if self._batch_timer is not None:
            self._batch_timer.cancel()
            self._batch_timer = None

    def _schedule_open(self) -> None:
        # The first event of a batch that is not urgent: one clock read per batch, not per token.
        if self._first_window:
            self._first_window = False
            self._window_end = self._loop.time() + self._batch_s
        if self._loop.time() >= self._window_end - _TIMER_SLACK:
            # Window over: the committer takes the batch on its next turn, or right after the commit in flight
            # (it looks at the open batch before it waits again).
            self._wake.set()
        elif self._batch_timer is None:
            self._batch_timer = self._loop.call_at(self._window_end - _TIMER_SLACK, self._window_over)

    def _window_over(self) -> None:
        # Only wakes the committer, which decides: a commit that started since the timer was armed moved the window
        # on, and the committer then arms a new timer for it.
        self._batch_timer = None
        self._wake.set()

    def _open_due(self) -> bool:
        if not self._open:
            return False
        if self._open_urgent:
            return True
        # Closed batches go first; the open batch is newer and waits for the window their commit starts.
        return not self._ready and self._loop.time() >= self._window_end - _TIMER_SLACK

    def _lease_tick(self) -> None:
        self._lease_timer = None
        self._wake.set()

    async def _wait_for(self, batch: _Batch) -> None:
        future: asyncio.Future[None] = self._loop.create_future()
        batch.done.append(future)
        if self._error is not None:  # failed between closing the batch and now
            _settle(future, self._error)
        await future

    async def _wait_for_space(self) -> None:
        while self._ready_bytes > self._max_pending and self._error is None and not self._stopped:
            self._space.clear()
            await self._space.wait()
        if self._error is not None:
            raise self._error

    def _stop(self, error: BaseException | None = None) -> None:
        for timer in (self._batch_timer, self._lease_timer):
            if timer is not None:
                timer.cancel()
        self._prepare_waiting = False
        if self._prepared is not None and self._create is not None:
            self._prepared.cancel()  # never created: what a prepare wrote is unreferenced and expires
        self._batch_timer = self._lease_timer = None
        if not self._stopped:
            self._stopped = True
            self._feeds.writer_stopped(self.response_id, error)

    def _drop(self, error: BaseException) -> None:
        self._open = []
        self._open_bytes = 0
        self._open_urgent = False
        if self._inflight is not None:
            for future in self._inflight.done:
                _settle(future, error)
            self._inflight = None
        while self._ready:
            for future in self._ready.popleft().done:
                _settle(future, error)
        self._ready_bytes = 0
        self._space.set()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._drop(error)
        self._stop(error)
        if self._on_failure is not None:
            self._on_failure(error)

    async def _run(self) -> None:
        loop = self._loop
        try:
            if self._header is not None:
                await self._header_created(self._header)
            while True:  # ends at the final batch, on an error, or when cancelled by aclose
                if self._open_due():
                    self._close_open()
                if self._ready:
                    batch = self._inflight = self._take()
                    if batch.events:
                        self._window_end = loop.time() + self._batch_s
                        self._first_window = False
                    await self._commit(batch)
                    self._inflight = None
                    self._ready_bytes -= batch.size
                    if self._ready_bytes <= self._max_pending:
                        self._space.set()
                    for future in batch.done:
                        _settle(future, None)
                    if batch.final:
                        return
                    continue
                # 1 ms of slack: a timer may run a hair before loop.time() reaches its due time.
                if loop.time() >= self._lease_due - 0.001:
                    if self._open:  # a batch renews the lease as well as an empty append, and is one write
                        self._close_open()
                    else:
                        await self._renew()
                    continue
                if self._lease_timer is None:  # at most one pending; it re-arms here if commits moved the due time
                    self._lease_timer = loop.call_at(self._lease_due, self._lease_tick)
                if self._open and self._batch_timer is None:  # not due yet: wake at the end of the window
                    self._batch_timer = loop.call_at(self._window_end - _TIMER_SLACK, self._window_over)
                self._wake.clear()
                await self._wake.wait()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not self.header_failed():  # that one is logged and answered by whoever created the header
                log.warning("journal writer of %s stopped: %r", self.response_id, exc)
            self._fail(exc)

    def header_failed(self) -> bool:
        """True when the header's create given to this writer failed (or was cancelled): the writer stopped on it."""
        header = self._header
        return header is not None and header.done() and (header.cancelled() or header.exception() is not None)

    async def _header_created(self, header: asyncio.Future[None]) -> None:
        try:
            # Shielded: closing this writer must not cancel the create, which its caller awaits too.
            await asyncio.shield(header)
        except asyncio.CancelledError:
            if not header.cancelled():
                raise  # this writer was closed
            raise StoreError(f"the header of {self.response_id} was not created (cancelled)") from None
        self._lease_due = self._loop.time() + self._renew_every  # the create set the lease

    def _take(self) -> _Batch:
        """The next append: the oldest closed batch, merged with the ones behind it while they fit. A batch carrying
        a status / response / the terminal event ends the merge, so header updates keep their place."""
        batch = self._ready.popleft()
        if not self._ready or batch.status is not None or batch.response is not None or batch.final:
            return batch
        merged = _Batch(list(batch.events), batch.size)
        merged.done = list(batch.done)
        while self._ready and merged.size + self._ready[0].size <= self._max_append:
            nxt = self._ready.popleft()
            merged.events += nxt.events
            merged.size += nxt.size
            merged.done += nxt.done
            if nxt.status is not None or nxt.response is not None or nxt.final:
                merged.status, merged.response, merged.final = nxt.status, nxt.response, nxt.final
                break
        return merged

    async def _commit(self, batch: _Batch) -> None:
        if self._create is not None:
            if self._prepare_waiting:  # not started (a fast upstream): the create does it all, at once
                self._prepare_waiting = False
                prepared = self._create
            else:
                prepared = await self._start_prepare()  # done, or its write still in flight
            header = dataclasses.replace(prepared, lease_expires_at=time.time() + self._lease_seconds)
            if batch.status is not None:
                header.status = batch.status
            if batch.response is not None:
                header.response = batch.response
            await self._store.create(header, batch.events)
            self._create = None
        else:
            self._cancel = await self._store.append(
                self.response_id,
                self.epoch,
                batch.events,
                lease_expires_at=time.time() + self._lease_seconds,
                status=batch.status,
                response=batch.response,
            )
        self._lease_due = self._loop.time() + self._renew_every
        if not batch.events:
            return
        self._committed_seq = batch.events[-1]["sequence_number"]
        self._feeds.publish(self.response_id, batch.events)
        if self._on_commit is not None:
            try:
                result = self._on_commit(batch.events)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                # The batch is durable whatever the consumer did with it; a resume will replay it.
                log.exception("on_commit of %s failed", self.response_id)

    async def _renew(self) -> None:
        if self._create is not None:  # nothing in the store yet, so no lease to renew: it starts with the create
            self._lease_due = self._loop.time() + self._renew_every
            return
        self._cancel = await self._store.append(
            self.response_id, self.epoch, [], lease_expires_at=time.time() + self._lease_seconds
        )
        self._lease_due = self._loop.time() + self._renew_every
