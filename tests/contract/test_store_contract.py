"""The store contract: one suite, run against memory, SQLite, moto and DynamoDB Local (see conftest.py)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import itertools
import json
import random
import uuid
from typing import Any

import pytest

from tests.contract.conftest import Clock
from unbroken.journal.memory import MemoryStore
from unbroken.journal.sqlite import SQLiteStore
from unbroken.journal.store import (
    AlreadyExists,
    Fenced,
    NotFound,
    ResponseHeader,
    Store,
)


def new_header(clock: Clock, *, tenant: str = "tenant-a", ttl: float = 3600.0, **fields: Any) -> ResponseHeader:
    now = clock()
    values: dict[str, Any] = {
        "id": f"resp_{uuid.uuid4().hex}",
        "tenant": tenant,
        "created_at": now,
        "expires_at": now + ttl,
        "request": {"model": "m", "input": "hi"},
    }
    values.update(fields)
    return ResponseHeader(**values)


def delta(seq: int, text: str, item: str = "msg_1", output_index: int = 0, content_index: int = 0) -> dict[str, Any]:
    return {
        "type": "response.output_text.delta",
        "sequence_number": seq,
        "item_id": item,
        "output_index": output_index,
        "content_index": content_index,
        "delta": text,
        "logprobs": [],
    }


def deltas(start: int, count: int, text: str = "tok") -> list[dict[str, Any]]:
    return [delta(start + i, f"{text}{start + i} ") for i in range(count)]


def mixed_events() -> list[dict[str, Any]]:
    """A stream with everything the codec must keep exact: merged runs, unmergeable deltas, unicode, big events."""
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": {"id": "resp_x", "status": "in_progress", "output": []}},
        {"type": "response.in_progress", "response": {"id": "resp_x", "status": "in_progress", "temperature": 0.7}},
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {"id": "msg_1", "type": "message", "role": "assistant", "status": "in_progress", "content": []},
        },
        {
            "type": "response.content_part.added",
            "item_id": "msg_1",
            "output_index": 0,
            "content_index": 0,
            "part": {"type": "output_text", "text": "", "annotations": []},
        },
    ]
    texts = ["Hello", ", ", "wörld", " 🌍🚀", " 漢字かな", " مرحبا", "\n\n", '\u0000\t"q"\\', "\ud83d", "\ude00", ""]
    events += [delta(0, t) for t in texts]
    # Not mergeable: extra key, logprobs, other key order, an int index given as a bool, other content part.
    events.append({**delta(0, "obf"), "obfuscation": "x1y2"})
    events.append({**delta(0, "lp"), "logprobs": [{"token": "lp", "logprob": -0.25, "bytes": [108, 112]}]})
    events.append(
        {
            "sequence_number": 0,
            "type": "response.output_text.delta",
            "delta": "order",
            "item_id": "msg_1",
            "output_index": 0,
            "content_index": 0,
            "logprobs": [],
        }
    )
    events.append({**delta(0, "bool"), "output_index": True})
    events += [delta(0, t, content_index=1) for t in ("a", "b")]
    events += [delta(0, t, item="msg_2", output_index=1) for t in ("c", "d")]
    events.append(
        {
            "type": "response.function_call_arguments.delta",
            "item_id": "fc_1",
            "output_index": 2,
            "delta": '{"city": "Zürich"}',
        }
    )
    events.append({"type": "router:recovery", "attempt": 2, "deployment": None, "ok": False, "score": 1e-7})
    events.append(
        {
            "type": "response.output_text.done",
            "item_id": "msg_1",
            "output_index": 0,
            "content_index": 0,
            "text": "x" * 300_000,
        }
    )
    events += [delta(0, "after-big"), delta(0, " end")]
    for seq, event in enumerate(events):
        event["sequence_number"] = seq
    return events


async def create(store: Store, clock: Clock, **fields: Any) -> ResponseHeader:
    header = new_header(clock, **fields)
    await store.create(header)
    return header


# -- create / get / idempotency ---------------------------------------------------------------------------------------


async def test_create_and_get(store: Store, clock: Clock) -> None:
    header = await create(
        store,
        clock,
        request={"model": "gpt", "input": [{"role": "user", "content": "héllo 🌍"}], "n": 1.5, "tools": []},
        response={"id": "r", "status": "queued", "output": []},
        idempotency_key="key-1",
        body_hash="abc123",
        background=True,
        lease_expires_at=clock() + 30,
    )
    got = await store.get(header.id)
    assert got == header
    light = await store.get(header.id, snapshots=False)
    assert light is not None
    assert light.request == {} and light.response is None
    assert (light.owner_epoch, light.last_seq, light.status, light.tenant) == (0, -1, "queued", "tenant-a")
    assert light.lease_expires_at == header.lease_expires_at and light.expires_at == header.expires_at


async def test_missing_response(store: Store) -> None:
    assert await store.get("resp_missing") is None
    assert await store.read_events("resp_missing") == []
    assert await store.request_cancel("resp_missing") is False
    assert await store.delete("resp_missing") is False
    with pytest.raises(NotFound):
        await store.append("resp_missing", 0, deltas(0, 1))
    with pytest.raises(NotFound):
        await store.append("resp_missing", 0, [], lease_expires_at=1.0)
    with pytest.raises(NotFound):
        await store.take_over("resp_missing", 0, 1.0)


async def test_duplicate_create_raises(store: Store, clock: Clock) -> None:
    header = await create(store, clock, request={"first": True})
    await store.append(header.id, 0, deltas(0, 3))
    with pytest.raises(AlreadyExists):
        await store.create(new_header(clock, id=header.id, request={"second": True}))
    got = await store.get(header.id)
    assert got is not None and got.request == {"first": True} and got.last_seq == 2
    assert await store.read_events(header.id) == deltas(0, 3)


async def test_idempotency_key_per_tenant(store: Store, clock: Clock) -> None:
    a = await create(store, clock, tenant="tenant-a", idempotency_key="k1")
    with pytest.raises(AlreadyExists):
        await store.create(new_header(clock, tenant="tenant-a", idempotency_key="k1"))
    # The same key in another tenant is another key; tenant/key splits that concatenate alike do not collide.
    b = await create(store, clock, tenant="tenant-b", idempotency_key="k1")
    c = await create(store, clock, tenant="t#x", idempotency_key="y")
    d = await create(store, clock, tenant="t", idempotency_key="x#y")
    assert (await store.find_by_idempotency_key("tenant-a", "k1")) == a
    found_b = await store.find_by_idempotency_key("tenant-b", "k1")
    assert found_b is not None and found_b.id == b.id
    assert (await store.find_by_idempotency_key("t#x", "y")).id == c.id  # type: ignore[union-attr]
    assert (await store.find_by_idempotency_key("t", "x#y")).id == d.id  # type: ignore[union-attr]
    long_key = "k" * 5000  # longer than a DynamoDB partition key may be
    e = await create(store, clock, tenant="tenant-a", idempotency_key=long_key)
    assert (await store.find_by_idempotency_key("tenant-a", long_key)).id == e.id  # type: ignore[union-attr]
    with pytest.raises(AlreadyExists):
        await store.create(new_header(clock, tenant="tenant-a", idempotency_key=long_key))
    assert await store.find_by_idempotency_key("tenant-c", "k1") is None
    assert await store.find_by_idempotency_key("tenant-a", "k2") is None
    # A failed create under a used key leaves no response behind.
    loser = new_header(clock, tenant="tenant-b", idempotency_key="k1")
    with pytest.raises(AlreadyExists):
        await store.create(loser)
    assert await store.get(loser.id) is None


async def test_create_with_first_batch(store: Store, clock: Clock) -> None:
    """The header and the first events in one commit: readable at once, appended to like any response."""
    first = mixed_events()[:6]
    header = new_header(clock, request={"model": "gpt"}, lease_expires_at=clock() + 30)
    await store.create(header, first)
    got = await store.get(header.id)
    assert got is not None and got.last_seq == 5 and got.request == {"model": "gpt"}
    assert await store.read_events(header.id) == first
    assert await store.read_events(header.id, 2) == first[3:]
    more = deltas(6, 3)
    assert await store.append(header.id, 0, more) is False
    assert await store.read_events(header.id) == first + more
    with pytest.raises(Fenced):
        await store.append(header.id, 0, deltas(0, 1))  # the first batch counts: 0 is taken


async def test_create_with_first_batch_is_atomic(store: Store, clock: Clock) -> None:
    """A refused create (id or idempotency key taken) writes none of its events; a batch that is not dense from
    the header's `last_seq + 1` is a ValueError before anything is written."""
    taken = await create(store, clock, tenant="tenant-a", idempotency_key="k1")
    with pytest.raises(AlreadyExists):
        await store.create(new_header(clock, id=taken.id), deltas(0, 3))
    assert await store.read_events(taken.id) == []
    assert (await store.get(taken.id)).last_seq == -1  # type: ignore[union-attr]
    loser = new_header(clock, tenant="tenant-a", idempotency_key="k1")
    with pytest.raises(AlreadyExists):
        await store.create(loser, deltas(0, 3))
    assert await store.get(loser.id) is None and await store.read_events(loser.id) == []
    for bad in (deltas(1, 2), [delta(0, "a"), delta(2, "b")]):
        header = new_header(clock)
        with pytest.raises(ValueError):
            await store.create(header, bad)
        assert await store.get(header.id) is None
    # With an idempotency key the first batch lands with the key; the key finds the response.
    keyed = new_header(clock, tenant="tenant-b", idempotency_key="k2")
    await store.create(keyed, deltas(0, 2))
    found = await store.find_by_idempotency_key("tenant-b", "k2")
    assert found is not None and found.id == keyed.id and found.last_seq == 1


