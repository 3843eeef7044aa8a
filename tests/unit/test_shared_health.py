"""Live stats and the circuit breaker shared through a store (routing/stats.py, routing/circuit.py,
routing/health.py): the decayed estimates, and two boards (two instances) on one store, memory and SQLite."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from unbroken.config import HealthSettings
from unbroken.journal.counters import CounterBatcher, CounterReader
from unbroken.journal.memory import MemoryStore
from unbroken.journal.sqlite import SQLiteStore
from unbroken.journal.store import Store
from unbroken.routing.circuit import RECORD_KIND
from unbroken.routing.health import HealthBoard
from unbroken.routing.stats import attempt_fields, combine, merge

SETTINGS = HealthSettings(window_seconds=10, windows=12, half_life_seconds=30, failures_to_open=3, min_failures=5,
                          failure_share=0.5, open_seconds=30, probe_seconds=30)


class Clock:
    """Epoch time that moves only when the test says (the stores filter expired data by it too): one second into a
    stats window, so that nothing the test records decays unless it moves the clock."""

    def __init__(self) -> None:
        self.now = (time.time() // SETTINGS.window_seconds) * SETTINGS.window_seconds + 1.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# -- the estimates -----------------------------------------------------------------------------------------------


def window(*attempts: dict[str, float]) -> dict[str, float]:
    fields: dict[str, float] = {}
    for a in attempts:
        merge(fields, a)
    return fields


def ok(ttft: float = 0.2, out: int = 100, seconds: float = 2.0, inp: int = 1000, cached: int = 0) -> dict[str, float]:
    return attempt_fields(failure_kind=None, ttft=ttft, output_tokens=out, output_seconds=seconds,
                          input_tokens=inp, cached_input_tokens=cached)


def test_rates_means_and_throughput_of_one_window() -> None:
    w = window(*[ok(cached=500) for _ in range(6)], attempt_fields(failure_kind="rate_limited"),
               attempt_fields(failure_kind="server_error"))
    est = combine([(100.0, w)], now=105.0, width=10, half_life=30)
    assert est.samples == 8 and est.attempts == 8 and est.failures == 2
    assert est.error_rate == pytest.approx(2 / 8)
    assert est.rate_limit_rate == pytest.approx(1 / 8)
    assert est.cache_hit_rate == pytest.approx(0.5)
    assert est.mean_input_tokens == pytest.approx(1000)
    assert est.mean_output_tokens == pytest.approx(100)
    assert est.tokens_per_s == pytest.approx(50)
    assert est.ttft_p50 is not None and 0.19 < est.ttft_p50 <= 0.285  # within 0.2's bucket
    assert est.last_window == 100.0


def test_an_older_window_weighs_half_per_half_life() -> None:
    old = window(*[attempt_fields(failure_kind="server_error") for _ in range(4)])  # all failed, 30 s older
    new = window(*[ok() for _ in range(4)])
    est = combine([(100.0, new), (70.0, old)], now=105.0, width=10, half_life=30)
    # The new window weighs 1 (its middle is now), the old one 0.5: failures 2 of 6 decayed attempts.
    assert est.error_rate == pytest.approx(2 / 6)
    assert est.samples == pytest.approx(6)
    assert est.failures == 4  # the breaker's count is not decayed


def test_quantiles_need_samples_then_follow_the_tail() -> None:
    few = window(*[ok(ttft=0.2) for _ in range(4)])
    assert combine([(100.0, few)], now=105.0, width=10, half_life=30).ttft_p95 is None
    tail = window(*[ok(ttft=0.2) for _ in range(90)], *[ok(ttft=3.0) for _ in range(10)])
    est = combine([(100.0, tail)], now=105.0, width=10, half_life=30)
    assert est.ttft_p50 is not None and est.ttft_p50 < 0.3
    assert est.ttft_p95 is not None and 2.0 < est.ttft_p95 < 4.0


def test_request_faults_count_as_errors_but_not_toward_the_breaker() -> None:
    board = HealthBoard(Clock(), SETTINGS)
    for _ in range(10):
        board.record_failure("m", "a", "context_length")
    view = board.view("m", "a")
    assert view.circuit == "closed" and view.error_rate == 1.0


def test_the_board_reports_what_the_attempt_loop_passes() -> None:
    board = HealthBoard(Clock(), SETTINGS)
    for _ in range(5):
        board.record_success("m", "a", 0.3, output_tokens=200, output_seconds=4.0, input_tokens=800,
                             cached_input_tokens=200)
    board.record_failure("m", "a", "rate_limited")
    view = board.view("m", "a")
    assert view.samples == pytest.approx(6)
    assert view.tokens_per_s == pytest.approx(50)
    assert view.cache_hit_rate == pytest.approx(0.25)
    assert view.rate_limit_rate == pytest.approx(1 / 6)
    assert view.mean_output_tokens == pytest.approx(200)
    assert view.ttft_p50 is not None and view.ttft_p95 is not None


def test_a_failure_share_opens_without_consecutive_failures() -> None:
    board = HealthBoard(Clock(), SETTINGS)
    for _ in range(4):
        board.record_failure("m", "a", "server_error")
        assert board.view("m", "a").circuit == "closed"
        board.record_success("m", "a", 0.1)
    board.record_failure("m", "a", "server_error")  # the fifth failure of nine attempts
    view = board.view("m", "a")
    assert view.circuit == "open" and "5 of 9 recent attempts failed" in view.circuit_reason


# -- two instances on one store ------------------------------------------------------------------------------------


class Instance:
    def __init__(self, store: Store, clock: Clock) -> None:
        self.store = store
        self.counters = CounterBatcher(store)
        self.reader = CounterReader(store, self.counters, max_age=0.0, clock=clock)  # every refresh reads
        self.board = HealthBoard(clock, SETTINGS)
        self.board.configure(SETTINGS, [("m", "a"), ("m", "b")])
        self.board.share(store, self.counters, self.reader)

    async def sync(self) -> None:
        """What the runtime's background tasks do: flush the counters, refresh the board."""
        await self.counters.flush()
        await self.board.refresh()


