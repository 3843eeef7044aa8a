"""The shared health board (routing/health.py) over every store, DynamoDB Local included: two boards, each on its
own store instance of one backend (`twin`), as two router processes have. The logic itself is tested in
tests/unit/test_shared_health.py; this is the same story on the real backends."""

from __future__ import annotations

import asyncio

from tests.contract.conftest import Clock
from unbroken.config import HealthSettings
from unbroken.journal.counters import CounterBatcher, CounterReader
from unbroken.journal.store import Store
from unbroken.routing.circuit import RECORD_KIND
from unbroken.routing.health import HealthBoard

SETTINGS = HealthSettings()


def board_on(store: Store, clock: Clock) -> tuple[HealthBoard, CounterBatcher]:
    counters = CounterBatcher(store)
    board = HealthBoard(clock, SETTINGS)
    board.configure(SETTINGS, [("m", "a"), ("m", "b")])
    board.share(store, counters, CounterReader(store, counters, max_age=0.0, clock=clock))
    return board, counters


async def sync(board: HealthBoard, counters: CounterBatcher) -> None:
    await counters.flush()
    await board.refresh()


async def test_stats_and_one_probe_across_two_instances(store: Store, twin: Store, clock: Clock) -> None:
    one, one_counters = board_on(store, clock)
    two, two_counters = board_on(twin, clock)
    for _ in range(5):
        one.record_success("m", "b", 0.3, output_tokens=50, output_seconds=1.0, input_tokens=100)
    for _ in range(3):
        one.record_failure("m", "a", "server_error")
    await sync(one, one_counters)
    await sync(two, two_counters)
    a, b = two.view("m", "a"), two.view("m", "b")
    assert a.circuit == "open" and a.error_rate == 1.0 and a.samples > 2.5
    assert b.circuit == "closed" and b.error_rate == 0.0 and b.ttft_p95 is not None and b.tokens_per_s is not None

    clock.advance(SETTINGS.open_seconds + 1)
    for _ in range(2):
        await asyncio.gather(one.refresh(), two.refresh())
    holders = [board for board in (one, two) if board.view("m", "a").circuit == "half_open"]
    assert len(holders) == 1
    record = await store.get_record(RECORD_KIND, "m/a")
    assert record is not None and record.data["owner"] == holders[0].instance

    holders[0].record_success("m", "a", 0.2)
    order = [(one, one_counters), (two, two_counters)]
    if holders[0] is two:
        order.reverse()  # the prober writes the close, then the other reads it
    for board, counters in order:
        await sync(board, counters)
    assert one.view("m", "a").circuit == two.view("m", "a").circuit == "closed"
