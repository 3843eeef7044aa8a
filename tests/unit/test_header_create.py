"""A foreground response's upstream call does not wait for its header (`durable/service.py`, `durable/producer.py`,
`journal/writer.py`): without an Idempotency-Key the header is written together with the first batch (one commit
before the first token, nothing in the store before it); with one, the header's create runs alongside the upstream
call and nothing is committed before it exists. Either way the first batch holds the start events with the first
content, and a header that cannot be written cancels the upstream call and is answered with a `Failure` (or, for
an Idempotency-Key race, the other response).

MemoryStore with a create the test holds and fails; Runtimes whose pools hand out fake providers; no sockets, no
sleeps: every wait is on an event, bounded."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.support.fake_provider import HANG, WRITTEN, Do, Fail, FakePool, FakeProvider, Step, Wait
from unbroken.config import Config, Deployment, PublicModel, ServerSettings
from unbroken.durable.follow import journal_events
from unbroken.durable.runtime import Runtime
from unbroken.durable.service import Caller, Direct, Journaled, create_response, first_output
from unbroken.errors import Failure
from unbroken.ir import Finish, TextDelta, UpstreamModel
from unbroken.journal.memory import MemoryStore
from unbroken.journal.store import AlreadyExists, ResponseHeader, StoreError, StoreUnavailable
from unbroken.protocol.request import ResponsesRequest

BOUND = 5.0
DEP = Deployment(name="a", provider="anthropic", model="claude-x")


class HeldCreate(MemoryStore):
    """`create` waits for `release`, then fails with `fail_with` (or creates); appends are recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.create_started = asyncio.Event()
        self.fail_with: BaseException | None = None
        self.appends: list[list[dict[str, Any]]] = []
        self.creates: list[list[dict[str, Any]]] = []  # the first batch each create carried ([] for none)
        self.created = asyncio.Event()  # a create succeeded

    async def create(self, header: ResponseHeader, events: list[dict[str, Any]] | None = None) -> None:
        self.create_started.set()
        await asyncio.wait_for(self.release.wait(), BOUND)
        if self.fail_with is not None:
            raise self.fail_with
        self.creates.append(list(events or []))
        await super().create(header, events)
        self.created.set()

    async def append(self, response_id: str, epoch: int, events: list[dict[str, Any]], **kw: Any) -> bool:
        self.appends.append(list(events))
        return await super().append(response_id, epoch, events, **kw)


def runtime(store: MemoryStore, script: list[list[Step]]) -> tuple[Runtime, FakeProvider]:
    config = Config(models=[PublicModel(name="m", deployments=[DEP])], allow_anonymous=True,
                    server=ServerSettings(journal_batch_ms=1000, lease_seconds=5))
    provider = FakeProvider(DEP, script)
    return Runtime(config, store=store, pool=FakePool(provider)), provider


def request(**extra: Any) -> ResponsesRequest:
    return ResponsesRequest.parse({"model": "m", "input": "hi", "store": True, "stream": True, **extra})


def caller(key: str | None = None) -> Caller:
    return Caller(tenant="t", deadline=time.time() + 600, idempotency_key=key)


async def answered(rt: Runtime, parsed: ResponsesRequest, who: Caller) -> Direct | Journaled:
    """What a POST handler answers with: the created response once its first output is durable (or the failure)."""
    created = await create_response(rt, parsed, who)
    if isinstance(created, Journaled):
        await first_output(created)
    return created


async def test_without_a_key_the_header_is_written_with_the_first_batch_in_one_commit() -> None:
    store = HeldCreate()
    store.release.set()
    called, content = asyncio.Event(), asyncio.Event()
    rt, provider = runtime(store, [[Do(called.set), UpstreamModel("claude-x"), Wait(content), TextDelta("Hello"),
                                    TextDelta(" there"), Finish("stop")]])
    post = asyncio.create_task(answered(rt, request(), caller()))
    async with asyncio.timeout(BOUND):
        await called.wait()  # the upstream is called with nothing written
    await asyncio.sleep(0)
    assert not store.create_started.is_set() and not post.done()
    content.set()
    async with asyncio.timeout(BOUND):
        created = await post  # answered once the first write is done: the header and the first batch
        assert isinstance(created, Journaled)
        assert len(store.creates) == 1  # one create; whatever came after it is appended
        first = [e["type"] for e in store.creates[0]]
        assert first[:2] == ["response.created", "response.in_progress"]
        assert "response.output_text.delta" in first
        events = [e async for e in journal_events(rt, created.response_id, -1)]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))  # dense, from 0
    assert events[-1]["type"] == "response.completed"
    assert len(provider.requests) == 1
    await rt.aclose()