@pytest.fixture(params=["memory", "sqlite"])
async def pair(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[Instance, Instance, Clock]]:
    clock = Clock()
    if request.param == "memory":
        shared = MemoryStore(clock=clock)
        stores: tuple[Store, Store] = (shared, shared)
    else:  # two connections to one file, as two processes have
        stores = (SQLiteStore(str(tmp_path / "j.db"), clock=clock), SQLiteStore(str(tmp_path / "j.db"), clock=clock))
    yield Instance(stores[0], clock), Instance(stores[1], clock), clock
    for s in set(stores):
        await s.close()


async def test_one_instance_sees_the_others_stats(pair: tuple[Instance, Instance, Clock]) -> None:
    one, two, _ = pair
    for _ in range(8):
        one.board.record_success("m", "a", 0.2, output_tokens=100, output_seconds=1.0, input_tokens=500)
    for _ in range(2):
        one.board.record_failure("m", "a", "rate_limited")
    assert two.board.view("m", "a").samples == 0
    await one.sync()
    await two.sync()
    view = two.board.view("m", "a")
    assert view.samples == pytest.approx(10)
    assert view.error_rate == pytest.approx(0.2) and view.rate_limit_rate == pytest.approx(0.2)
    assert view.tokens_per_s == pytest.approx(100)
    assert view.ttft_p95 is not None
    assert two.board.view("m", "b").samples == 0  # per deployment
    # Both instances' attempts add up, in both views.
    two.board.record_success("m", "a", 0.2, output_tokens=100, output_seconds=1.0, input_tokens=500)
    await two.sync()
    await one.sync()
    assert one.board.view("m", "a").samples == pytest.approx(11)
    assert two.board.view("m", "a").samples == pytest.approx(11)


async def test_the_breaker_opens_everywhere_with_one_probe_then_closes_and_reopens(
        pair: tuple[Instance, Instance, Clock]) -> None:
    one, two, clock = pair
    for _ in range(3):
        one.board.record_failure("m", "a", "server_error")
    assert one.board.view("m", "a").circuit == "open"  # at once where the failures were seen
    assert two.board.view("m", "a").circuit == "closed"
    await one.sync()
    await two.sync()
    assert two.board.view("m", "a").circuit == "open"  # the other instance, after one refresh
    assert "consecutive failures" in two.board.view("m", "a").circuit_reason
    assert two.board.view("m", "b").circuit == "closed"

    # The open period ends: nobody has claimed the probe yet, so both still avoid it; then exactly one claims it.
    clock.advance(SETTINGS.open_seconds + 1)
    assert {one.board.view("m", "a").circuit, two.board.view("m", "a").circuit} == {"open"}
    await asyncio.gather(one.board.refresh(), two.board.refresh())
    await asyncio.gather(one.board.refresh(), two.board.refresh())
    seen = sorted([one.board.view("m", "a").circuit, two.board.view("m", "a").circuit])
    assert seen == ["half_open", "open"]
    prober, other = (one, two) if one.board.view("m", "a").circuit == "half_open" else (two, one)
    record = await one.store.get_record(RECORD_KIND, "m/a")
    assert record is not None and record.data["state"] == "probing" and record.data["owner"] == prober.board.instance

    # The probe fails: open again, everywhere.
    prober.board.record_failure("m", "a", "server_error")
    assert prober.board.view("m", "a").circuit == "open"
    await prober.sync()
    await other.sync()
    assert other.board.view("m", "a").circuit == "open"
    assert "probe failed" in other.board.view("m", "a").circuit_reason

    # Next period: a probe again, and this time it succeeds: closed everywhere.
    clock.advance(SETTINGS.open_seconds + 1)
    await asyncio.gather(one.board.refresh(), two.board.refresh())
    await asyncio.gather(one.board.refresh(), two.board.refresh())
    holders = [i for i in (one, two) if i.board.view("m", "a").circuit == "half_open"]
    assert len(holders) == 1
    holders[0].board.record_success("m", "a", 0.1)
    assert holders[0].board.view("m", "a").circuit == "closed"
    await holders[0].sync()
    await one.sync()
    await two.sync()
    assert one.board.view("m", "a").circuit == two.board.view("m", "a").circuit == "closed"
    # Closed again: the failures before the close do not reopen it, a single new one does not either.
    one.board.record_failure("m", "a", "server_error")
    await one.sync()
    await two.sync()
    assert two.board.view("m", "a").circuit == "closed"


