"""JournalWriter (group commit, fencing, failures, lease) and follow() (local push and cross-process polling).

The store wrapper below lets a test hold a commit (gate, or one permit per commit), fail it, or see each attempt and
commit through queues, so every wait is on an event with a bound, never on wall-clock time. Tests of when a batch goes
out run on a fake loop clock (`clock`) that only the test moves."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from unbroken.journal.feed import LocalFeeds, follow, is_terminal_event
from unbroken.journal.memory import MemoryStore
from unbroken.journal.sqlite import SQLiteStore
from unbroken.journal.store import (
    AlreadyExists,
    Fenced,
    NotFound,
    Record,
    ResponseHeader,
    Store,
    StoreError,
    StoreUnavailable,
)
from unbroken.journal.writer import JournalWriter, WriterClosed

BOUND = 10.0  # seconds: an upper bound on waits that normally take milliseconds; never a performance assertion
NEVER = 3_600_000.0  # batch_ms that never fires during a test


@dataclass
class Call:
    events: list[dict[str, Any]]
    lease_expires_at: float | None
    status: str | None
    response: dict[str, Any] | None


class ControlledStore(Store):
    """Wraps a store; `append` can be held (`gate`, or `permits`: one per append), made to fail (`fail_with`), and
    is observable (queues; `durable_seq` is the last sequence number the inner store committed)."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.stats = inner.stats
        self.gate: asyncio.Event | None = None
        self.permits: asyncio.Semaphore | None = None
        self.durable_seq = -1
        self.fail_with: BaseException | None = None
        self.attempted: asyncio.Queue[Call] = asyncio.Queue()
        self.committed: asyncio.Queue[Call] = asyncio.Queue()
        self.failures: asyncio.Queue[BaseException] = asyncio.Queue()
        self.commits: list[Call] = []

    async def next_commit(self) -> Call:
        return await asyncio.wait_for(self.committed.get(), BOUND)

    async def next_attempt(self) -> Call:
        return await asyncio.wait_for(self.attempted.get(), BOUND)

    async def append(
        self,
        response_id: str,
        epoch: int,
        events: list[dict[str, Any]],
        *,
        lease_expires_at: float | None = None,
        status: str | None = None,
        response: dict[str, Any] | None = None,
    ) -> bool:
        call = Call(list(events), lease_expires_at, status, response)
        self.attempted.put_nowait(call)
        if self.gate is not None:
            await asyncio.wait_for(self.gate.wait(), BOUND)
        if self.permits is not None:
            await asyncio.wait_for(self.permits.acquire(), BOUND)
        try:
            if self.fail_with is not None:
                raise self.fail_with
            result = await self.inner.append(
                response_id, epoch, events, lease_expires_at=lease_expires_at, status=status, response=response
            )
        except BaseException as exc:
            # Seen by the test in the same loop step in which the writer handles the error.
            self.failures.put_nowait(exc)
            raise
        if events:
            self.durable_seq = events[-1]["sequence_number"]
        self.commits.append(call)
        self.committed.put_nowait(call)
        return result

    async def create(self, header: ResponseHeader, events: list[dict[str, Any]] | None = None) -> None:
        await self.inner.create(header, events)
        if events:
            call = Call(list(events), header.lease_expires_at, header.status, header.response)
            self.durable_seq = events[-1]["sequence_number"]
            self.commits.append(call)
            self.committed.put_nowait(call)

    async def get(self, response_id: str, *, snapshots: bool = True) -> ResponseHeader | None:
        return await self.inner.get(response_id, snapshots=snapshots)

    async def find_by_idempotency_key(self, tenant: str, key: str) -> ResponseHeader | None:
        return await self.inner.find_by_idempotency_key(tenant, key)

    async def read_events(self, response_id: str, after_seq: int = -1) -> list[dict[str, Any]]:
        return await self.inner.read_events(response_id, after_seq)

    async def take_over(self, response_id: str, expected_epoch: int, lease_expires_at: float) -> int:
        return await self.inner.take_over(response_id, expected_epoch, lease_expires_at)

    async def request_cancel(self, response_id: str) -> bool:
        return await self.inner.request_cancel(response_id)

    async def delete(self, response_id: str) -> bool:
        return await self.inner.delete(response_id)

    # Counters and records pass straight through: the writer never uses them.
    async def add_counters(self, increments: Mapping[str, Mapping[str, float]], *, expires_at: float) -> None:
        await self.inner.add_counters(increments, expires_at=expires_at)

    async def get_counters(self, keys: Sequence[str]) -> dict[str, dict[str, float]]:
        return await self.inner.get_counters(keys)

    async def get_record(self, kind: str, name: str) -> Record | None:
        return await self.inner.get_record(kind, name)

    async def put_record(self, kind: str, name: str, data: dict[str, Any], *, expected_version: int | None = None,
                         expires_at: float | None = None) -> int:
        return await self.inner.put_record(kind, name, data, expected_version=expected_version, expires_at=expires_at)

    async def list_records(self, kind: str) -> list[Record]:
        return await self.inner.list_records(kind)

    async def delete_record(self, kind: str, name: str) -> bool:
        return await self.inner.delete_record(kind, name)


def delta(seq: int, text: str = "tok") -> dict[str, Any]:
    return {
        "type": "response.output_text.delta",
        "sequence_number": seq,
        "item_id": "msg_1",
        "output_index": 0,
        "content_index": 0,
        "delta": text,
        "logprobs": [],
    }


def completed(seq: int) -> dict[str, Any]:
    return {"type": "response.completed", "sequence_number": seq, "response": {"status": "completed"}}


async def new_response(store: Store, rid: str = "resp_w") -> str:
    now = time.time()
    await store.create(ResponseHeader(id=rid, tenant="t", created_at=now, expires_at=now + 3600))
    return rid


@pytest.fixture
async def store() -> ControlledStore:
    return ControlledStore(MemoryStore())


@pytest.fixture
def feeds() -> LocalFeeds:
    return LocalFeeds()


# -- commit ordering -------------------------------------------------------------------------------------------------


async def test_on_commit_only_after_the_store_committed(store: ControlledStore, feeds: LocalFeeds) -> None:
    rid = await new_response(store)
    seen: asyncio.Queue[list[dict[str, Any]]] = asyncio.Queue()

    async def on_commit(events: list[dict[str, Any]]) -> None:
        # At callback time every event handed over is already readable from the store.
        stored = await store.inner.read_events(rid)
        assert [e["sequence_number"] for e in stored][-len(events) :] == [e["sequence_number"] for e in events]
        seen.put_nowait(events)

    store.gate = asyncio.Event()
    writer = JournalWriter(store, rid, 0, batch_ms=NEVER, on_commit=on_commit, feeds=feeds)
    for seq in range(3):
        await writer.emit(delta(seq))
    await writer.boundary()
    attempt = await store.next_attempt()  # the commit is in flight, held by the gate
    assert [e["sequence_number"] for e in attempt.events] == [0, 1, 2]
    assert seen.empty() and await store.inner.read_events(rid) == []
    await writer.emit(delta(3))  # gathers in the next batch meanwhile
    store.gate.set()
    assert await asyncio.wait_for(seen.get(), BOUND) == [delta(0), delta(1), delta(2)]
    await writer.finish(completed(4), status="completed", response={"status": "completed"})
    assert await asyncio.wait_for(seen.get(), BOUND) == [delta(3), completed(4)]
    assert seen.empty()