async def test_create_with_a_large_first_batch(store: Store, clock: Clock) -> None:
    """A first batch of a few hundred KB (one huge event among small ones) reads back exactly."""
    first = mixed_events()
    header = new_header(clock)
    await store.create(header, first)
    assert await store.read_events(header.id) == first
    assert (await store.get(header.id)).last_seq == len(first) - 1  # type: ignore[union-attr]


def large_request() -> dict[str, Any]:
    """A request whose snapshot does not fit inline in a DynamoDB header (a long conversation), and compresses badly."""
    rng = random.Random(7)
    text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ,.") for _ in range(40_000))
    return {"model": "m", "input": [{"role": "user", "content": text}], "instructions": "be brief"}


async def test_prepared_create_is_one_write(store: Store, clock: Clock) -> None:
    """`prepare` does ahead what it can of a create; the create with the first batch is then one write, whatever the
    request's size, and reads back exactly what an unprepared create would."""
    first = mixed_events()[:6]
    header = new_header(clock, request=large_request(), lease_expires_at=clock() + 30)
    prepared = await store.prepare(header)
    assert prepared == header and prepared.request is header.request  # the same header, the work done aside
    before = store.stats.commits
    await store.create(prepared, first)
    assert store.stats.commits == before + 1
    got = await store.get(header.id)
    assert got is not None and got.request == large_request() and got.last_seq == 5 and got.prepared is None
    assert await store.read_events(header.id) == first
    # Unprepared, the same create gives the same result (on DynamoDB a request this size takes a write of its own).
    plain = new_header(clock, request=large_request(), lease_expires_at=clock() + 30)
    await store.create(plain, first)
    again = await store.get(plain.id)
    assert again is not None and again.request == got.request and await store.read_events(plain.id) == first


