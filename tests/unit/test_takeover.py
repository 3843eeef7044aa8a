"""Taking over a response whose producer died (`durable/takeover.py`), and the producer's own ending
(`durable/producer.py`): MemoryStore, Runtimes whose pools hand out fake providers, no sockets.

Synchronisation is by events, never by sleeping: a test waits (bounded) for the journal to hold what it needs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from tests.support.fake_provider import HANG, FakePool, FakeProvider, Step, text_attempt
from unbroken.config import Config, Deployment, PublicModel, ServerSettings
from unbroken.durable.follow import journal_events
from unbroken.durable.runtime import Runtime
from unbroken.durable.service import Caller, Journaled, create_response, first_output
from unbroken.durable.takeover import take_over
from unbroken.ir import Continuation, TextDelta
from unbroken.journal.feed import follow
from unbroken.journal.memory import MemoryStore
from unbroken.journal.store import TERMINAL_EVENT_TYPES, Fenced
from unbroken.protocol.request import ResponsesRequest
from unbroken.providers.base import Capabilities

BOUND = 5.0
DEP = Deployment(name="a", provider="anthropic", model="claude-x")


def runtime(store: MemoryStore, script: Sequence[Sequence[Step]]) -> tuple[Runtime, FakeProvider]:
    config = Config(models=[PublicModel(name="m", deployments=[DEP])], allow_anonymous=True,
                    server=ServerSettings(journal_batch_ms=1, lease_seconds=5))
    provider = FakeProvider(DEP, script, capabilities=Capabilities(literal_continuation=True))
    return Runtime(config, store=store, pool=FakePool(provider)), provider


async def start(rt: Runtime) -> Journaled:
    parsed = ResponsesRequest.parse({"model": "m", "input": "hi", "store": True, "stream": True})
    created = await create_response(rt, parsed, Caller(tenant="t", deadline=time.time() + 600))
    assert isinstance(created, Journaled) and created.run is not None
    await first_output(created)
    return created


async def committed_until(store: MemoryStore, response_id: str, text: str) -> None:
    """Wait (bounded) until the journal holds `text` as streamed output."""
    async with asyncio.timeout(BOUND):
        seen = ""
        async for event in _follow(store, response_id):
            seen += event.get("delta", "") if event["type"] == "response.output_text.delta" else ""
            if seen == text:
                return


async def _follow(store: MemoryStore, response_id: str) -> AsyncIterator[dict[str, Any]]:
    async for event in follow(store, response_id, -1, max_wait=BOUND):
        yield event


async def kill(rt: Runtime, created: Journaled) -> None:
    task = created.run.task  # type: ignore[union-attr]
    assert task is not None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_take_over_continues_the_committed_partial_text() -> None:
    store = MemoryStore()
    rt1, _ = runtime(store, [[TextDelta("Hello, "), TextDelta("wor"), HANG]])
    created = await start(rt1)
    await committed_until(store, created.response_id, "Hello, wor")
    await kill(rt1, created)
    rt2, p2 = runtime(store, [text_attempt("ld!")])
    run = await take_over(rt2, created.response_id, 0)
    assert run is not None and run.epoch == 1
    async with asyncio.timeout(BOUND):
        events = [e async for e in journal_events(rt2, created.response_id, -1)]
    assert p2.requests[0].continuation == Continuation("Hello, wor", True)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] in TERMINAL_EVENT_TYPES for e in events].count(True) == 1
    assert events[-1]["type"] == "response.completed"
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == "Hello, world!"
    header = await store.get(created.response_id)
    assert header is not None and header.owner_epoch == 1
    # the old writer is fenced: epoch 0 can no longer append
    with pytest.raises(Fenced):
        await store.append(created.response_id, 0, [{"type": "x", "sequence_number": len(events)}])
    await rt1.aclose()
    await rt2.aclose()


async def test_take_over_of_a_finished_response_is_none() -> None:
    store = MemoryStore()
    rt1, _ = runtime(store, [text_attempt("done")])
    created = await start(rt1)
    await created.run.task  # type: ignore[union-attr, misc]
    rt2, p2 = runtime(store, [])
    assert await take_over(rt2, created.response_id, 0) is None
    assert p2.requests == []
    await rt1.aclose()
    await rt2.aclose()


async def test_of_two_concurrent_take_overs_exactly_one_wins() -> None:
    store = MemoryStore()
    rt1, _ = runtime(store, [[TextDelta("Hi"), HANG]])
    created = await start(rt1)
    await committed_until(store, created.response_id, "Hi")
    await kill(rt1, created)
    rt2, p2 = runtime(store, [text_attempt(" there")])
    rt3, p3 = runtime(store, [text_attempt(" there")])
    runs = await asyncio.gather(take_over(rt2, created.response_id, 0), take_over(rt3, created.response_id, 0))
    assert sum(r is not None for r in runs) == 1
    async with asyncio.timeout(BOUND):
        events = [e async for e in journal_events(rt2, created.response_id, -1)]
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "Hi there"
    assert len(p2.requests) + len(p3.requests) == 1
    for rt in (rt1, rt2, rt3):
        await rt.aclose()


class Exploding(FakeProvider):
    def stream(self, request):  # type: ignore[no-untyped-def]
        async def gen():  # type: ignore[no-untyped-def]
            yield TextDelta("some text")
            raise RuntimeError("a bug below the loop")
        self.requests.append(request)
        return gen()


async def test_a_crash_mid_stream_ends_the_journal_with_response_failed() -> None:
    store = MemoryStore()
    config = Config(models=[PublicModel(name="m", deployments=[DEP])], allow_anonymous=True,
                    server=ServerSettings(journal_batch_ms=1, lease_seconds=5))
    rt = Runtime(config, store=store, pool=FakePool(Exploding(DEP)))
    created = await start(rt)
    async with asyncio.timeout(BOUND):
        await created.run.task  # type: ignore[union-attr, misc]
        events = [e async for e in journal_events(rt, created.response_id, -1)]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-1]["type"] == "response.failed"
    assert "some text" in "".join(e.get("delta", "") for e in events)
    header = await store.get(created.response_id)
    assert header is not None and header.status == "failed"
    await rt.aclose()