async def test_sync_on_commit_callback(store: ControlledStore, feeds: LocalFeeds) -> None:
    rid = await new_response(store)
    got: list[int] = []
    writer = JournalWriter(
        store, rid, 0, batch_ms=NEVER, on_commit=lambda evs: got.extend(e["sequence_number"] for e in evs), feeds=feeds
    )
    await writer.emit(delta(0))
    await writer.finish(completed(1), status="completed", response={})
    assert got == [0, 1]


async def test_batch_closes_at_size(store: ControlledStore, feeds: LocalFeeds) -> None:
    rid = await new_response(store)
    text = "x" * 100  # estimated at ~230 bytes per event: three of them cross 500 bytes
    # max_append_bytes = batch_bytes: no merging of queued batches, so each closed batch is one append.
    writer = JournalWriter(store, rid, 0, batch_bytes=500, batch_ms=NEVER, max_append_bytes=500, feeds=feeds)
    for seq in range(20):
        await writer.emit(delta(seq, text))
    sizes = [len((await store.next_commit()).events) for _ in range(6)]
    assert sizes == [3] * 6
    assert store.committed.empty()  # two events still open: neither size nor time reached
    await writer.boundary()
    assert len((await store.next_commit()).events) == 2
    assert await store.inner.read_events(rid) == [delta(s, text) for s in range(20)]
    await writer.aclose()


async def test_mark_status_commits_with_the_batch_of_the_next_event(store: ControlledStore, feeds: LocalFeeds) -> None:
    rid = await new_response(store)
    writer = JournalWriter(store, rid, 0, batch_bytes=500, batch_ms=NEVER, max_append_bytes=500, feeds=feeds)
    await writer.emit(delta(0))
    writer.mark_status("in_progress")  # no commit of its own: it rides with the open batch
    assert store.attempted.empty()
    await writer.emit(delta(1))
    await writer.boundary()
    call = await store.next_commit()
    assert (call.events, call.status) == ([delta(0), delta(1)], "in_progress")
    writer.mark_status("in_progress")  # nothing open: the event emitted next carries it, even if it closes a batch
    await writer.emit(delta(2, "x" * 400))
    call = await store.next_commit()
    assert (call.events, call.status) == ([delta(2, "x" * 400)], "in_progress")
    await writer.emit(delta(3))
    await writer.boundary()
    assert (await store.next_commit()).status is None
    header = await store.inner.get(rid)
    assert header is not None and header.status == "in_progress"
    await writer.aclose()


async def test_batch_closes_at_time(store: ControlledStore, feeds: LocalFeeds) -> None:
    rid = await new_response(store)
    writer = JournalWriter(store, rid, 0, batch_bytes=1 << 30, batch_ms=5, feeds=feeds)
    await writer.emit(delta(0))
    # Nothing but the batch_ms deadline can close this batch: no size, no boundary, no terminal.
    assert (await store.next_commit()).events == [delta(0)]
    await writer.emit(delta(1))
    await writer.emit(delta(2))
    assert (await store.next_commit()).events == [delta(1), delta(2)]
    await writer.aclose()


async def test_batch_closes_at_boundary_and_terminal(store: ControlledStore, feeds: LocalFeeds) -> None:
    rid = await new_response(store)
    writer = JournalWriter(store, rid, 0, batch_bytes=1 << 30, batch_ms=NEVER, feeds=feeds)
    for seq in range(3):
        await writer.emit(delta(seq))
    assert store.attempted.empty()
    await writer.boundary()
    assert [e["sequence_number"] for e in (await store.next_commit()).events] == [0, 1, 2]
    await writer.boundary()  # nothing open: no empty commit
    await writer.emit(delta(3))
    await writer.emit(delta(4))
    response = {"id": rid, "status": "completed"}
    await writer.finish(completed(5), status="completed", response=response)
    last = await store.next_commit()
    assert [e["sequence_number"] for e in last.events] == [3, 4, 5]
    assert (last.status, last.response) == ("completed", response)
    assert store.committed.empty()
    header = await store.get(rid)
    assert header is not None and header.status == "completed" and header.response == response
    assert header.last_seq == 5
    with pytest.raises(WriterClosed):
        await writer.emit(delta(6))


async def test_batches_queued_behind_a_slow_store_go_out_together(store: ControlledStore, feeds: LocalFeeds) -> None:
    rid = await new_response(store)
    store.gate = asyncio.Event()
    text = "x" * 100  # ~230 bytes per event as estimated: batches of three (~690 bytes)
    writer = JournalWriter(store, rid, 0, batch_bytes=500, batch_ms=NEVER, max_append_bytes=1500, feeds=feeds)
    for seq in range(3):
        await writer.emit(delta(seq, text))
    assert len((await store.next_attempt()).events) == 3  # in flight, held by the gate
    for seq in range(3, 15):  # four more batches close and queue up meanwhile
        await writer.emit(delta(seq, text))
    status = asyncio.create_task(writer.set_status("in_progress"))
    await asyncio.sleep(0)  # one loop turn: the status update queues behind them
    store.gate.set()
    appends = [await store.next_commit() for _ in range(3)]
    # Merged while within max_append_bytes; the header update keeps its place, at the end of the last merge.
    assert [[e["sequence_number"] for e in a.events] for a in appends] == [
        [0, 1, 2],
        list(range(3, 9)),
        list(range(9, 15)),
    ]
    assert [a.status for a in appends] == [None, None, "in_progress"]
    await asyncio.wait_for(status, BOUND)
    assert store.committed.empty()
    assert [e["sequence_number"] for e in await store.read_events(rid)] == list(range(15))
    await writer.aclose()


async def test_set_status_and_flush(store: ControlledStore, feeds: LocalFeeds) -> None:
    rid = await new_response(store)
    writer = JournalWriter(store, rid, 0, batch_ms=NEVER, feeds=feeds)
    await writer.emit(delta(0))
    await writer.set_status("in_progress", {"status": "in_progress"})
    call = await store.next_commit()
    assert (call.events, call.status, call.response) == ([delta(0)], "in_progress", {"status": "in_progress"})
    await writer.set_status("queued")
    call = await store.next_commit()
    assert (call.events, call.status) == ([], "queued")
    await writer.emit(delta(1))
    await writer.flush()
    assert writer.committed_seq == 1
    assert await store.inner.read_events(rid) == [delta(0), delta(1)]
    await writer.aclose()