async def test_the_upstream_is_called_before_the_response_goes_back_to_its_handler() -> None:
    # The handler's answer (its response object, the server's call of it) is set up while the upstream works, not
    # between the request and the upstream call.
    store = HeldCreate()
    store.release.set()
    called, content = asyncio.Event(), asyncio.Event()
    rt, _ = runtime(store, [[Do(called.set), UpstreamModel("claude-x"), Wait(content), TextDelta("Hi"),
                             Finish("stop")]])
    async with asyncio.timeout(BOUND):  # in this task: a task of its own would give the run turns of its own
        created = await create_response(rt, request(), caller())
    assert isinstance(created, Journaled)
    assert called.is_set()
    content.set()
    await asyncio.wait_for(first_output(created), BOUND)
    await rt.aclose()


async def test_the_create_returns_once_the_upstream_request_is_out_however_long_writing_it_takes() -> None:
    # An adapter takes as many loop turns as its connection pool and socket writes need before its request is out;
    # the handler's own work (its answer, the server's call of it) must not get in before, however many that is.
    store = HeldCreate()
    store.release.set()
    connected, written, content = asyncio.Event(), asyncio.Event(), asyncio.Event()
    rt, _ = runtime(store, [[Wait(connected), WRITTEN, Do(written.set), UpstreamModel("claude-x"), Wait(content),
                             TextDelta("Hi"), Finish("stop")]])

    async def connect() -> None:  # a connection that takes a few loop turns
        for _ in range(5):
            await asyncio.sleep(0)
        connected.set()

    connecting = asyncio.create_task(connect())
    async with asyncio.timeout(BOUND):
        created = await create_response(rt, request(), caller())
    assert isinstance(created, Journaled)
    assert written.is_set()
    content.set()
    await asyncio.wait_for(first_output(created), BOUND)
    await connecting
    await rt.aclose()


async def test_a_run_that_fails_before_its_request_is_out_does_not_hold_the_create() -> None:
    # No upstream request ever goes out (every deployment refuses at once): the create returns, with the failure.
    store = HeldCreate()
    store.release.set()
    rt, _ = runtime(store, [[Fail("auth", "refused")]])
    async with asyncio.timeout(BOUND):
        created = await create_response(rt, request(), caller())
        assert isinstance(created, Journaled)
        with pytest.raises(Failure):
            await first_output(created)
    await rt.aclose()


async def test_a_create_cancelled_before_it_returns_stops_its_run() -> None:
    # The client went away while the run went first: nobody could read the response, so nothing of it goes on.
    store = HeldCreate()
    store.release.set()
    rt, provider = runtime(store, [[UpstreamModel("claude-x"), HANG]])
    post = asyncio.create_task(create_response(rt, request(), caller()))
    await asyncio.sleep(0)  # the create has started its run and let it go first
    assert not post.done()
    post.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(post, BOUND)
    assert not rt.tasks  # the run spawned by the create is over (done tasks leave the set)
    assert provider.closed_streams == len(provider.requests)
    assert not store.create_started.is_set()
    await rt.aclose()


class PreparingStore(HeldCreate):
    """Records what `prepare` returned and which header each create got; `prepare` can fail."""

    def __init__(self) -> None:
        super().__init__()
        self.prepared = asyncio.Event()
        self.prepared_headers: list[ResponseHeader] = []
        self.created_headers: list[ResponseHeader] = []
        self.prepare_fails_with: BaseException | None = None

    async def prepare(self, header: ResponseHeader) -> ResponseHeader:
        self.prepared.set()
        if self.prepare_fails_with is not None:
            raise self.prepare_fails_with
        prepared = await super().prepare(header)
        self.prepared_headers.append(prepared)
        return prepared

    async def create(self, header: ResponseHeader, events: list[dict[str, Any]] | None = None) -> None:
        self.created_headers.append(header)
        await super().create(header, events)


