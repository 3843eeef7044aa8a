"""Batched counters (journal/counters.py): sums flushed in one call, kept on a failed flush, read through a cache
that adds this instance's pending increments."""

from __future__ import annotations

import asyncio
import time

from unbroken.journal.counters import CounterBatcher, CounterReader
from unbroken.journal.memory import MemoryStore
from unbroken.journal.store import StoreUnavailable


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def counting(store: MemoryStore) -> tuple[Clock, CounterBatcher, CounterReader]:
    """A batcher and a reader over it (cache 5 s) on `store`, and the reader's clock."""
    clock = Clock()
    batcher = CounterBatcher(store)
    return clock, batcher, CounterReader(store, batcher, max_age=5.0, clock=clock)


async def test_increments_are_summed_and_flushed_in_one_call() -> None:
    store = MemoryStore()
    batcher = CounterBatcher(store)
    expires = time.time() + 3600
    for _ in range(50):
        batcher.add("spend#k", {"usd": 0.01, "requests": 1}, expires_at=expires)
    assert await store.get_counters(["spend#k"]) == {}
    await batcher.flush()
    assert batcher.flushes == 1
    got = await store.get_counters(["spend#k"])
    assert got["spend#k"]["requests"] == 50 and abs(got["spend#k"]["usd"] - 0.5) < 1e-9
    await batcher.flush()  # nothing pending: no store call
    assert batcher.flushes == 1


async def test_a_failed_flush_keeps_the_sums() -> None:
    class Down(MemoryStore):
        down = True

        async def add_counters(self, increments, *, expires_at):  # type: ignore[no-untyped-def]
            if self.down:
                raise StoreUnavailable("down")
            await super().add_counters(increments, expires_at=expires_at)

    store = Down()
    batcher = CounterBatcher(store)
    expires = time.time() + 3600
    batcher.add("c", {"n": 2}, expires_at=expires)
    await batcher.flush()
    batcher.add("c", {"n": 3}, expires_at=expires)
    assert batcher.pending("c") == {"n": 5}
    store.down = False
    await batcher.flush()
    assert await store.get_counters(["c"]) == {"c": {"n": 5}}


async def test_reads_are_cached_and_include_pending() -> None:
    store = MemoryStore()
    clock, batcher, reader = counting(store)
    expires = time.time() + 3600
    await store.add_counters({"c": {"n": 10}}, expires_at=expires)  # as another instance would
    assert await reader.read(["c"]) == {"c": {"n": 10}}
    await store.add_counters({"c": {"n": 1}}, expires_at=expires)
    batcher.add("c", {"n": 100}, expires_at=expires)
    assert await reader.read(["c"]) == {"c": {"n": 110}}  # cached store value + own pending
    assert reader.reads == 1
    clock.now += 6
    assert await reader.read(["c", "absent"]) == {"c": {"n": 111}}
    assert reader.reads == 2


async def test_an_own_flush_does_not_drop_out_of_the_cached_value() -> None:
    store = MemoryStore()
    _, batcher, reader = counting(store)
    expires = time.time() + 3600
    await store.add_counters({"c": {"n": 10}}, expires_at=expires)
    assert await reader.read(["c"]) == {"c": {"n": 10}}
    batcher.add("c", {"n": 3}, expires_at=expires)
    await batcher.flush()  # no longer pending, and the cached store value predates it
    assert await reader.read(["c"]) == {"c": {"n": 13}}
    assert reader.reads == 1


async def test_a_flush_that_fails_part_way_puts_back_only_what_was_not_written() -> None:
    """Increments of two expiry groups: the first written, the second refused. Only the second stays pending, so
    the next flush does not count the first twice."""

    class FailsSecondCall(MemoryStore):
        calls = 0

        async def add_counters(self, increments, *, expires_at):  # type: ignore[no-untyped-def]
            self.calls += 1
            if self.calls == 2:
                raise StoreUnavailable("down")
            await super().add_counters(increments, expires_at=expires_at)

    store = FailsSecondCall()
    batcher = CounterBatcher(store)
    now = time.time()
    batcher.add("day", {"n": 1}, expires_at=now + 3600)
    batcher.add("minute", {"n": 1}, expires_at=now + 60)
    await batcher.flush()
    await batcher.flush()
    got = await store.get_counters(["day", "minute"])
    assert got == {"day": {"n": 1}, "minute": {"n": 1}}


async def test_a_read_while_a_flush_is_writing_still_counts_what_it_writes() -> None:
    """An admission between a flush taking the sums and the store having them must see them (rpm: a request
    admitted then was admitted against a count that lacked the requests being flushed)."""
    class HeldWrite(MemoryStore):
        def __init__(self) -> None:
            super().__init__()
            self.writing, self.release = asyncio.Event(), asyncio.Event()

        async def add_counters(self, increments, *, expires_at):  # type: ignore[no-untyped-def]
            self.writing.set()
            await asyncio.wait_for(self.release.wait(), 5)
            await super().add_counters(increments, expires_at=expires_at)

    store = HeldWrite()
    _, batcher, reader = counting(store)
    expires = time.time() + 3600
    assert await reader.read(["c"]) == {}
    batcher.add("c", {"n": 2}, expires_at=expires)
    flush = asyncio.create_task(batcher.flush())
    await asyncio.wait_for(store.writing.wait(), 5)
    assert await reader.read(["c"]) == {"c": {"n": 2}}  # being written: still counted, once
    store.release.set()
    await asyncio.wait_for(flush, 5)
    assert await reader.read(["c"]) == {"c": {"n": 2}}  # written and folded into the cache: still once


async def test_a_read_out_while_a_flush_lands_does_not_drop_what_was_flushed() -> None:
    """A store read that started before an own flush and returns after it must not overwrite the cached value the
    flush was folded into with its older one."""
    class HeldRead(MemoryStore):
        hold = False

        def __init__(self) -> None:
            super().__init__()
            self.reading, self.release = asyncio.Event(), asyncio.Event()

        async def get_counters(self, keys):  # type: ignore[no-untyped-def]
            found = await super().get_counters(keys)  # what the store held when the read was made
            if self.hold:
                self.reading.set()
                await asyncio.wait_for(self.release.wait(), 5)
            return found

    store = HeldRead()
    clock, batcher, reader = counting(store)
    expires = time.time() + 3600
    await store.add_counters({"c": {"n": 10}}, expires_at=expires)
    assert await reader.read(["c"]) == {"c": {"n": 10}}
    clock.now += 6  # stale: the next read goes to the store
    store.hold = True
    read = asyncio.create_task(reader.read(["c"]))
    await asyncio.wait_for(store.reading.wait(), 5)
    batcher.add("c", {"n": 3}, expires_at=expires)
    await batcher.flush()  # lands while the read is out; folded into the cached 10
    store.hold = False
    store.release.set()
    assert await asyncio.wait_for(read, 5) == {"c": {"n": 13}}
    assert await reader.read(["c"]) == {"c": {"n": 13}}