# -- when a batch goes out (fake loop clock) -------------------------------------------------------------------------

WINDOW = 0.1  # batch_ms / 1000 in the tests below


class FakeClock:
    """The running loop's clock, moved only by `advance`: a batch window or a timer ends exactly when a test says so,
    however slow the machine.

    A watchdog keeps a broken writer from hanging the test: if the clock has not moved for BOUND real seconds, the
    loop is waiting for a timer that only `advance` can bring, so the clock jumps past every bounded wait (they raise
    TimeoutError) and the test is failed at teardown."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.stuck = False
        self._moved = time.monotonic()

    def __call__(self) -> float:
        if time.monotonic() - self._moved > BOUND:
            self.stuck = True
            self.now += 2 * BOUND
            self._moved = time.monotonic()
        return self.now

    async def advance(self, seconds: float) -> None:
        self.now += seconds
        self._moved = time.monotonic()
        await settle()


async def settle(turns: int = 10) -> None:
    """A few loop turns: what is ready (due timers, the tasks they wake, a commit that is not held) runs."""
    for _ in range(turns):
        await asyncio.sleep(0)


@pytest.fixture
async def clock(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeClock]:
    loop = asyncio.get_running_loop()
    fake = FakeClock(loop.time())
    monkeypatch.setattr(loop, "time", fake)
    yield fake
    assert not fake.stuck, "the test waited for something that only a move of the fake clock could bring"


def item_added(seq: int, index: int, item_id: str, kind: str = "message") -> dict[str, Any]:
    return {"type": "response.output_item.added", "sequence_number": seq, "output_index": index,
            "item": {"id": item_id, "type": kind, "status": "in_progress"}}


def item_done(seq: int, index: int, item_id: str, kind: str = "message") -> dict[str, Any]:
    return {"type": "response.output_item.done", "sequence_number": seq, "output_index": index,
            "item": {"id": item_id, "type": kind, "status": "completed"}}


def part_added(seq: int, index: int, item_id: str) -> dict[str, Any]:
    return {"type": "response.content_part.added", "sequence_number": seq, "item_id": item_id, "output_index": index,
            "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}}


def args_delta(seq: int, index: int, item_id: str, text: str = '{"a"') -> dict[str, Any]:
    return {"type": "response.function_call_arguments.delta", "sequence_number": seq, "item_id": item_id,
            "output_index": index, "delta": text}


def start_events() -> list[dict[str, Any]]:
    """What the first upstream chunk of a response produces, all in one loop turn: seqs 0-4, the last a text delta."""
    return [
        {"type": "response.created", "sequence_number": 0, "response": {"status": "in_progress"}},
        {"type": "response.in_progress", "sequence_number": 1, "response": {"status": "in_progress"}},
        item_added(2, 0, "msg_1"),
        part_added(3, 0, "msg_1"),
        delta(4),
    ]


def seqs(call: Call) -> list[int]:
    return [e["sequence_number"] for e in call.events]


async def test_first_content_of_an_item_commits_at_once(
    store: ControlledStore, feeds: LocalFeeds, clock: FakeClock
) -> None:
    rid = await new_response(store)
    writer = JournalWriter(store, rid, 0, batch_ms=WINDOW * 1000, feeds=feeds)
    for event in start_events():
        await writer.emit(event)
    # The clock has not moved: no window was waited for, and the whole first chunk is one append.
    assert seqs(await store.next_commit()) == [0, 1, 2, 3, 4]
    assert len(store.commits) == 1
    await writer.emit(delta(5))  # a later token of the same item waits for the window...
    await settle()
    assert len(store.commits) == 1
    # ...the start of the next item does not, and takes what was waiting along; nor does that item's first delta.
    await writer.emit(item_added(6, 1, "fc_1", "function_call"))
    assert seqs(await store.next_commit()) == [5, 6]
    await writer.emit(args_delta(7, 1, "fc_1"))
    assert seqs(await store.next_commit()) == [7]
    await writer.emit(args_delta(8, 1, "fc_1"))  # not the first any more
    await settle()
    assert len(store.commits) == 3
    await clock.advance(WINDOW)
    assert seqs(await store.next_commit()) == [8]
    await writer.aclose()


async def test_the_emit_of_an_items_first_delta_returns_once_its_commit_and_what_that_woke_have_run(
    store: ControlledStore, feeds: LocalFeeds, clock: FakeClock
) -> None:
    """The producer lets the first content go first: before it goes on with the upstream's next bytes, the batch
    is committed and whoever its commit woke (here a task waiting for the first commit, as the POST's response
    does) has run, so neither waits behind the producer's own work."""
    rid = await new_response(store)
    first_commit: asyncio.Future[list[dict[str, Any]]] = asyncio.get_running_loop().create_future()
    sent: list[int] = []

    def on_commit(events: list[dict[str, Any]]) -> None:
        if not first_commit.done():
            first_commit.set_result(events)

    async def reader() -> None:  # what the POST's OpeningSSE does once the first batch is durable
        sent.extend(e["sequence_number"] for e in await first_commit)

    reading = asyncio.create_task(reader())
    await asyncio.sleep(0)  # the reader waits
    writer = JournalWriter(store, rid, 0, batch_ms=WINDOW * 1000, feeds=feeds, on_commit=on_commit)
    for event in start_events():
        await writer.emit(event)
    assert sent == [0, 1, 2, 3, 4]  # committed and read before the producer's emit of the delta returned
    assert len(store.commits) == 1
    await reading
    await writer.aclose()


# -- a writer started while its header is being created ---------------------------------------------------------


async def test_nothing_is_appended_before_the_header_create_succeeded(
    store: ControlledStore, feeds: LocalFeeds, clock: FakeClock
) -> None:
    header: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    rid = await new_response(store)
    writer = JournalWriter(store, rid, 0, batch_ms=WINDOW * 1000, feeds=feeds, header=header, next_seq=0)
    seen: list[int] = []
    follower = asyncio.create_task(_collect_seqs(store, rid, feeds, seen))
    await settle()
    for event in start_events():
        await writer.emit(event)
    await clock.advance(2 * WINDOW)  # the first content is due, every window is over: still nothing goes out
    assert store.attempted.empty() and store.commits == [] and seen == []
    header.set_result(None)
    # The header is there: the first content and the start events that waited for it go out in one append.
    assert seqs(await store.next_commit()) == [0, 1, 2, 3, 4]
    await writer.finish(completed(5), status="completed", response={"id": rid})
    await asyncio.wait_for(follower, BOUND)
    assert seen == [0, 1, 2, 3, 4, 5]