async def test_prepare_makes_nothing_visible(store: Store, clock: Clock) -> None:
    """A prepared header that is never created is not there: no read sees it, and its id can still be created (with
    a prepared header whose request was replaced after `prepare`, the header's own request is what is stored)."""
    header = new_header(clock, request=large_request(), idempotency_key="prep-1")
    prepared = await store.prepare(header)
    assert await store.get(header.id) is None and await store.read_events(header.id) == []
    assert await store.find_by_idempotency_key(header.tenant, "prep-1") is None
    replaced = dataclasses.replace(prepared, request={"model": "other", "input": "changed"})
    await store.create(replaced, deltas(0, 2))
    got = await store.get(header.id)
    assert got is not None and got.request == {"model": "other", "input": "changed"}
    assert (await store.find_by_idempotency_key(header.tenant, "prep-1")) is not None


# -- appending and reading ---------------------------------------------------------------------------------------------


async def test_append_requires_dense_sequence(store: Store, clock: Clock) -> None:
    header = await create(store, clock)
    with pytest.raises(Fenced):
        await store.append(header.id, 0, deltas(1, 2))  # must start at last_seq + 1 = 0
    with pytest.raises(ValueError):
        await store.append(header.id, 0, [delta(0, "a"), delta(2, "b")])
    assert await store.append(header.id, 0, deltas(0, 5)) is False
    with pytest.raises(Fenced):
        await store.append(header.id, 0, deltas(4, 2))  # a duplicate
    with pytest.raises(Fenced):
        await store.append(header.id, 0, deltas(6, 2))  # a gap
    await store.append(header.id, 0, deltas(5, 5))
    got = await store.get(header.id)
    assert got is not None and got.last_seq == 9
    assert await store.read_events(header.id) == deltas(0, 10)


