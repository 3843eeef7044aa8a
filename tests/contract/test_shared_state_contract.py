"""The store contract for counters and records (the shared state beside the journal), over every implementation.

Same fixtures as test_store_contract.py: memory, SQLite, moto and DynamoDB Local; `twin` is a second instance on the
same file / table, as another router process would have.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.contract.conftest import Clock
from unbroken.journal.store import AlreadyExists, Fenced, Store


async def test_counters_start_at_zero_and_add(store: Store, clock: Clock) -> None:
    expires = clock() + 3600
    assert await store.get_counters(["spend#a"]) == {}
    await store.add_counters({"spend#a": {"usd": 0.25, "requests": 1}}, expires_at=expires)
    await store.add_counters({"spend#a": {"usd": 0.5, "tokens": 10}, "spend#b": {"requests": 2}}, expires_at=expires)
    got = await store.get_counters(["spend#a", "spend#b", "spend#missing"])
    assert got == {"spend#a": {"usd": pytest.approx(0.75), "requests": 1, "tokens": 10}, "spend#b": {"requests": 2}}


async def test_counters_from_two_instances_add_up(store: Store, twin: Store, clock: Clock) -> None:
    expires = clock() + 3600

    async def bump(target: Store, n: int) -> None:
        for _ in range(n):
            await target.add_counters({"rpm#k": {"requests": 1, "tokens": 3}}, expires_at=expires)

    await asyncio.gather(bump(store, 15), bump(twin, 15))
    assert await twin.get_counters(["rpm#k"]) == {"rpm#k": {"requests": 30, "tokens": 90}}


async def test_expired_counters_are_invisible_and_restart(store: Store, clock: Clock) -> None:
    await store.add_counters({"win#1": {"n": 5}}, expires_at=clock() + 60)
    clock.advance(120)
    assert await store.get_counters(["win#1"]) == {}
    await store.add_counters({"win#1": {"n": 1}}, expires_at=clock() + 60)
    assert await store.get_counters(["win#1"]) == {"win#1": {"n": 1}}


async def test_many_counter_keys_in_one_read(store: Store, clock: Clock) -> None:
    keys = [f"stats#d{i}" for i in range(130)]  # more than one DynamoDB BatchGetItem page
    await store.add_counters({key: {"n": i} for i, key in enumerate(keys)}, expires_at=clock() + 3600)
    got = await store.get_counters(keys)
    assert {key: got[key]["n"] for key in got} == {key: i for i, key in enumerate(keys) if i > 0 or key in got}
    assert len(got) == 130


async def test_record_create_replace_and_versions(store: Store, clock: Clock) -> None:
    assert await store.get_record("key", "k1") is None
    assert await store.put_record("key", "k1", {"tenant": "t", "revoked": False}, expected_version=0) == 1
    with pytest.raises(AlreadyExists):
        await store.put_record("key", "k1", {"tenant": "other"}, expected_version=0)
    record = await store.get_record("key", "k1")
    assert record is not None and record.name == "k1" and record.data == {"tenant": "t", "revoked": False}
    assert record.version == 1
    assert await store.put_record("key", "k1", {"tenant": "t", "revoked": True}, expected_version=1) == 2
    with pytest.raises(Fenced):
        await store.put_record("key", "k1", {"tenant": "t"}, expected_version=1)  # lost the race
    assert await store.put_record("key", "k1", {"tenant": "t", "note": "forced"}) == 3
    with pytest.raises(Fenced):
        await store.put_record("key", "absent", {"x": 1}, expected_version=4)


async def test_compare_and_set_has_one_winner(store: Store, twin: Store, clock: Clock) -> None:
    await store.put_record("circuit", "m/d", {"state": "open"}, expected_version=0)

    async def claim(target: Store) -> bool:
        try:
            await target.put_record("circuit", "m/d", {"state": "half_open"}, expected_version=1)
        except Fenced:
            return False
        return True

    wins = await asyncio.gather(claim(store), claim(twin), claim(store), claim(twin))
    assert sum(wins) == 1


async def test_records_listed_by_kind_in_name_order(store: Store, twin: Store, clock: Clock) -> None:
    for name in ("b", "a", "c"):
        await store.put_record("key", name, {"name": name})
    await store.put_record("budget", "a", {"usd": 1})
    listed = await twin.list_records("key")
    assert [record.name for record in listed] == ["a", "b", "c"]
    assert [record.data for record in listed] == [{"name": "a"}, {"name": "b"}, {"name": "c"}]
    assert [record.name for record in await twin.list_records("budget")] == ["a"]
    assert await twin.list_records("nothing") == []


async def test_expired_and_deleted_records(store: Store, clock: Clock) -> None:
    await store.put_record("session", "s", {"x": 1}, expires_at=clock() + 60)
    await store.put_record("session", "t", {"x": 2})
    clock.advance(120)
    assert await store.get_record("session", "s") is None
    assert [record.name for record in await store.list_records("session")] == ["t"]
    assert await store.put_record("session", "s", {"x": 3}, expected_version=0) >= 1  # expired counts as absent
    assert await store.delete_record("session", "t") is True
    assert await store.delete_record("session", "t") is False
    assert await store.get_record("session", "t") is None