async def _collect_seqs(store: Store, rid: str, feeds: LocalFeeds, seen: list[int], after: int = -1) -> None:
    async for event in follow(store, rid, after, feeds=feeds, poll_interval=BOUND, max_wait=BOUND):
        seen.append(event["sequence_number"])


async def test_the_start_events_wait_for_the_first_content_after_the_header_create(
    store: ControlledStore, feeds: LocalFeeds, clock: FakeClock
) -> None:
    """The create is the response's first commit: the start events (which the upstream's role chunk brings) do not
    take a commit of their own before the first token; the first content takes them along, at once."""
    header: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    header.set_result(None)
    rid = await new_response(store)
    writer = JournalWriter(store, rid, 0, batch_ms=WINDOW * 1000, feeds=feeds, header=header)
    first, in_progress, *content = start_events()
    await writer.emit(first)
    await writer.emit(in_progress)
    await settle()
    assert store.attempted.empty()
    for event in content:
        await writer.emit(event)
    assert seqs(await store.next_commit()) == [0, 1, 2, 3, 4]  # the clock has not moved: at once
    assert len(store.commits) == 1
    await writer.aclose()


@pytest.mark.parametrize("unwritten", ["header", "create"])
async def test_the_start_events_wait_for_the_first_content_however_late_the_upstream_s_first_chunk(
    store: ControlledStore, feeds: LocalFeeds, clock: FakeClock, unwritten: str
) -> None:
    """An upstream slower to its first chunk than a window (any real model): the first batch's window starts with
    its first event, so the start events still wait for the first content and the first token waits for one commit,
    with the header's create in flight (`header=`) and with the header written by the first commit (`create=`)."""
    now = time.time()
    if unwritten == "header":
        header: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        header.set_result(None)
        rid = await new_response(store)
        writer = JournalWriter(store, rid, 0, batch_ms=WINDOW * 1000, feeds=feeds, header=header)
    else:
        rid = "resp_late"
        writer = JournalWriter(store, rid, 0, batch_ms=WINDOW * 1000, feeds=feeds, next_seq=0,
                               create=ResponseHeader(id=rid, tenant="t", created_at=now, expires_at=now + 3600,
                                                     status="in_progress"))
    await clock.advance(3 * WINDOW)  # the upstream's first chunk comes three windows after the writer started
    first, in_progress, *content = start_events()
    await writer.emit(first)
    await writer.emit(in_progress)
    await settle()
    assert store.commits == []  # they wait for the first content...
    for event in content:
        await writer.emit(event)
    assert seqs(await store.next_commit()) == [0, 1, 2, 3, 4]  # ...which takes them along, at once
    assert len(store.commits) == 1
    await writer.aclose()


class HeldPrepare(MemoryStore):
    """`prepare` starts, then waits for `release` (a DynamoDB snapshot write still in flight)."""

    def __init__(self) -> None:
        super().__init__()
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def prepare(self, header: ResponseHeader) -> ResponseHeader:
        self.started.set()
        await asyncio.wait_for(self.release.wait(), BOUND)
        return await super().prepare(header)


def creating_writer(store: MemoryStore, rid: str, feeds: LocalFeeds,
                    cue: asyncio.Future[None] | None = None) -> JournalWriter:
    """A writer whose first commit creates the header (`create=`), prepared on `cue` if given."""
    now = time.time()
    return JournalWriter(store, rid, 0, batch_ms=WINDOW * 1000, feeds=feeds, next_seq=0, prepare_after=cue,
                         create=ResponseHeader(id=rid, tenant="t", created_at=now, expires_at=now + 3600,
                                               status="in_progress"))


async def test_nothing_leaves_before_the_prepared_create_is_durable(feeds: LocalFeeds, clock: FakeClock) -> None:
    """What a client saw is durable: the first content waits for the prepare still in flight and then the create;
    a follower sees nothing before, then every event from 0, once."""
    store = HeldPrepare()
    rid = "resp_held_prepare"
    writer = creating_writer(store, rid, feeds)
    seen: list[int] = []
    follower = asyncio.create_task(_collect_seqs(store, rid, feeds, seen))
    await clock.advance(WINDOW)  # without a cue the prepare starts at once, and is held
    assert store.started.is_set()
    for event in start_events():
        await writer.emit(event)
    await clock.advance(2 * WINDOW)
    assert seen == [] and await store.get(rid) is None and writer.committed_seq is None
    store.release.set()
    await writer.finish(completed(5), status="completed", response={"id": rid})
    await asyncio.wait_for(follower, BOUND)
    assert seen == [0, 1, 2, 3, 4, 5]
    assert (await store.get(rid)).status == "completed"  # type: ignore[union-attr]


async def test_with_a_cue_the_create_is_prepared_when_the_cue_is_done_not_on_a_timer(
    feeds: LocalFeeds, clock: FakeClock
) -> None:
    """The producer's upstream request is out when its cue is done: preparing before that would delay the request
    by the encoding (and, on DynamoDB, a snapshot's write); however long that takes, no timer starts it first."""
    store = HeldPrepare()
    store.release.set()
    rid = "resp_cued_prepare"
    cue: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    writer = creating_writer(store, rid, feeds, cue)
    await clock.advance(2 * WINDOW)
    assert not store.started.is_set()
    cue.set_result(None)
    await asyncio.wait_for(store.started.wait(), BOUND)
    await writer.finish(completed(0), status="completed", response={"id": rid})
    assert (await store.get(rid)).status == "completed"  # type: ignore[union-attr]


async def test_a_cue_after_the_header_went_in_unprepared_prepares_nothing(feeds: LocalFeeds,
                                                                          clock: FakeClock) -> None:
    store = HeldPrepare()
    rid = "resp_late_cue"
    cue: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    writer = creating_writer(store, rid, feeds, cue)
    await writer.finish(completed(0), status="completed", response={"id": rid})  # created at once, unprepared
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    try:
        cue.set_result(None)
        await clock.advance(WINDOW)
    finally:
        loop.set_exception_handler(None)
    assert not store.started.is_set() and errors == []
    assert (await store.get(rid)).status == "completed"  # type: ignore[union-attr]


async def test_start_events_with_no_content_go_out_at_the_end_of_the_window(
    store: ControlledStore, feeds: LocalFeeds, clock: FakeClock
) -> None:
    header: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    header.set_result(None)
    rid = await new_response(store)
    writer = JournalWriter(store, rid, 0, batch_ms=WINDOW * 1000, feeds=feeds, header=header)
    for event in start_events()[:2]:
        await writer.emit(event)
    await clock.advance(WINDOW / 2)
    assert store.attempted.empty()
    await clock.advance(WINDOW / 2)
    assert seqs(await store.next_commit()) == [0, 1]
    await writer.aclose()


