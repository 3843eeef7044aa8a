"""Shared counters without a write per request: increments are summed in process and flushed now and then; reads
come from a short-lived cache. Spend, rate limits and the routing stats all count this way.

Why it is safe: counter increments commute (`Store.add_counters`), so instances never coordinate; each flushes its
own sums. What it costs: another instance sees an increment up to `flush_seconds` late (plus the reader's cache age),
and an instance that dies loses at most its last unflushed interval. A reader adds its own pending increments to
what the store said (`CounterReader.read`), so an instance never lags behind itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence

from unbroken.journal.store import Store, StoreError

log = logging.getLogger("unbroken")

FLUSH_SECONDS = 2.0
READ_CACHE_SECONDS = 5.0
# A flush that fails keeps its sums for the next one; past this many keys the oldest are dropped (and logged), so a
# store outage cannot grow memory without bound.
MAX_PENDING_KEYS = 10_000


class CounterBatcher:
    """Local sums of increments per counter key, written by `flush()` (called by `run()` every `flush_seconds`)."""

    def __init__(self, store: Store, *, flush_seconds: float = FLUSH_SECONDS) -> None:
        self.store = store
        self.flush_seconds = flush_seconds
        self._pending: dict[str, dict[str, float]] = {}
        self._expires: dict[str, float] = {}
        # What a flush is writing: still this instance's own until the store has it and the readers have folded it
        # in (else a read meanwhile, an admission's, would see it nowhere and admit too much).
        self._flushing: dict[str, dict[str, float]] = {}
        self._lock = asyncio.Lock()
        # Called with what each successful store call added (the reader folds it into its cache).
        self._on_flushed: list[Callable[[Mapping[str, Mapping[str, float]]], None]] = []
        self.flushes = 0  # store calls made (one per flush with anything pending), for the benchmarks

    def add(self, key: str, deltas: Mapping[str, float], *, expires_at: float) -> None:
        fields = self._pending.get(key)
        if fields is None:
            if len(self._pending) >= MAX_PENDING_KEYS:
                dropped = next(iter(self._pending))
                self._pending.pop(dropped)
                self._expires.pop(dropped, None)
                log.warning("counter increments dropped", extra={"counter": dropped, "reason": "pending bound"})
            fields = self._pending[key] = {}
        for name, delta in deltas.items():
            fields[name] = fields.get(name, 0.0) + float(delta)
        self._expires[key] = max(self._expires.get(key, 0.0), expires_at)

    def pending(self, key: str) -> dict[str, float]:
        """What this instance added to `key` and has not flushed yet (being written counts as not yet)."""
        return _plus(self._pending.get(key), self._flushing.get(key))

    def with_pending(self, key: str, stored: Mapping[str, float] | None) -> dict[str, float]:
        """`key`'s fields as read from the store plus what this instance has not flushed yet."""
        return _plus(stored, self.pending(key))

    async def flush(self) -> None:
        """Write every pending sum. On a store error the sums stay pending (merged with newer ones) for next time."""
        async with self._lock:
            if not self._pending:
                return
            batch, expires = self._pending, self._expires
            self._pending, self._expires = {}, {}
            groups: dict[float, dict[str, dict[str, float]]] = {}
            for key, fields in batch.items():
                groups.setdefault(expires[key], {})[key] = fields
            written = 0
            self._flushing = batch
            try:
                for expires_at, increments in groups.items():
                    await self.store.add_counters(increments, expires_at=expires_at)
                    written += 1
                    self.flushes += 1
                    for key in increments:  # in the store now, and in the readers' caches next
                        del self._flushing[key]
                    for listener in self._on_flushed:
                        listener(increments)
            except StoreError as exc:
                # Only the groups not written go back: those written would be counted twice. (Within the failed
                # call some keys may have been applied, on DynamoDB one UpdateItem per key: those may count twice.)
                for increments in list(groups.values())[written:]:
                    for key, fields in increments.items():
                        self.add(key, fields, expires_at=expires[key])
                log.warning("counter flush failed", extra={"error": str(exc), "keys": len(batch)})
            finally:
                self._flushing = {}  # written, put back, or (cancelled) lost with the flush

    async def run(self) -> None:
        """Flush every `flush_seconds` until cancelled; the runtime starts it and flushes once more at shutdown."""
        while True:  # ends by cancellation
            await asyncio.sleep(self.flush_seconds)
            await self.flush()


class CounterReader:
    """Reads counters through a cache at most `max_age` seconds old, plus this instance's pending increments."""

    def __init__(self, store: Store, batcher: CounterBatcher | None = None, *,
                 max_age: float = READ_CACHE_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.batcher = batcher
        self.max_age = max_age
        self._clock = clock
        self._cache: dict[str, tuple[float, dict[str, float] | None]] = {}
        self.reads = 0  # store calls made, for the benchmarks
        if batcher is not None:
            # What leaves `pending` at a flush is now in the store: add it to the cached value too, or the instance
            # would lag behind itself until the cache entry expires.
            batcher._on_flushed.append(self._absorb)

    async def read(self, keys: Sequence[str]) -> dict[str, dict[str, float]]:
        now = self._clock()
        stale = [k for k in dict.fromkeys(keys) if k not in self._cache or now - self._cache[k][0] > self.max_age]
        if stale:
            found = await self.store.get_counters(stale)
            self.reads += 1
            if len(self._cache) > 4 * MAX_PENDING_KEYS:
                self._cache.clear()
            for key in stale:
                # Counters only grow: the larger of the two, field by field, because a flush of this instance
                # may have been folded into the cached value while this read, which may predate its write, was
                # out (taking the read's alone would drop it, and an admission would see too little).
                self._cache[key] = (now, _larger(self._cache.get(key, (0.0, None))[1], found.get(key)))
        result: dict[str, dict[str, float]] = {}
        for key in keys:
            cached = self._cache[key][1]
            fields = self.batcher.with_pending(key, cached) if self.batcher is not None else dict(cached or {})
            if fields:
                result[key] = fields
        return result

    def _absorb(self, increments: Mapping[str, Mapping[str, float]]) -> None:
        for key, deltas in increments.items():
            cached = self._cache.get(key)
            if cached is None:
                continue
            self._cache[key] = (cached[0], _plus(cached[1], deltas))

    def forget(self, key: str) -> None:
        """Drop a cached value (the next read asks the store)."""
        self._cache.pop(key, None)


def _plus(a: Mapping[str, float] | None, b: Mapping[str, float] | None) -> dict[str, float]:
    """Field by field sum; None counts as no fields."""
    out = dict(a or {})
    for name, value in (b or {}).items():
        out[name] = out.get(name, 0.0) + value
    return out


def _larger(a: Mapping[str, float] | None, b: Mapping[str, float] | None) -> dict[str, float] | None:
    """Field by field maximum; None when neither holds a value (a counter the store does not have)."""
    if a is None or b is None:
        held = a if b is None else b
        return None if held is None else dict(held)
    return {name: max(a.get(name, 0.0), b.get(name, 0.0)) for name in a.keys() | b.keys()}