async def test_without_a_key_the_create_is_prepared_while_the_upstream_call_is_in_flight() -> None:
    """The work a create can do ahead (encoding the request; on DynamoDB writing its snapshot) is done while the
    upstream call is in flight, before the first content exists; the first commit creates that prepared header.
    (That it starts after the upstream request went out is a timing matter: `benchmarks/first_token_trace.py`.)"""
    called, content = asyncio.Event(), asyncio.Event()
    store = PreparingStore()
    store.release.set()
    rt, _ = runtime(store, [[Do(called.set), UpstreamModel("claude-x"), Wait(content), TextDelta("Hello"),
                             Finish("stop")]])
    post = asyncio.create_task(answered(rt, request(), caller()))
    async with asyncio.timeout(BOUND):
        await store.prepared.wait()  # the first content is still held by the upstream
    assert called.is_set() and not store.create_started.is_set()
    content.set()
    async with asyncio.timeout(BOUND):
        created = await post
    assert isinstance(created, Journaled)
    assert len(store.created_headers) == 1 and store.created_headers[0].prepared is not None
    assert store.created_headers[0].prepared is store.prepared_headers[0].prepared
    got = await store.get(created.response_id)
    assert got is not None and got.request["input"][0]["content"] == "hi"
    await rt.aclose()


async def test_a_create_that_cannot_be_prepared_is_answered_as_a_store_failure() -> None:
    called = asyncio.Event()
    store = PreparingStore()
    store.release.set()
    store.prepare_fails_with = StoreUnavailable("throttled past the retry bound")
    # The first content comes once the prepare has run (a model slower to its first token than the prepare).
    rt, provider = runtime(store, [[Do(called.set), UpstreamModel("claude-x"), Wait(store.prepared),
                                    TextDelta("never shown"), HANG]])
    with pytest.raises(Failure) as raised:
        await asyncio.wait_for(answered(rt, request(), caller()), BOUND)
    assert (raised.value.kind, raised.value.code) == ("unavailable", "store_unavailable")
    runs = {t for t in rt.tasks if t.get_name().startswith("produce ")}
    if runs:
        _, pending = await asyncio.wait(runs, timeout=BOUND)
        assert not pending
    assert provider.closed_streams == 1  # the upstream call was cancelled
    assert store.creates == [] and store.appends == []
    await rt.aclose()


async def test_with_a_key_the_upstream_call_starts_before_the_header_exists_and_nothing_is_committed_before_it(
) -> None:
    store = HeldCreate()
    called, content = asyncio.Event(), asyncio.Event()
    rt, provider = runtime(store, [[Do(called.set), UpstreamModel("claude-x"), Wait(content), TextDelta("Hello"),
                                    TextDelta(" there"), Finish("stop")]])
    post = asyncio.create_task(answered(rt, request(), caller("key-0")))
    async with asyncio.timeout(BOUND):
        await called.wait()  # the upstream is called while the create is still held
    assert store.create_started.is_set() and not post.done()
    content.set()  # the first content arrives before the header is there: it waits for it
    await asyncio.sleep(0)
    assert store.appends == []
    store.release.set()
    async with asyncio.timeout(BOUND):
        created = await post
        assert isinstance(created, Journaled)
        events = [e async for e in journal_events(rt, created.response_id, -1)]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))  # dense, from 0
    assert events[-1]["type"] == "response.completed"
    # One batch holds the start events and the first content: they did not take a commit of their own.
    first = [e["type"] for e in store.appends[0]]
    assert first[:2] == ["response.created", "response.in_progress"]
    assert "response.output_text.delta" in first
    assert len(provider.requests) == 1
    await rt.aclose()


@pytest.mark.parametrize(("failure", "code", "key"), [
    (StoreUnavailable("throttled past the retry bound"), "store_unavailable", None),
    (StoreError("something else"), "store_unavailable", None),
    (StoreUnavailable("throttled past the retry bound"), "store_unavailable", "key-2"),
    (StoreError("something else"), "store_unavailable", "key-2"),
    (AlreadyExists("response id taken"), None, "key-2"),  # found by no lookup: a conflict of its own
])
async def test_a_header_that_cannot_be_created_cancels_the_upstream_call(failure: Exception, code: str | None,
                                                                       key: str | None) -> None:
    store = HeldCreate()
    store.fail_with = failure
    called = asyncio.Event()
    rt, provider = runtime(store, [[Do(called.set), UpstreamModel("claude-x"), TextDelta("never shown"), HANG]])
    post = asyncio.create_task(answered(rt, request(), caller(key)))
    async with asyncio.timeout(BOUND):
        await called.wait()
    store.release.set()
    with pytest.raises(Failure) as raised:
        await asyncio.wait_for(post, BOUND)
    assert raised.value.kind == ("conflict" if isinstance(failure, AlreadyExists) else "unavailable")
    assert raised.value.code == code
    runs = {t for t in rt.tasks if t.get_name().startswith("produce ")}
    if runs:  # without a key the run ends as the failure is answered: let it unwind
        _, pending = await asyncio.wait(runs, timeout=BOUND)
        assert not pending
    assert provider.closed_streams == 1  # the upstream call was cancelled
    assert store.appends == [] and store.creates == []  # nothing was written, so nothing could have been sent
    await rt.aclose()