@pytest.mark.parametrize("failure", [StoreUnavailable("create refused"), AlreadyExists("resp_w exists")])
async def test_a_failed_header_create_stops_the_writer_and_nothing_is_written(
    store: ControlledStore, feeds: LocalFeeds, failure: Exception
) -> None:
    header: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    rid = await new_response(store)
    writer = JournalWriter(store, rid, 0, batch_ms=NEVER, feeds=feeds, header=header, next_seq=0)
    seen: list[int] = []
    follower = asyncio.create_task(_collect_seqs(store, rid, feeds, seen))
    for event in start_events():
        await writer.emit(event)
    pending = asyncio.create_task(writer.flush())
    await settle()
    header.set_exception(failure)
    with pytest.raises(type(failure)):
        await asyncio.wait_for(pending, BOUND)
    with pytest.raises(type(failure)):
        await writer.emit(delta(5))
    with pytest.raises(type(failure)):
        await asyncio.wait_for(follower, BOUND)  # a local follower ends with the error, having seen nothing
    assert store.attempted.empty() and seen == []
    await writer.aclose()


async def test_a_cancelled_header_create_stops_the_writer(store: ControlledStore, feeds: LocalFeeds) -> None:
    header: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    rid = await new_response(store)
    writer = JournalWriter(store, rid, 0, batch_ms=NEVER, feeds=feeds, header=header)
    await writer.emit(start_events()[0])
    header.cancel()
    with pytest.raises(StoreError):
        await asyncio.wait_for(writer.flush(), BOUND)
    assert store.attempted.empty()
    await writer.aclose()


async def test_closing_the_writer_does_not_cancel_the_header_create(
    store: ControlledStore, feeds: LocalFeeds
) -> None:
    header: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    rid = await new_response(store)
    writer = JournalWriter(store, rid, 0, batch_ms=NEVER, feeds=feeds, header=header)
    await settle()
    await writer.aclose()
    assert not header.done()  # whoever started the create still owns (and awaits) it
    header.set_result(None)


async def test_an_event_during_a_commit_waits_for_it_then_goes_in_the_next_batch(
    store: ControlledStore, feeds: LocalFeeds, clock: FakeClock
) -> None:
    rid = await new_response(store)
    store.gate = asyncio.Event()
    writer = JournalWriter(store, rid, 0, batch_ms=WINDOW * 1000, feeds=feeds)
    for event in start_events():
        await writer.emit(event)
    assert seqs(await store.next_attempt()) == [0, 1, 2, 3, 4]  # in flight, held by the gate
    await writer.emit(delta(5))
    await clock.advance(2 * WINDOW)  # its window is over, but one append at a time
    assert store.attempted.empty()
    store.gate.set()
    assert seqs(await store.next_commit()) == [0, 1, 2, 3, 4]
    assert seqs(await store.next_commit()) == [5]  # at once after it: the window had ended meanwhile
    await writer.aclose()


async def test_after_a_commit_the_next_batch_waits_for_the_rest_of_the_window(
    store: ControlledStore, feeds: LocalFeeds, clock: FakeClock
) -> None:
    rid = await new_response(store)
    store.gate = asyncio.Event()
    writer = JournalWriter(store, rid, 0, batch_ms=WINDOW * 1000, feeds=feeds)
    for event in start_events():
        await writer.emit(event)
    await store.next_attempt()
    await writer.emit(delta(5))
    await clock.advance(0.3 * WINDOW)
    store.gate.set()  # the first commit ends 30 ms into its window
    await store.next_commit()
    await settle()
    await clock.advance(0.6 * WINDOW)
    assert len(store.commits) == 1 and store.attempted.empty()
    await clock.advance(0.1 * WINDOW)  # the window of the first commit is over
    assert seqs(await store.next_commit()) == [5]
    await writer.aclose()


async def test_a_burst_during_a_commit_is_one_more_commit(
    store: ControlledStore, feeds: LocalFeeds, clock: FakeClock
) -> None:
    rid = await new_response(store)
    store.gate = asyncio.Event()
    writer = JournalWriter(store, rid, 0, batch_bytes=1 << 20, batch_ms=WINDOW * 1000, feeds=feeds)
    for event in start_events():
        await writer.emit(event)
    await store.next_attempt()
    burst = 100
    for seq in range(5, 5 + burst):
        await writer.emit(delta(seq))
        await asyncio.sleep(0)  # one token per loop turn, as they come off a socket
    await clock.advance(WINDOW)
    store.gate.set()
    await store.next_commit()
    assert seqs(await store.next_commit()) == list(range(5, 5 + burst))
    await settle()
    assert len(store.commits) == 2
    await writer.aclose()


async def test_after_a_quiet_window_an_event_commits_at_once(
    store: ControlledStore, feeds: LocalFeeds, clock: FakeClock
) -> None:
    rid = await new_response(store)
    writer = JournalWriter(store, rid, 0, batch_ms=WINDOW * 1000, feeds=feeds)
    for event in start_events():
        await writer.emit(event)
    await store.next_commit()
    await clock.advance(2.5 * WINDOW)  # nothing for longer than the window
    await writer.emit(delta(5))
    assert seqs(await store.next_commit()) == [5]  # the clock did not move since the emit
    await writer.emit(delta(6))  # inside the window of that commit: waits for its end
    await settle()
    assert len(store.commits) == 2
    await clock.advance(WINDOW)
    assert seqs(await store.next_commit()) == [6]
    await writer.aclose()


async def test_a_long_paced_stream_costs_about_one_write_per_window(
    store: ControlledStore, feeds: LocalFeeds, clock: FakeClock
) -> None:
    rid = await new_response(store)
    interval = 0.02  # 50 tokens/s
    emitted_at: dict[int, float] = {}
    held: dict[int, float] = {}  # sequence number -> how long it waited between emit and on_commit
    firsts: list[int] = []  # the first delta of every item

    def on_commit(events: list[dict[str, Any]]) -> None:
        held.update((e["sequence_number"], clock.now - emitted_at[e["sequence_number"]]) for e in events)

    writer = JournalWriter(store, rid, 0, batch_ms=WINDOW * 1000, on_commit=on_commit, feeds=feeds)
    seq = 0

    async def emit(event: dict[str, Any]) -> None:
        nonlocal seq
        emitted_at[seq] = clock.now
        await writer.emit(event)
        seq += 1

    # Three items, as the producer writes them: a message, a streamed function call, another message.
    plan = [("message", 150), ("function_call", 40), ("message", 60)]
    for index, (kind, tokens) in enumerate(plan):
        item_id = f"item_{index}"
        if index == 0:
            for event in start_events()[:2]:
                await emit(event)
        await emit(item_added(seq, index, item_id, kind))
        if kind == "message":
            await emit(part_added(seq, index, item_id))
        firsts.append(seq)
        for _ in range(tokens):
            if kind == "message":
                await emit({**delta(seq), "item_id": item_id, "output_index": index})
            else:
                await emit(args_delta(seq, index, item_id))
            await settle()  # the loop runs between tokens
            await clock.advance(interval)
        await emit(item_done(seq, index, item_id, kind))
        await writer.boundary()
    emitted_at[seq] = clock.now
    await writer.finish(completed(seq), status="completed", response={"status": "completed"})

    tokens = sum(n for _, n in plan)
    writes = sum(1 for c in store.commits if c.events)
    # One write per window of the stream's duration, plus at most three per item (its start, its first delta, its
    # boundary) and the finish.
    assert writes <= tokens * interval / WINDOW + 3 * len(plan) + 1
    # This store commits in no time: the first content of an item does not wait at all, nothing waits longer than
    # a window.
    assert [held[s] for s in firsts] == [0.0] * len(plan)
    assert max(held.values()) <= WINDOW + 1e-9
    assert [e["sequence_number"] for e in await store.read_events(rid)] == list(range(seq + 1))


