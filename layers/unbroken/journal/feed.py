"""Reading a response as it is written, from any process.

`follow` yields committed events after a sequence number, then tails new commits until the terminal event. In the
process that runs the writer it is woken by the writer's commits (`LocalFeeds`, which also hands it the committed
events, so no store read per batch); otherwise it polls the store. Either way it yields every sequence number once,
in order: pushed batches that overlap what was read are trimmed, and a pushed batch that would leave a gap makes it
read the store instead.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

from unbroken.journal.store import TERMINAL_EVENT_TYPES, Fenced, NotFound, Store, StoreError

# With a writer in this process, commits arrive by push; the store is still polled now and then, in case the writer
# is fenced by another process and stops.
LOCAL_WRITER_POLL = 1.0
# The last batches a live writer published, kept for followers that subscribe just after them (the POST's own
# follower starts after the first output, and a fast store may have committed the first batch by then): they get
# them from memory, not from a store read on the first token's path. A follower from further back reads the store.
RECENT_BATCHES = 64


def is_terminal_event(event: dict[str, Any]) -> bool:
    return event.get("type") in TERMINAL_EVENT_TYPES


class Subscription:
    """Committed batches pushed for one follower. Bounded: on overflow it drops them and says so."""

    __slots__ = ("batches", "error", "event", "limit", "overflowed")

    def __init__(self, limit: int) -> None:
        self.batches: deque[list[dict[str, Any]]] = deque()
        self.event = asyncio.Event()
        self.limit = limit
        self.overflowed = False
        self.error: BaseException | None = None  # the local writer failed (not fenced): nothing more will come

    def push(self, events: list[dict[str, Any]]) -> None:
        if len(self.batches) >= self.limit:
            self.batches.clear()
            self.overflowed = True  # the follower re-reads the store
        else:
            self.batches.append(events)
        self.event.set()


class LocalFeeds:
    """Per-response registry of in-process followers and writers. Used from one event loop."""

    def __init__(self) -> None:
        self._subs: dict[str, set[Subscription]] = {}
        self._writers: dict[str, int] = {}
        # Per response with a live writer that said where it starts: the last sequence number in the store, and
        # the batches it published last (all of them since it started while there are at most RECENT_BATCHES).
        self._published: dict[str, int] = {}
        self._recent: dict[str, deque[list[dict[str, Any]]]] = {}

    @contextmanager
    def subscribe(self, response_id: str, *, limit: int = 1024) -> Iterator[Subscription]:
        sub = Subscription(limit)
        self._subs.setdefault(response_id, set()).add(sub)
        try:
            yield sub
        finally:
            subs = self._subs.get(response_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs[response_id]

    def publish(self, response_id: str, events: list[dict[str, Any]]) -> None:
        """Called by a writer with each batch after the store committed it. Followers must not mutate the events."""
        if events and response_id in self._published:
            self._published[response_id] = events[-1]["sequence_number"]
            self._recent.setdefault(response_id, deque(maxlen=RECENT_BATCHES)).append(events)
        for sub in self._subs.get(response_id, ()):
            sub.push(events)

    def writer_started(self, response_id: str, next_seq: int | None = None) -> None:
        self._writers[response_id] = self._writers.get(response_id, 0) + 1
        if next_seq is not None and response_id not in self._published:
            self._published[response_id] = next_seq - 1  # what the store holds before this writer's first commit

    def writer_stopped(self, response_id: str, error: BaseException | None = None) -> None:
        """A writer ended. With `error` (its store failed, e.g. `StoreUnavailable`), followers raise it once they
        have yielded everything committed, instead of waiting for events that will not come. A `Fenced` writer is
        not an error for followers: another process owns the response and they keep following it."""
        count = self._writers.get(response_id, 0) - 1
        if count > 0:
            self._writers[response_id] = count
        else:
            self._writers.pop(response_id, None)
            self._published.pop(response_id, None)
            self._recent.pop(response_id, None)
        # Wake followers so that they go back to polling at the normal interval.
        for sub in self._subs.get(response_id, ()):
            if error is not None and not isinstance(error, Fenced):
                sub.error = error
            sub.event.set()

    def has_writer(self, response_id: str) -> bool:
        return response_id in self._writers

    def committed_after(self, response_id: str, seq: int) -> list[list[dict[str, Any]]] | None:
        """What this process's writer of the response committed after `seq`, when it is all in memory: [] when
        it committed nothing after `seq`, else its recent batches (from before `seq` on; a follower skips what it
        has). A follower from `seq` then gets everything by push, with no store read first (a first token not
        delayed by a round trip). None when the store must be read: no such writer here, or it did not say where
        it started, or what follows `seq` is older than its recent batches."""
        published = self._published.get(response_id)
        if response_id not in self._writers or published is None:
            return None
        if published <= seq:
            return []
        recent = self._recent.get(response_id)
        if not recent or recent[0][0]["sequence_number"] > seq + 1:
            return None
        return list(recent)


LOCAL_FEEDS = LocalFeeds()


async def follow(
    store: Store,
    response_id: str,
    after_seq: int = -1,
    *,
    poll_interval: float = 0.05,
    max_wait: float = 900.0,
    feeds: LocalFeeds | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """Committed events with `sequence_number > after_seq`, in order, until the terminal event (included).

    Ends at once if the response is finished and has nothing after `after_seq`. Raises `NotFound` if the response
    does not exist, `TimeoutError` if no terminal event came within `max_wait` seconds (the caller may then check
    the lease, take over, and follow again from the last event it got), and the error of a writer in this process
    whose store failed (`StoreUnavailable`...) once everything it committed has been yielded.
    """
    feeds = LOCAL_FEEDS if feeds is None else feeds
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max_wait
    last = after_seq
    with feeds.subscribe(response_id) as sub:
        # Subscribed before reading, so nothing committed from here on is missed; the first read is needed only for
        # what was committed before, or by another process, and not in memory.
        committed = feeds.committed_after(response_id, after_seq)
        read_store = committed is None
        if committed:
            sub.batches.extendleft(reversed(committed))  # before anything pushed since (nothing: no await between)
        checked = not read_store  # a local writer: the response exists and is not finished
        while True:
            if read_store:
                read_store = False
                sub.overflowed = False
                events = await store.read_events(response_id, last)
                if not events and not checked:
                    # Once per follow: a missing response is an error, and a finished one with nothing after
                    # `last` (a resume after the terminal event) has nothing more to give.
                    checked = True
                    header = await store.get(response_id, snapshots=False)
                    if header is None:
                        raise NotFound(f"response {response_id} not found")
                    if header.terminal and header.last_seq <= last:
                        return
                for event in events:
                    seq = event["sequence_number"]
                    if seq <= last:
                        continue
                    if seq != last + 1:
                        raise StoreError(f"journal of {response_id} has a gap after {last}")
                    last = seq
                    yield event
                    if is_terminal_event(event):
                        return
            while sub.batches and not read_store:
                batch = sub.batches.popleft()
                if batch[-1]["sequence_number"] <= last:
                    continue  # already read from the store
                if batch[0]["sequence_number"] > last + 1:
                    read_store = True  # we subscribed after some commits: the store has them
                    break
                for event in batch:
                    seq = event["sequence_number"]
                    if seq <= last:
                        continue
                    last = seq
                    yield event
                    if is_terminal_event(event):
                        return
            if sub.overflowed:
                read_store = True
            if read_store:
                continue
            if sub.error is not None:
                # The writer of this process failed. What it committed was pushed before; read the store once more
                # in case a push was missed, then end.
                for event in await store.read_events(response_id, last):
                    if event["sequence_number"] == last + 1:
                        last += 1
                        yield event
                raise sub.error
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"no terminal event for {response_id} within {max_wait} s (last {last})")
            interval = max(poll_interval, LOCAL_WRITER_POLL) if feeds.has_writer(response_id) else poll_interval
            sub.event.clear()
            try:
                async with asyncio.timeout(min(interval, remaining)):
                    await sub.event.wait()
            except TimeoutError:
                read_store = True