async def test_an_idempotency_key_race_lost_at_create_attaches_to_the_other_response() -> None:
    store = HeldCreate()
    store.release.set()
    rt, _ = runtime(store, [[UpstreamModel("claude-x"), TextDelta("first"), Finish("stop")]])
    async with asyncio.timeout(BOUND):
        winner = await answered(rt, request(), caller("key-1"))
        assert isinstance(winner, Journaled)
        _ = [e async for e in journal_events(rt, winner.response_id, -1)]
    # Another request with the same key passed the lookup before the winner's header existed, then lost the create.
    store.release.clear()
    real_find = store.find_by_idempotency_key
    lookups = 0

    async def find(tenant: str, key: str) -> ResponseHeader | None:
        nonlocal lookups
        lookups += 1
        return None if lookups == 1 else await real_find(tenant, key)

    store.find_by_idempotency_key = find  # type: ignore[method-assign]
    store.fail_with = AlreadyExists("idempotency key already used")
    called = asyncio.Event()
    provider = rt.pool.get("m", DEP)
    assert isinstance(provider, FakeProvider)
    provider.script.append([Do(called.set), UpstreamModel("claude-x"), TextDelta("second"), HANG])
    post = asyncio.create_task(answered(rt, request(), caller("key-1")))
    async with asyncio.timeout(BOUND):
        await called.wait()
    store.release.set()
    loser = await asyncio.wait_for(post, BOUND)
    assert isinstance(loser, Journaled) and loser.response_id == winner.response_id and loser.run is None
    assert provider.closed_streams == 2  # the loser's upstream call was cancelled
    assert all(e["response"]["id"] == winner.response_id for batch in store.appends for e in batch
               if "response" in e)
    await rt.aclose()


async def test_a_post_cancelled_before_its_first_output_stops_the_upstream_call() -> None:
    """Nobody could ever read that response (its id was never sent): its upstream call is not paid for."""
    store = HeldCreate()
    called = asyncio.Event()
    rt, provider = runtime(store, [[Do(called.set), UpstreamModel("claude-x"), HANG]])
    post = asyncio.create_task(answered(rt, request(), caller()))
    async with asyncio.timeout(BOUND):
        await called.wait()
    post.cancel()
    with pytest.raises(asyncio.CancelledError):
        await post
    runs = {t for t in rt.tasks if t.get_name().startswith("produce ")}
    if runs:
        _, pending = await asyncio.wait(runs, timeout=BOUND)
        assert not pending
    assert provider.closed_streams == 1
    assert store.appends == [] and store.creates == []
    await rt.aclose()


async def test_a_post_with_a_key_cancelled_before_its_first_output_goes_on_for_its_retry() -> None:
    """A client that went away before its first token and retries with its Idempotency-Key (what an SDK does on a
    dropped connection) attaches to the response, which went on into the journal: one model call, all of it."""
    store = HeldCreate()
    store.release.set()
    called, content = asyncio.Event(), asyncio.Event()
    rt, provider = runtime(store, [[Do(called.set), UpstreamModel("claude-x"), Wait(content), TextDelta("Hello"),
                                    Finish("stop")]])
    post = asyncio.create_task(answered(rt, request(), caller("key-3")))
    async with asyncio.timeout(BOUND):
        await called.wait()
        await store.created.wait()  # the header is there: a retry finds it
    await asyncio.sleep(0)  # the POST now waits for the first output
    assert not post.done()
    post.cancel()
    with pytest.raises(asyncio.CancelledError):
        await post
    content.set()
    async with asyncio.timeout(BOUND):
        retry = await answered(rt, request(), caller("key-3"))
        assert isinstance(retry, Journaled) and retry.run is None  # attached, not made again
        events = [e async for e in journal_events(rt, retry.response_id, -1)]
    assert events[-1]["type"] == "response.completed"
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "Hello"
    assert len(provider.requests) == 1
    await rt.aclose()