async def test_followers_never_see_an_event_before_its_commit(
    store: ControlledStore, feeds: LocalFeeds, clock: FakeClock
) -> None:
    rid = await new_response(store)
    store.permits = asyncio.Semaphore(0)  # every append waits for the test to let it through
    writer = JournalWriter(store, rid, 0, batch_ms=WINDOW * 1000, feeds=feeds)
    got: list[dict[str, Any]] = []

    async def consume() -> None:
        async for event in follow(store, rid, feeds=feeds, poll_interval=BOUND, max_wait=BOUND):
            assert event["sequence_number"] <= store.durable_seq  # in the store before anyone saw it
            got.append(event)

    follower = asyncio.create_task(consume())
    await settle()
    sent = start_events() + [delta(seq) for seq in range(5, 40)]
    released = 0
    for event in sent:
        await writer.emit(event)
        await clock.advance(0.02)
        if not store.attempted.empty():  # an append is waiting: the follower has only what is committed
            await store.next_attempt()
            assert [e["sequence_number"] for e in got] == list(range(store.durable_seq + 1))
            store.permits.release()
            released += 1
            await store.next_commit()
            await settle()
            assert [e["sequence_number"] for e in got] == list(range(store.durable_seq + 1))
    assert released >= 3  # the start at once, then a window's worth at a time
    finish = asyncio.create_task(writer.finish(completed(40), status="completed", response={}))
    while not finish.done():
        store.permits.release()
        await settle()
    await finish
    await asyncio.wait_for(follower, BOUND)
    assert got == [*sent, completed(40)]


async def test_a_zombie_is_fenced_on_its_first_content(
    store: ControlledStore, feeds: LocalFeeds, clock: FakeClock
) -> None:
    rid = await new_response(store)
    sent: list[dict[str, Any]] = []
    zombie = JournalWriter(store, rid, 0, batch_ms=WINDOW * 1000, on_commit=sent.extend, feeds=feeds)
    assert await store.take_over(rid, 0, time.time() + 30) == 1
    for event in start_events():
        await zombie.emit(event)  # goes out at once, and loses to the new owner's epoch
    assert isinstance(await asyncio.wait_for(store.failures.get(), BOUND), Fenced)
    with pytest.raises(Fenced):
        await zombie.emit(delta(5))
    assert sent == [] and await store.read_events(rid) == []
    assert not feeds.has_writer(rid)
    await zombie.aclose()


async def test_a_waiting_batch_renews_the_lease_instead_of_an_empty_append(
    store: ControlledStore, feeds: LocalFeeds, clock: FakeClock
) -> None:
    rid = await new_response(store)
    # The lease is due (every 0.1 s) long before the batch window (1 s) ends.
    writer = JournalWriter(store, rid, 0, batch_ms=1000, lease_seconds=0.3, feeds=feeds)
    for event in start_events():
        await writer.emit(event)
    await store.next_commit()
    await writer.emit(delta(5))
    await settle()
    assert len(store.commits) == 1
    await clock.advance(0.1)
    call = await store.next_commit()
    assert call.events == [delta(5)] and call.lease_expires_at is not None
    await writer.aclose()


# -- failures --------------------------------------------------------------------------------------------------------


async def test_fenced_writer_stops_and_nothing_it_wrote_later_appears(
    store: ControlledStore, feeds: LocalFeeds
) -> None:
    rid = await new_response(store)
    sent: list[int] = []
    zombie = JournalWriter(
        store, rid, 0, batch_ms=NEVER, on_commit=lambda evs: sent.extend(e["sequence_number"] for e in evs), feeds=feeds
    )
    for seq in range(3):
        await zombie.emit(delta(seq, "old"))
    await zombie.flush()
    # Another process takes over while the zombie has a batch in flight.
    store.gate = asyncio.Event()
    for seq in range(3, 6):
        await zombie.emit(delta(seq, "zombie"))
    await zombie.boundary()
    await store.next_attempt()
    assert await store.take_over(rid, 0, time.time() + 30) == 1
    store.gate.set()
    with pytest.raises(Fenced):
        await zombie.flush()
    for attempt in (zombie.emit(delta(6, "zombie")), zombie.boundary(), zombie.set_status("failed")):
        with pytest.raises(Fenced):
            await attempt
    with pytest.raises(Fenced):
        await zombie.finish(completed(6), status="completed", response={})
    assert sent == [0, 1, 2]
    # The new owner continues densely from what was committed.
    owner = JournalWriter(store, rid, 1, batch_ms=NEVER, feeds=feeds)
    for seq in range(3, 5):
        await owner.emit(delta(seq, "new"))
    await owner.finish(completed(5), status="completed", response={})
    events = await store.read_events(rid)
    assert [e["sequence_number"] for e in events] == list(range(6))
    assert not any(e.get("delta") == "zombie" for e in events)
    await zombie.aclose()


async def test_fenced_on_lease_renewal(store: ControlledStore, feeds: LocalFeeds) -> None:
    rid = await new_response(store)
    await store.take_over(rid, 0, time.time() + 30)
    writer = JournalWriter(store, rid, 0, batch_ms=NEVER, lease_seconds=0.03, feeds=feeds)
    call = await store.next_attempt()
    assert call.events == [] and call.lease_expires_at is not None  # a renewal, not a batch
    assert isinstance(await asyncio.wait_for(store.failures.get(), BOUND), Fenced)
    assert isinstance(writer.error, Fenced)
    with pytest.raises(Fenced):
        await writer.emit(delta(0))
    assert await store.read_events(rid) == []
    assert not feeds.has_writer(rid)


