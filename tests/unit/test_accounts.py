"""The pieces of keys, spend and admission without a server: UTC periods and Retry-After, the lookup cache (found
and not-found answers kept at most max_age, bounded), key records, and what a charge adds to which counter."""

from __future__ import annotations

import asyncio
import calendar

import pytest

from unbroken.durable import spend
from unbroken.durable.keys import ApiKeyRecord, Budgets, Limits, RecordCache, secret_digest
from unbroken.journal.counters import CounterBatcher
from unbroken.journal.memory import MemoryStore
from unbroken.journal.store import Record


def _t(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: float = 0.0) -> float:
    return calendar.timegm((year, month, day, hour, minute, 0)) + second


def test_periods_and_the_seconds_to_their_ends() -> None:
    t = _t(2026, 12, 31, 23, 59, 30.5)
    assert (spend.day_of(t), spend.month_of(t), spend.minute_of(t)) == ("2026-12-31", "2026-12", "2026-12-31T23:59")
    assert spend.seconds_to_next_minute(t) == pytest.approx(29.5)
    assert spend.seconds_to_next_day(t) == pytest.approx(29.5)
    assert spend.seconds_to_next_month(t) == pytest.approx(29.5)  # December ends the year
    assert spend.seconds_to_next_month(_t(2026, 2, 1)) == 28 * 86400
    assert spend.days_between(_t(2026, 2, 27, 12), _t(2026, 3, 1)) == ["2026-02-27", "2026-02-28", "2026-03-01"]


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_the_cache_keeps_found_and_missing_answers_for_at_most_max_age() -> None:
    store = MemoryStore()
    clock = _Clock()
    cache = RecordCache(store, "apikey", max_age=5.0, max_entries=3, clock=clock)
    assert await cache.get("a") is None and cache.reads == 1
    await store.put_record("apikey", "a", {"id": "key_a"})
    assert await cache.get("a") is None and cache.reads == 1  # the negative answer, still young
    clock.now += 5.1
    found = await cache.get("a")
    assert found is not None and found.data == {"id": "key_a"} and cache.reads == 2
    await store.put_record("apikey", "a", {"id": "key_a", "revoked": True})
    assert (await cache.get("a")) == found  # cached
    clock.now += 5.1
    again = await cache.get("a")
    assert again is not None and again.data["revoked"] is True  # seen within max_age (+ the read)
    cache.forget("a")
    await cache.get("a")
    assert cache.reads == 4
    for name in ("b", "c", "d", "e"):  # bounded: the oldest answers go first
        await cache.get(name)
    assert len(cache._entries) == 3 and "a" not in cache._entries


def test_a_key_record_round_trips_without_its_secret() -> None:
    key = ApiKeyRecord(id="key_1", digest=secret_digest("sk-ub-x"), tenant="acme", name="ci", models=("demo",),
                       budgets=Budgets(daily_usd=1.5), limits=Limits(rpm=10), expires_at=2e9, created_at=1.0)
    data = key.data()
    assert "sk-ub-x" not in repr(data) and key.digest not in repr(data)
    back = ApiKeyRecord.of(Record(key.digest, data, 3))
    assert back == ApiKeyRecord(**{**{f: getattr(key, f) for f in key.__slots__}, "version": 3})
    assert back.allows("demo") and not back.allows("other")
    assert back.expired(2e9) and not back.expired(2e9 - 1)