async def test_exact_replay(store: Store, clock: Clock) -> None:
    header = await create(store, clock)
    sent = mixed_events()
    cuts = [0, 1, 4, 9, 15, 16, 25, len(sent) - 2, len(sent)]
    for lo, hi in itertools.pairwise(cuts):
        await store.append(header.id, 0, sent[lo:hi])
    got = await store.read_events(header.id)
    assert got == sent
    assert [list(e) for e in got] == [list(e) for e in sent]  # key order too
    assert [type(e.get("output_index")) for e in got] == [type(e.get("output_index")) for e in sent]
    assert json.dumps(got) == json.dumps(sent)


async def test_read_after_n(store: Store, clock: Clock) -> None:
    header = await create(store, clock)
    sent = deltas(0, 7) + mixed_events()[:5] + deltas(12, 30)
    for i, event in enumerate(sent):
        event["sequence_number"] = i
    for lo in range(0, len(sent), 6):
        await store.append(header.id, 0, sent[lo : lo + 6])
    for after in (-1, 0, 1, 5, 6, 7, 11, 20, len(sent) - 2, len(sent) - 1, len(sent) + 5):
        assert await store.read_events(header.id, after) == sent[after + 1 :], after


# -- ownership ---------------------------------------------------------------------------------------------------------


async def test_take_over_fences_the_old_writer(store: Store, clock: Clock) -> None:
    header = await create(store, clock)
    await store.append(header.id, 0, deltas(0, 5, "own"), lease_expires_at=clock() + 30)
    lease = clock() + 60
    assert await store.take_over(header.id, 0, lease) == 1
    got = await store.get(header.id)
    assert got is not None and (got.owner_epoch, got.lease_expires_at, got.last_seq) == (1, lease, 4)
    # The zombie (epoch 0) can write nothing: no events, no header update.
    with pytest.raises(Fenced):
        await store.append(header.id, 0, deltas(5, 3, "zombie"))
    with pytest.raises(Fenced):
        await store.append(header.id, 0, [], lease_expires_at=clock() + 999, status="failed")
    with pytest.raises(Fenced):
        await store.take_over(header.id, 0, clock() + 999)
    await store.append(header.id, 1, deltas(5, 3, "new"))
    events = await store.read_events(header.id)
    assert events == deltas(0, 5, "own") + deltas(5, 3, "new")
    assert not any("zombie" in e["delta"] for e in events)
    got = await store.get(header.id)
    assert got is not None and got.status == "queued" and got.lease_expires_at == lease


async def test_a_response_created_with_its_first_batch_survives_a_take_over(
    store: Store, twin: Store, clock: Clock
) -> None:
    """One writer per response and dense sequence numbers across a takeover, for a response whose only commit so
    far is its create with the first batch (its owner died right after its first output; on DynamoDB the header
    still carries that batch): the zombie's next commit lands nothing, the new owner continues it, and both
    instances read the same dense events from every cursor."""
    first = mixed_events()[:6]
    header = new_header(clock, status="in_progress", lease_expires_at=clock() + 30)
    await store.create(header, first)
    assert await twin.read_events(header.id, 2) == first[3:]  # another instance reads it before anything moved
    assert await twin.take_over(header.id, 0, clock() + 60) == 1
    with pytest.raises(Fenced):
        await store.append(header.id, 0, deltas(6, 2, "zombie"))
    await twin.append(header.id, 1, deltas(6, 3, "new"))
    await twin.append(header.id, 1, deltas(9, 2, "more"))
    sent = first + deltas(6, 3, "new") + deltas(9, 2, "more")
    for reader in (store, twin):
        for after in range(-1, len(sent) + 1):
            assert await reader.read_events(header.id, after) == sent[after + 1 :], after
    got = await store.get(header.id)
    assert got is not None and (got.owner_epoch, got.last_seq) == (1, len(sent) - 1)


async def test_take_over_race_has_one_winner(store: Store, twin: Store, clock: Clock) -> None:
    header = await create(store, clock)
    results = await asyncio.gather(
        store.take_over(header.id, 0, clock() + 30),
        twin.take_over(header.id, 0, clock() + 30),
        return_exceptions=True,
    )
    assert sorted(type(r).__name__ for r in results) == ["Fenced", "int"]
    assert 1 in results