async def test_store_unavailable_surfaces_to_the_producer(store: ControlledStore, feeds: LocalFeeds) -> None:
    rid = await new_response(store)
    sent: list[dict[str, Any]] = []
    store.fail_with = StoreUnavailable("throttled past the retry bound")
    writer = JournalWriter(store, rid, 0, batch_ms=NEVER, on_commit=sent.extend, feeds=feeds)
    await writer.emit(delta(0))
    with pytest.raises(StoreUnavailable):
        await writer.flush()
    with pytest.raises(StoreUnavailable):
        await writer.emit(delta(1))
    with pytest.raises(StoreUnavailable):
        await writer.finish(completed(1), status="completed", response={})
    assert sent == [] and await store.read_events(rid) == []
    await writer.aclose()


async def test_unavailable_during_finish(store: ControlledStore, feeds: LocalFeeds) -> None:
    rid = await new_response(store)
    writer = JournalWriter(store, rid, 0, batch_ms=NEVER, feeds=feeds)
    await writer.emit(delta(0))
    store.fail_with = StoreUnavailable("down")
    with pytest.raises(StoreUnavailable):
        await writer.finish(completed(1), status="completed", response={})
    header = await store.get(rid)
    assert header is not None and header.status == "queued" and await store.read_events(rid) == []


# -- lease, cancel, backpressure, close ------------------------------------------------------------------------------


async def test_lease_is_renewed_while_idle(store: ControlledStore, feeds: LocalFeeds) -> None:
    rid = await new_response(store)
    before = time.time()
    writer = JournalWriter(store, rid, 0, lease_seconds=0.03, feeds=feeds)
    renewals = [await store.next_commit() for _ in range(2)]
    assert all(c.events == [] and c.lease_expires_at is not None for c in renewals)
    header = await store.get(rid)
    assert header is not None and header.lease_expires_at >= before
    await writer.aclose()


async def test_cancel_request_seen_at_next_commit(store: ControlledStore, feeds: LocalFeeds) -> None:
    rid = await new_response(store)
    writer = JournalWriter(store, rid, 0, batch_ms=NEVER, feeds=feeds)
    await writer.emit(delta(0))
    await writer.flush()
    assert writer.cancel_requested is False
    await store.request_cancel(rid)
    await writer.emit(delta(1))
    await writer.flush()
    assert writer.cancel_requested is True
    await writer.finish({"type": "response.cancelled", "sequence_number": 2}, status="cancelled", response={})
    header = await store.get(rid)
    assert header is not None and header.status == "cancelled"


async def test_backpressure_holds_a_producer_ahead_of_the_store(store: ControlledStore, feeds: LocalFeeds) -> None:
    rid = await new_response(store)
    store.gate = asyncio.Event()
    writer = JournalWriter(store, rid, 0, batch_bytes=200, batch_ms=NEVER, max_pending_bytes=1000, feeds=feeds)

    async def produce() -> None:
        for seq in range(40):
            await writer.emit(delta(seq, "y" * 100))

    producer = asyncio.create_task(produce())
    await store.next_attempt()
    for _ in range(20):
        await asyncio.sleep(0)
    assert not producer.done()  # blocked: the store holds the first commit
    store.gate.set()
    await asyncio.wait_for(producer, BOUND)
    await writer.flush()
    assert [e["sequence_number"] for e in await store.read_events(rid)] == list(range(40))
    await writer.aclose()


async def test_aclose_drops_what_is_pending(store: ControlledStore, feeds: LocalFeeds) -> None:
    rid = await new_response(store)
    writer = JournalWriter(store, rid, 0, batch_ms=NEVER, feeds=feeds)
    await writer.emit(delta(0))
    await writer.aclose()
    assert await store.read_events(rid) == []
    with pytest.raises(WriterClosed):
        await writer.emit(delta(1))
    assert not feeds.has_writer(rid)


# -- follow ----------------------------------------------------------------------------------------------------------


def test_is_terminal_event() -> None:
    for kind in ("response.completed", "response.incomplete", "response.failed"):
        assert is_terminal_event({"type": kind})
    # A cancel ends with `response.incomplete` (status "cancelled"): the spec has no `response.cancelled` event.
    for kind in ("response.created", "error", "response.output_text.delta", "router:recovery", "response.cancelled"):
        assert not is_terminal_event({"type": kind})


async def _produce(writer: JournalWriter, count: int, *, flush_every: int = 7) -> list[dict[str, Any]]:
    sent = []
    for seq in range(count):
        event = delta(seq, f"t{seq} ")
        sent.append(event)
        await writer.emit(event)
        if seq % flush_every == 0:
            await writer.flush()  # let followers interleave with commits
    terminal = completed(count)
    sent.append(terminal)
    await writer.finish(terminal, status="completed", response={"status": "completed"})
    return sent


async def _collect(store: Store, rid: str, after: int = -1, **kwargs: Any) -> list[dict[str, Any]]:
    return [event async for event in follow(store, rid, after, max_wait=BOUND, **kwargs)]


async def test_follow_a_local_writer(feeds: LocalFeeds) -> None:
    store = ControlledStore(MemoryStore())
    rid = await new_response(store)
    writer = JournalWriter(store, rid, 0, batch_ms=NEVER, feeds=feeds)
    await writer.emit(delta(0, "t0 "))
    await writer.flush()  # one commit before the follower subscribes: it must read it from the store
    early = asyncio.create_task(_collect(store, rid, feeds=feeds, poll_interval=BOUND))
    late = asyncio.create_task(_collect(store, rid, 0, feeds=feeds, poll_interval=BOUND))
    for _ in range(5):
        await asyncio.sleep(0)  # let both subscribe before the rest is produced
    rest = []
    for seq in range(1, 60):
        rest.append(delta(seq, f"t{seq} "))
        await writer.emit(rest[-1])
        if seq % 9 == 0:
            await writer.flush()
    rest.append(completed(60))
    await writer.finish(rest[-1], status="completed", response={})
    everything = [delta(0, "t0 "), *rest]
    assert await asyncio.wait_for(early, BOUND) == everything
    assert await asyncio.wait_for(late, BOUND) == everything[1:]
    # After the end: replay from any point, and stop at the terminal event.
    assert await _collect(store, rid, 30, feeds=feeds) == everything[31:]
    assert await _collect(store, rid, 60, feeds=feeds) == []  # resuming after the terminal event ends at once


async def test_follow_across_two_sqlite_instances(tmp_path: Any) -> None:
    path = f"{tmp_path}/j.db"
    producer_store, reader_store = SQLiteStore(path), SQLiteStore(path)
    try:
        rid = await new_response(producer_store)
        # Separate registries: the follower cannot be pushed to and must poll the file, like another process.
        writer = JournalWriter(producer_store, rid, 0, batch_ms=5, feeds=LocalFeeds())
        follower = asyncio.create_task(_collect(reader_store, rid, feeds=LocalFeeds(), poll_interval=0.005))
        sent = await _produce(writer, 80)
        got = await asyncio.wait_for(follower, BOUND)
        assert got == sent
        assert [e["sequence_number"] for e in got] == list(range(81))
    finally:
        await producer_store.close()
        await reader_store.close()