async def test_a_charge_goes_to_the_account_the_model_and_each_attempts_deployment() -> None:
    batcher = CounterBatcher(MemoryStore())
    now = _t(2026, 12, 2, 10, 30)
    account = spend.Account("acme", "key_1")
    spend.count_request(batcher, account, "demo", now)
    spend.charge(batcher, account, "demo", [spend.Charge("sim-0", 0.5, 10, 0), spend.Charge("sim-1", 1.0, 10, 20)],
                 now)
    day = "2026-12-02"
    for dimension, name in (("key", "key_1"), ("tenant", "acme"), ("model", "demo")):
        assert batcher.pending(spend.spend_key(dimension, name, day)) == {  # type: ignore[arg-type]
            "requests": 1, "usd": 1.5, "input_tokens": 20, "output_tokens": 20}
        assert batcher.pending(spend.spend_key(dimension, name, "2026-12"))["usd"] == 1.5  # type: ignore[arg-type]
    assert batcher.pending(spend.spend_key("deployment", "demo/sim-0", day)) == {
        "usd": 0.5, "input_tokens": 10, "output_tokens": 0, "attempts": 1}
    assert batcher.pending(spend.window_key("key", "key_1", "2026-12-02T10:30")) == {"requests": 1, "tokens": 40}
    assert batcher.pending(spend.window_key("tenant", "acme", "2026-12-02T10:30"))["tokens"] == 40
    # No key id (a token, anonymous): the tenant and the model still count.
    spend.count_request(batcher, spend.Account("jwt:u"), "demo", now)
    assert batcher.pending(spend.spend_key("tenant", "jwt:u", day)) == {"requests": 1}


class _HeldStore(MemoryStore):
    """A store whose record reads, while `hold` is set, read and then wait until released before answering: a read
    in flight that answers what the store held when it started."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.holding = asyncio.Event()  # a read is held
        self.hold = False
        self.started = 0

    async def get_record(self, kind: str, name: str) -> Record | None:
        self.started += 1
        record = await super().get_record(kind, name)
        if self.hold:
            self.holding.set()
            await self.release.wait()
        return record


async def _a_background_read_held() -> tuple[_HeldStore, _Clock, RecordCache]:
    """A cache whose answer for "t" ({"v": 1}, read at 100 s) is 3 s old, and its background read, held in flight."""
    store = _HeldStore()
    clock = _Clock()
    cache = RecordCache(store, "tenant", max_age=5.0, max_entries=10, clock=clock)
    await store.put_record("tenant", "t", {"v": 1})
    await cache.get("t")
    clock.now += 3.0
    store.hold = True
    for _ in range(3):
        assert (await cache.get("t")).data == {"v": 1}  # type: ignore[union-attr]
    await asyncio.wait_for(store.holding.wait(), 5)
    store.hold = False
    return store, clock, cache


async def test_an_answer_past_half_its_age_is_returned_at_once_and_read_again_behind_it() -> None:
    store = MemoryStore()
    clock = _Clock()
    cache = RecordCache(store, "tenant", max_age=5.0, max_entries=10, clock=clock)
    assert await cache.get("t") is None and cache.reads == 1
    await store.put_record("tenant", "t", {"budgets": {}})
    clock.now += 2.0
    assert await cache.get("t") is None and cache.reads == 1  # young: no read at all
    clock.now += 1.0  # 3 s: past half of max_age
    assert await cache.get("t") is None  # the old answer, at once
    await cache.settle()
    assert cache.reads == 2
    fresh = await cache.get("t")
    assert fresh is not None and fresh.data == {"budgets": {}} and cache.reads == 2  # the read behind it
    clock.now += 4.0  # 4 s after that background read: still within max_age of it
    assert await cache.get("t") == fresh
    await cache.settle()
    assert cache.reads == 3


async def test_one_background_read_per_name_and_a_forget_drops_the_one_in_flight() -> None:
    store, _, cache = await _a_background_read_held()
    assert store.started == 2  # one read for the first get, one background read for the next three
    await store.put_record("tenant", "t", {"v": 2})
    cache.forget("t")  # an admin write: this instance must see it at once
    got = await cache.get("t")  # read now: the forgotten answer is gone
    assert got is not None and got.data == {"v": 2}
    store.release.set()  # the background read, from before the write, comes back with v1: dropped
    await cache.settle()
    assert (await cache.get("t")).data == {"v": 2}  # type: ignore[union-attr]


async def test_a_background_read_finishing_late_does_not_replace_a_newer_answer() -> None:
    store, clock, cache = await _a_background_read_held()
    await store.put_record("tenant", "t", {"v": 2})
    clock.now += 2.5  # 5.5 s after the first read: past max_age, the next get reads before answering
    assert (await cache.get("t")).data == {"v": 2}  # type: ignore[union-attr]
    store.release.set()  # the background read from 3 s comes back with v1, older than the answer in hand
    await cache.settle()
    assert (await cache.get("t")).data == {"v": 2}  # type: ignore[union-attr]