async def test_take_over_refuses_a_terminal_response(store: Store, clock: Clock) -> None:
    header = await create(store, clock)
    terminal = {"type": "response.completed", "sequence_number": 3, "response": {"id": header.id}}
    await store.append(header.id, 0, [*deltas(0, 3), terminal], status="completed", response={"id": header.id})
    with pytest.raises(Fenced) as caught:
        await store.take_over(header.id, 0, clock() + 30)
    assert not isinstance(caught.value, NotFound)
    got = await store.get(header.id)
    assert got is not None and got.owner_epoch == 0 and got.status == "completed"


async def test_concurrent_appends_one_wins(store: Store, twin: Store, clock: Clock) -> None:
    header = await create(store, clock)
    await store.append(header.id, 0, deltas(0, 2))
    a, b = deltas(2, 10, "A"), deltas(2, 10, "B")
    results = await asyncio.gather(store.append(header.id, 0, a), twin.append(header.id, 0, b), return_exceptions=True)
    assert sorted(type(r).__name__ for r in results) == ["Fenced", "bool"]
    winner = a if not isinstance(results[0], Exception) else b
    assert await store.read_events(header.id) == deltas(0, 2) + winner
    got = await twin.get(header.id)
    assert got is not None and got.last_seq == 11


# -- header updates ----------------------------------------------------------------------------------------------------


async def test_lease_status_and_response_snapshots(store: Store, clock: Clock) -> None:
    header = await create(store, clock)
    await store.append(header.id, 0, deltas(0, 4), lease_expires_at=111.5, status="in_progress")
    got = await store.get(header.id)
    assert got is not None and (got.lease_expires_at, got.status, got.last_seq, got.response) == (
        111.5,
        "in_progress",
        3,
        None,
    )
    # Header-only updates leave last_seq alone.
    await store.append(header.id, 0, [], lease_expires_at=222.25)
    small = {"id": header.id, "status": "in_progress", "output": []}
    await store.append(header.id, 0, [], response=small)
    got = await store.get(header.id)
    assert got is not None and (got.lease_expires_at, got.last_seq, got.response) == (222.25, 3, small)
    big = {"id": header.id, "status": "in_progress", "output": [{"text": "🌍" + "lorem ipsum " * 30_000}]}
    await store.append(header.id, 0, deltas(4, 2), response=big)
    got = await store.get(header.id)
    assert got is not None and got.response == big and got.last_seq == 5
    await store.append(header.id, 0, [], status="incomplete", response=small)
    got = await store.get(header.id)
    assert got is not None and got.response == small and got.status == "incomplete"
    assert await store.read_events(header.id) == deltas(0, 6)


async def test_cancel_flag_reaches_the_owner(store: Store, clock: Clock) -> None:
    header = await create(store, clock)
    assert await store.append(header.id, 0, deltas(0, 2)) is False
    assert await store.append(header.id, 0, [], lease_expires_at=clock() + 30) is False
    assert await store.request_cancel(header.id) is True
    got = await store.get(header.id)
    assert got is not None and got.cancel_requested
    assert await store.append(header.id, 0, deltas(2, 2)) is True
    assert await store.append(header.id, 0, deltas(4, 2)) is True
    assert await store.append(header.id, 0, [], lease_expires_at=clock() + 30) is True
    assert await store.read_events(header.id) == deltas(0, 6)
    # Cancel does not fence: the owner still writes its terminal event.
    done = {"type": "response.cancelled", "sequence_number": 6}
    assert await store.append(header.id, 0, [done], status="cancelled") is True
    assert (await store.read_events(header.id, 5)) == [done]


async def test_delete(store: Store, clock: Clock) -> None:
    header = await create(store, clock, idempotency_key="del", request={"blob": "z" * 50_000})
    await store.append(header.id, 0, deltas(0, 20), response={"text": "y" * 100_000})
    other = await create(store, clock)
    await store.append(other.id, 0, deltas(0, 3))
    assert await store.delete(header.id) is True
    assert await store.get(header.id) is None
    assert await store.read_events(header.id) == []
    assert await store.find_by_idempotency_key("tenant-a", "del") is None
    with pytest.raises(NotFound):
        await store.append(header.id, 0, deltas(20, 1))
    assert await store.delete(header.id) is False
    await create(store, clock, idempotency_key="del")  # the key is free again
    assert await store.read_events(other.id) == deltas(0, 3)