async def test_follow_reports_missing_and_times_out(feeds: LocalFeeds) -> None:
    store = MemoryStore()
    with pytest.raises(NotFound):
        await _collect(store, "resp_nope", feeds=feeds)
    rid = await new_response(store)
    await store.append(rid, 0, [delta(0), delta(1)])
    got: list[dict[str, Any]] = []
    with pytest.raises(TimeoutError):
        async for event in follow(store, rid, max_wait=0.02, poll_interval=0.005, feeds=feeds):
            got.append(event)
    assert got == [delta(0), delta(1)]


async def test_follow_ends_with_the_local_writers_store_error(feeds: LocalFeeds) -> None:
    store = ControlledStore(MemoryStore())
    rid = await new_response(store)
    writer = JournalWriter(store, rid, 0, batch_ms=NEVER, feeds=feeds)
    await writer.emit(delta(0))
    await writer.flush()
    got: list[dict[str, Any]] = []

    async def consume() -> None:
        async for event in follow(store, rid, feeds=feeds, poll_interval=BOUND, max_wait=BOUND):
            got.append(event)

    follower = asyncio.create_task(consume())
    await writer.emit(delta(1))
    await writer.flush()
    store.fail_with = StoreUnavailable("down")
    await writer.emit(delta(2))
    with pytest.raises(StoreUnavailable):
        await writer.flush()
    # Not a TimeoutError after max_wait: the follower learns of the failure from the writer.
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(follower, BOUND)
    assert got == [delta(0), delta(1)]


async def test_follow_keeps_going_when_the_local_writer_is_fenced(feeds: LocalFeeds) -> None:
    store = ControlledStore(MemoryStore())
    rid = await new_response(store)
    zombie = JournalWriter(store, rid, 0, batch_ms=NEVER, feeds=feeds)
    await zombie.emit(delta(0))
    await zombie.flush()
    follower = asyncio.create_task(_collect(store, rid, feeds=feeds, poll_interval=0.005))
    await store.take_over(rid, 0, time.time() + 30)
    await zombie.emit(delta(1, "zombie"))
    with pytest.raises(Fenced):
        await zombie.flush()
    # Another process (no local feed) continues the response; the follower polls the store for it.
    await store.append(rid, 1, [delta(1, "new")])
    await store.append(rid, 1, [completed(2)], status="completed")
    assert await asyncio.wait_for(follower, BOUND) == [delta(0), delta(1, "new"), completed(2)]


class CountingReads(MemoryStore):
    """A memory store that counts the follower's reads."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    async def read_events(self, response_id: str, after_seq: int = -1) -> list[dict[str, Any]]:
        self.reads += 1
        return await super().read_events(response_id, after_seq)


async def test_a_follower_of_a_local_writer_that_said_where_it_starts_reads_nothing_first(feeds: LocalFeeds) -> None:
    store = CountingReads()
    rid = await new_response(store)
    writer = JournalWriter(store, rid, 0, batch_ms=1000, feeds=feeds, next_seq=0)
    got: list[dict[str, Any]] = []

    async def follower() -> None:
        async for event in follow(store, rid, -1, feeds=feeds, max_wait=10):
            got.append(event)

    task = asyncio.create_task(follower())
    await asyncio.sleep(0)  # the follower subscribes
    for seq in range(3):
        await writer.emit(delta(seq))
    await writer.finish(completed(3), status="completed", response={"id": rid})
    async with asyncio.timeout(10):
        await task
    assert [e["sequence_number"] for e in got] == [0, 1, 2, 3]
    assert store.reads == 0  # everything came by push: no round trip to the store before the first event


async def test_a_follower_from_before_a_taken_over_writer_still_reads_the_store(feeds: LocalFeeds) -> None:
    store = CountingReads()
    rid = await new_response(store)
    first = JournalWriter(store, rid, 0, feeds=feeds, next_seq=0)
    await first.emit(delta(0))
    await first.emit(delta(1))
    await first.flush()
    await first.aclose()
    epoch = await store.take_over(rid, 0, time.time() + 30)
    second = JournalWriter(store, rid, epoch, feeds=feeds, next_seq=2)  # a new owner, going on from 2
    got: list[dict[str, Any]] = []

    async def follower() -> None:
        async for event in follow(store, rid, -1, feeds=feeds, max_wait=10):
            got.append(event)

    task = asyncio.create_task(follower())
    await asyncio.sleep(0)
    await second.finish(completed(2), status="completed", response={"id": rid})
    async with asyncio.timeout(10):
        await task
    assert [e["sequence_number"] for e in got] == [0, 1, 2]
    assert store.reads >= 1  # events 0 and 1 were committed by the first owner: only the store has them


async def test_a_follower_that_subscribes_after_the_first_commits_gets_them_from_memory(feeds: LocalFeeds) -> None:
    """The POST's own follower starts once the first output is there; a fast store may have committed the first
    batch by then. It is pushed from the writer's recent batches, not read from the store."""
    store = CountingReads()
    rid = await new_response(store)
    writer = JournalWriter(store, rid, 0, batch_ms=NEVER, feeds=feeds, next_seq=0)
    for event in start_events():
        await writer.emit(event)
    await writer.flush()  # committed before anyone follows
    await writer.emit(delta(5))
    await writer.flush()
    from_start: list[int] = []
    from_3: list[int] = []
    tasks = [asyncio.create_task(_collect_seqs(store, rid, feeds, from_start)),
             asyncio.create_task(_collect_seqs(store, rid, feeds, from_3, 3))]
    await settle()
    await writer.finish(completed(6), status="completed", response={"id": rid})
    await asyncio.wait_for(asyncio.gather(*tasks), BOUND)
    assert from_start == [0, 1, 2, 3, 4, 5, 6]
    assert from_3 == [4, 5, 6]
    assert store.reads == 0


async def test_a_follower_from_before_the_recent_batches_reads_the_store(
    feeds: LocalFeeds, monkeypatch: pytest.MonkeyPatch
) -> None:
    from unbroken.journal import feed

    monkeypatch.setattr(feed, "RECENT_BATCHES", 2)
    store = CountingReads()
    rid = await new_response(store)
    writer = JournalWriter(store, rid, 0, batch_ms=NEVER, feeds=feeds, next_seq=0)
    for seq in range(4):  # four batches: the first two are no longer in memory
        await writer.emit(delta(seq))
        await writer.flush()
    got: list[int] = []
    task = asyncio.create_task(_collect_seqs(store, rid, feeds, got))
    await settle()
    await writer.finish(completed(4), status="completed", response={"id": rid})
    await asyncio.wait_for(task, BOUND)
    assert got == [0, 1, 2, 3, 4]
    assert store.reads >= 1