async def test_a_lapsed_probe_can_be_claimed_by_another_instance(pair: tuple[Instance, Instance, Clock]) -> None:
    one, two, clock = pair
    for _ in range(3):
        one.board.record_failure("m", "a", "timeout")
    await one.sync()
    await two.sync()
    clock.advance(SETTINGS.open_seconds + 1)
    await one.board.refresh()  # one claims the probe ... and dies without a word
    assert one.board.view("m", "a").circuit == "half_open"
    await two.board.refresh()
    assert two.board.view("m", "a").circuit == "open"
    clock.advance(SETTINGS.probe_seconds + 1)
    await two.board.refresh()
    await two.board.refresh()
    assert two.board.view("m", "a").circuit == "half_open"


async def test_failures_spread_over_instances_open_the_circuit(pair: tuple[Instance, Instance, Clock]) -> None:
    """No instance sees `failures_to_open` in a row, but together they fail most attempts."""
    one, two, _ = pair
    for board in (one.board, two.board, one.board):
        board.record_failure("m", "a", "overloaded")
        board.record_failure("m", "a", "overloaded")
        board.record_success("m", "a", 0.1)
    assert one.board.view("m", "a").circuit == "closed"
    await one.sync()
    await two.sync()
    await one.board.refresh()
    await two.board.refresh()
    assert two.board.view("m", "a").circuit == "open" and one.board.view("m", "a").circuit == "open"


async def test_a_close_elsewhere_ends_this_instances_run_of_failures(pair: tuple[Instance, Instance, Clock]) -> None:
    one, two, clock = pair
    for _ in range(3):
        one.board.record_failure("m", "a", "timeout")
    await one.sync()
    await two.sync()
    clock.advance(SETTINGS.open_seconds + 1)
    await two.board.refresh()  # two claims the probe, and it succeeds
    assert two.board.view("m", "a").circuit == "half_open"
    two.board.record_success("m", "a", 0.1)
    await two.sync()
    await one.sync()
    assert one.board.view("m", "a").circuit == "closed"
    one.board.record_failure("m", "a", "timeout")  # one failure after the close: not a fourth in a row
    assert one.board.view("m", "a").circuit == "closed"


class CountingStore(MemoryStore):
    def __init__(self, clock: Clock) -> None:
        super().__init__(clock=clock)
        self.keys_read: list[int] = []

    async def get_counters(self, keys):  # type: ignore[no-untyped-def]
        self.keys_read.append(len(keys))
        return await super().get_counters(keys)


async def test_windows_that_stopped_growing_are_read_once() -> None:
    clock = Clock()
    store = CountingStore(clock)
    writer, reader = Instance(store, clock), Instance(store, clock)
    writer.board.record_success("m", "a", 0.2)
    await writer.sync()
    await reader.sync()
    assert reader.board.view("m", "a").samples == pytest.approx(1)
    for _ in range(6):  # a minute on: every window but the newest has stopped growing
        clock.advance(SETTINGS.window_seconds)
        await reader.board.refresh()
    store.keys_read.clear()
    await reader.board.refresh()
    assert store.keys_read == [4]  # of m/a and m/b: the current window and the one that ended a second ago
    view = reader.board.view("m", "a")
    assert 0 < view.samples < 0.5 and view.last_attempt_window is not None  # the old window is still counted


def test_one_request_is_the_probe_and_the_others_see_the_circuit_open() -> None:
    clock = Clock()
    board = HealthBoard(clock, SETTINGS)
    for _ in range(3):
        board.record_failure("m", "a", "server_error")
    clock.advance(SETTINGS.open_seconds + 1)
    assert board.view("m", "a").circuit == "half_open"
    board.admit("m", "a")  # the runtime routed a request with `a` first: the probe
    view = board.view("m", "a")
    assert view.circuit == "open" and view.probe_in_flight
    board.admit("m", "a")  # a later request ranked it first anyway: not a second probe
    assert board.view("m", "a").probe_in_flight
    board.record_failure("m", "a", "server_error")  # the probe's outcome
    view = board.view("m", "a")
    assert view.circuit == "open" and not view.probe_in_flight and "probe failed" in view.circuit_reason
    clock.advance(SETTINGS.open_seconds + 1)
    board.admit("m", "a")
    clock.advance(SETTINGS.probe_seconds + 1)  # the probe never reported: the next request may probe
    assert board.view("m", "a").circuit == "half_open"
    board.admit("m", "a")
    board.record_success("m", "a", 0.1)
    assert board.view("m", "a").circuit == "closed"


def test_admitting_a_closed_deployment_changes_nothing() -> None:
    board = HealthBoard(Clock(), SETTINGS)
    board.admit("m", "a")
    assert board.view("m", "a").circuit == "closed" and not board.view("m", "a").probe_in_flight