async def test_expired_responses_are_invisible(store: Store, clock: Clock) -> None:
    header = await create(store, clock, ttl=60, idempotency_key="exp")
    await store.append(header.id, 0, deltas(0, 5))
    keep = await create(store, clock, ttl=7200)
    await store.append(keep.id, 0, deltas(0, 2))
    clock.advance(120)  # past the first response's expires_at; TTL deletion has not happened
    assert await store.get(header.id) is None
    assert await store.read_events(header.id) == []
    assert await store.read_events(header.id, 2) == []
    assert await store.find_by_idempotency_key("tenant-a", "exp") is None
    assert await store.request_cancel(header.id) is False
    with pytest.raises(NotFound):
        await store.append(header.id, 0, deltas(5, 1))
    with pytest.raises(NotFound):
        await store.take_over(header.id, 0, clock() + 30)
    await create(store, clock, idempotency_key="exp")  # a lapsed key can be used again
    assert await store.read_events(keep.id) == deltas(0, 2)


async def test_created_already_expired(store: Store, clock: Clock) -> None:
    header = await create(store, clock, ttl=-10)
    assert await store.get(header.id) is None
    assert await store.read_events(header.id) == []


# -- size limits -------------------------------------------------------------------------------------------------------


def _random_text(rng: random.Random, size: int) -> str:
    # Base64 of random bytes: compresses poorly, so sizes stay near the worst case.
    return base64.b64encode(rng.randbytes(size * 3 // 4)).decode()


async def test_multi_megabyte_response_keeps_items_small(store: Store, clock: Clock) -> None:
    rng = random.Random(1234)
    request = {"model": "m", "input": _random_text(rng, 1_000_000)}
    header = await create(store, clock, request=request)
    sent: list[dict[str, Any]] = []
    seq = 0
    for _ in range(6):  # six appends of ~0.5 MB of text deltas each
        batch = [delta(seq + i, _random_text(rng, 1000)) for i in range(500)]
        seq += len(batch)
        await store.append(header.id, 0, batch)
        sent += batch
    text = "".join(e["delta"] for e in sent)
    response = {"id": header.id, "status": "completed", "output": [{"type": "message", "content": [{"text": text}]}]}
    terminal = {"type": "response.completed", "sequence_number": seq, "response": response}
    await store.append(header.id, 0, [terminal], status="completed", response=response)
    sent.append(terminal)
    assert len(text) >= 3_000_000
    assert await store.read_events(header.id) == sent
    assert await store.read_events(header.id, seq - 1) == [terminal]
    got = await store.get(header.id)
    assert got is not None and got.request == request and got.response == response and got.last_seq == seq
    if store.stats.items_written and not isinstance(store, MemoryStore | SQLiteStore):
        from unbroken.journal.dynamodb import PIECE_BYTES, DynamoDBStore, item_size

        assert isinstance(store, DynamoDBStore)
        assert store.stats.max_item_bytes < 400_000
        assert store.stats.max_item_bytes <= PIECE_BYTES + 1024
        # And as stored: every item of the table (header, batch pieces, snapshot pieces).
        scanned = await store._call("Scan", TableName=store.table)
        assert scanned["Items"] and max(item_size(i) for i in scanned["Items"]) <= PIECE_BYTES + 1024


# -- two instances on one SQLite file (two processes in production) ----------------------------------------------------


async def test_sqlite_shared_by_two_instances(tmp_path: object, clock: Clock) -> None:
    path = f"{tmp_path}/shared.db"
    first, second = SQLiteStore(path, clock=clock), SQLiteStore(path, clock=clock)
    try:
        header = await create(first, clock, idempotency_key="shared")
        assert await second.get(header.id) == header
        with pytest.raises(AlreadyExists):
            await second.create(new_header(clock, idempotency_key="shared"))
        await first.append(header.id, 0, deltas(0, 5))
        assert await second.read_events(header.id, 2) == deltas(3, 2)
        assert await second.take_over(header.id, 0, clock() + 30) == 1
        with pytest.raises(Fenced):
            await first.append(header.id, 0, deltas(5, 1))
        await second.append(header.id, 1, deltas(5, 1))
        assert await first.request_cancel(header.id)
        assert await second.append(header.id, 1, deltas(6, 1)) is True
        # Concurrent writers on the two connections: BEGIN IMMEDIATE serialises them, the second loses on last_seq.
        results = await asyncio.gather(
            first.append(header.id, 1, deltas(7, 50, "x")),
            second.append(header.id, 1, deltas(7, 50, "y")),
            return_exceptions=True,
        )
        assert sorted(type(r).__name__ for r in results) == ["Fenced", "bool"]
        assert len(await first.read_events(header.id)) == 57
    finally:
        await first.close()
        await second.close()
