"""The journal through the API: read and resume from any sequence number (and from another process), disconnects
that lose nothing, cancel, delete, tenancy, Idempotency-Key, previous_response_id, background mode, store failure."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.integration.test_responses_api import expected_text
from tests.support.client import TIMEOUT, headers, post_json, post_stream
from tests.support.server import RouterProcess, RouterThread, base_config, sim_model
from tests.support.sse import assert_well_formed, parse_sse
from unbroken.journal.backends import open_store
from unbroken.journal.memory import MemoryStore
from unbroken.journal.store import AlreadyExists, ResponseHeader, StoreError, StoreUnavailable
from unbroken.simulator import SimulatedUpstream


@pytest.fixture(scope="module")
def sim() -> Iterator[Any]:
    with SimulatedUpstream.start_in_thread() as handle:
        yield handle


def journal_config(sim_url: str, **server: Any) -> dict[str, Any]:
    model = sim_model("demo", deployments=1, length=40)
    model["deployments"][0]["base_url"] = sim_url
    slow = sim_model("slow", deployments=1, length=60, tps=40)
    slow["deployments"][0]["base_url"] = sim_url
    return base_config(model, slow, lease_seconds=1.0, **server)


@pytest.fixture(scope="module")
def router(sim: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterThread]:
    db = tmp_path_factory.mktemp("journal") / "journal.db"
    with RouterThread(journal_config(sim.base_url), store=open_store(f"sqlite:///{db}")) as server:
        yield server


def get(router: RouterThread, path: str, key: str = "sk-test", **params: Any) -> httpx.Response:
    with httpx.Client(timeout=TIMEOUT) as client:
        return client.get(f"{router.base_url}{path}", params=params, headers=headers(key))


def resume(base_url: str, response_id: str, after: int | None = None, extra: dict[str, str] | None = None,
           **params: Any) -> bytes:
    query = {"stream": "true", **params}
    if after is not None:
        query["starting_after"] = str(after)
    with httpx.Client(timeout=TIMEOUT) as client, client.stream(
            "GET", f"{base_url}/responses/{response_id}", params=query, headers=headers(**(extra or {}))) as r:
        assert r.status_code == 200, r.read()
        return r.read()


def test_resume_replays_exactly_the_events_after_the_cursor(router: RouterThread) -> None:
    _, stream = post_stream(router.base_url, {"model": "demo", "input": "journal me"})
    assert_well_formed(stream)
    response_id = stream.response["id"]
    assert len(response_id) >= len("resp_") + 32  # 128 random bits, hex
    for cursor in (-1, 0, 5, len(stream.events) - 2):
        replay = parse_sse(resume(router.base_url, response_id, cursor), first_seq=cursor + 1)
        assert replay.events == stream.events[cursor + 1:]
        assert replay.done
    after_end = parse_sse(resume(router.base_url, response_id, len(stream.events) - 1), first_seq=None)
    assert after_end.events == [] and after_end.done
    snapshot = get(router, f"/responses/{response_id}").json()
    assert snapshot == stream.response


def test_last_event_id_is_a_cursor_and_ids_only_on_request(router: RouterThread) -> None:
    _, stream = post_stream(router.base_url, {"model": "demo", "input": "ids"})
    response_id = stream.response["id"]
    plain = resume(router.base_url, response_id, extra={"last-event-id": "3"})
    assert b"\nid: " not in plain and not plain.startswith(b"id: ")
    assert parse_sse(plain, first_seq=4).events == stream.events[4:]
    with_ids = resume(router.base_url, response_id, 10, include_event_ids="true")
    assert with_ids.startswith(b"id: 11\n")


def test_a_client_that_leaves_loses_nothing(router: RouterThread) -> None:
    body = {"model": "slow", "input": "leave early", "stream": True}
    with httpx.Client(timeout=TIMEOUT) as client, client.stream("POST", f"{router.base_url}/responses", json=body,
                                                                headers=headers()) as r:
        lines = r.iter_lines()
        first = next(lines)
        while not first.startswith("data: "):
            first = next(lines)
        response_id = json.loads(first[6:])["response"]["id"]
    # The connection is closed; the response still completes into the journal and can be resumed.
    replay = parse_sse(resume(router.base_url, response_id, -1))
    assert_well_formed(replay)
    assert replay.terminal["type"] == "response.completed"
    assert replay.text() == expected_text("leave early", length=60)


def test_cancel_stops_generation_with_a_terminal_event(router: RouterThread) -> None:
    body = {"model": "slow", "input": "cancel me", "stream": True, "metadata": {"sim_length": "2000"}}
    with httpx.Client(timeout=TIMEOUT) as client, client.stream("POST", f"{router.base_url}/responses", json=body,
                                                                headers=headers()) as r:
        lines = r.iter_lines()
        response_id = None
        raw = b""
        for line in lines:
            raw += (line + "\n").encode()
            if line.startswith("data: ") and response_id is None:
                response_id = json.loads(line[6:])["response"]["id"]
                cancelled = post_json(router.base_url, f"/responses/{response_id}/cancel", None)
                assert cancelled.status_code == 200
                assert cancelled.json()["status"] == "cancelled"
    stream = parse_sse(raw)
    assert stream.terminal["type"] == "response.incomplete"
    assert stream.response["status"] == "cancelled"
    assert stream.response["incomplete_details"] == {"reason": "cancelled"}
    again = post_json(router.base_url, f"/responses/{response_id}/cancel", None)
    assert again.status_code == 200 and again.json()["status"] == "cancelled"  # idempotent


def test_delete_removes_the_response(router: RouterThread) -> None:
    body = post_json(router.base_url, "/responses", {"model": "demo", "input": "delete me"}).json()
    with httpx.Client(timeout=TIMEOUT) as client:
        deleted = client.delete(f"{router.base_url}/responses/{body['id']}", headers=headers())
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert get(router, f"/responses/{body['id']}").status_code == 404


def test_only_the_creating_tenant_can_touch_a_response(router: RouterThread) -> None:
    body = post_json(router.base_url, "/responses", {"model": "demo", "input": "mine"}).json()
    rid = body["id"]
    assert get(router, f"/responses/{rid}", key="sk-other").status_code == 404
    assert get(router, f"/responses/{rid}", key="sk-other", stream="true").status_code == 404
    assert post_json(router.base_url, f"/responses/{rid}/cancel", None, key="sk-other").status_code == 404
    with httpx.Client(timeout=TIMEOUT) as client:
        assert client.delete(f"{router.base_url}/responses/{rid}", headers=headers("sk-other")).status_code == 404
    assert get(router, f"/responses/{rid}").status_code == 200
    chained = post_json(router.base_url, "/responses", {"model": "demo", "input": "x", "previous_response_id": rid},
                        key="sk-other")
    assert chained.status_code == 404 and chained.json()["error"]["code"] == "previous_response_not_found"


def test_idempotency_key_attaches_instead_of_calling_twice(router: RouterThread, sim: Any) -> None:
    body = {"model": "demo", "input": "exactly once", "metadata": {"n": "1"}}
    before = len(sim.upstream.received)
    _, first = post_stream(router.base_url, body, extra_headers={"Idempotency-Key": "key-1"})
    _, second = post_stream(router.base_url, body, extra_headers={"Idempotency-Key": "key-1"})
    assert second.events == first.events  # replayed from the start
    plain = post_json(router.base_url, "/responses", {**body, "stream": True}, extra_headers={"Idempotency-Key":
                                                                                                "key-1"})
    assert plain.status_code == 200
    assert len(sim.upstream.received) - before == 1  # the model was called once
    conflict = post_json(router.base_url, "/responses", {**body, "input": "another"},
                         extra_headers={"Idempotency-Key": "key-1"})
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "idempotency_key_reused"
    other_tenant = post_json(router.base_url, "/responses", body, key="sk-other",
                             extra_headers={"Idempotency-Key": "key-1"})
    assert other_tenant.status_code == 200 and other_tenant.json()["id"] != first.response["id"]


def test_previous_response_id_sends_prev_input_output_and_input(router: RouterThread, sim: Any) -> None:
    first = post_json(router.base_url, "/responses", {"model": "demo", "input": "first turn",
                                                      "instructions": "be kind"}).json()
    second = post_json(router.base_url, "/responses", {"model": "demo", "input": "second turn",
                                                       "previous_response_id": first["id"]}).json()
    assert second["status"] == "completed" and second["previous_response_id"] == first["id"]
    sent = sim.upstream.received[-1]["messages"]
    answer = first["output"][0]["content"][0]["text"]
    assert [(m["role"], m["content"]) for m in sent] == [
        ("user", "first turn"), ("assistant", answer), ("user", "second turn")]


def test_background_returns_queued_then_completes(router: RouterThread) -> None:
    queued = post_json(router.base_url, "/responses", {"model": "demo", "input": "later", "background": True})
    assert queued.status_code == 200
    body = queued.json()
    assert body["status"] == "queued" and body["background"] is True
    replay = parse_sse(resume(router.base_url, body["id"], -1))  # streaming a background response works too
    assert replay.types[:3] == ["response.created", "response.queued", "response.in_progress"]
    assert replay.terminal["type"] == "response.completed"
    polled = get(router, f"/responses/{body['id']}").json()
    assert polled["status"] == "completed" and polled["output"] == replay.response["output"]
    _, streamed = post_stream(router.base_url, {"model": "demo", "input": "bg stream", "background": True})
    assert streamed.types[1] == "response.queued" and streamed.terminal["type"] == "response.completed"


def test_background_needs_store() -> None:
    with RouterThread(base_config(sim_model("demo"))) as router:
        response = post_json(router.base_url, "/responses", {"model": "demo", "input": "x", "background": True})
    assert response.status_code == 400 and response.json()["error"]["param"] == "background"


class FailingStore(MemoryStore):
    """Commits the first batches, then the store is unavailable."""

    def __init__(self, good_appends: int) -> None:
        super().__init__()
        self.good_appends = good_appends

    async def append(self, response_id: str, epoch: int, events: list[dict[str, Any]], **kw: Any) -> bool:
        if events:
            if self.good_appends <= 0:
                raise StoreUnavailable("throttled past the retry bound")
            self.good_appends -= 1
        return await super().append(response_id, epoch, events, **kw)


def test_store_failure_ends_the_stream_with_an_error_not_uncommitted_events(sim: Any) -> None:
    config = journal_config(sim.base_url, journal_batch_bytes=200)
    store = FailingStore(good_appends=2)
    with RouterThread(config, store=store) as router:
        response, stream_raw = _raw_post(router.base_url, {"model": "demo", "input": "fragile", "stream": True})
        stream = parse_sse(stream_raw)
        response_id = stream.events[0]["response"]["id"]
        durable = router.runtime.store and _run(router, store.read_events(response_id))
    assert response.status_code == 200  # the stream had started: the failure must be in-band
    assert stream.events[-1]["type"] == "error"
    assert stream.events[-1]["error"]["code"] == "journal_unavailable"
    assert stream.done
    # What the client saw is exactly what is durable (DESIGN: an event leaves only after its batch committed).
    assert stream.events[:-1] == durable
    assert 0 < len(durable) < 40


class RefusingCreate(MemoryStore):
    """The header's create fails (the store refuses or is unavailable); everything else works."""

    def __init__(self, failure: Exception) -> None:
        super().__init__()
        self.failure = failure
        self.creates = 0

    async def create(self, header: ResponseHeader, events: list[dict[str, Any]] | None = None) -> None:
        self.creates += 1
        if self.creates == 1:
            raise self.failure
        await super().create(header, events)


@pytest.mark.parametrize(("failure", "status", "code"), [
    (StoreUnavailable("throttled past the retry bound"), 503, "store_unavailable"),
    (StoreError("conditional check failed oddly"), 503, "store_unavailable"),
    (AlreadyExists("response id taken"), 409, "conflict"),
])
def test_a_keyed_header_that_cannot_be_created_is_an_error_and_the_upstream_call_is_stopped(
        sim: Any, failure: Exception, status: int, code: str | None) -> None:
    """With an Idempotency-Key the header (which claims the key) is created while the upstream call starts: a create
    that fails still answers the POST with the spec's error object (nothing was sent, so the status can be honest),
    and the run is gone, its upstream call cancelled long before the upstream's first token, nothing written. The
    next request works."""
    store = RefusingCreate(failure)
    body = {"model": "slow", "input": "no header", "stream": True, "metadata": {"sim_ttft_ms": "3000"}}
    with RouterThread(journal_config(sim.base_url), store=store) as router:
        response, raw = _raw_post(router.base_url, body, {"Idempotency-Key": "refused-1"})
        producers = _run(router, _producers(router))
        stored = _run(router, _stored_ids(store))
        _, after = post_stream(router.base_url, {"model": "demo", "input": "and now"})
    assert_error(response, raw, status, code)
    assert producers == []
    assert stored == []  # nothing of the refused response is in the store: no header, no event
    assert after.terminal["type"] == "response.completed"


@pytest.mark.parametrize("failure", [StoreUnavailable("throttled past the retry bound"),
                                     StoreError("conditional check failed oddly"),
                                     AlreadyExists("response id taken")])
def test_an_unkeyed_header_written_with_the_first_batch_that_fails_is_a_503_and_the_run_is_gone(
        sim: Any, failure: Exception) -> None:
    """Without an Idempotency-Key the header goes in with the first batch, in one write: when that write fails the
    POST is answered with 503 (nothing was sent), the run and its upstream call are stopped, nothing is stored. An
    id collision is the router's fault, not the client's, so it is not a 409."""
    store = RefusingCreate(failure)
    with RouterThread(journal_config(sim.base_url), store=store) as router:
        response, raw = _raw_post(router.base_url, {"model": "slow", "input": "no header", "stream": True})
        producers = _run(router, _producers(router))
        stored = _run(router, _stored_ids(store))
        _, after = post_stream(router.base_url, {"model": "demo", "input": "and now"})
    assert_error(response, raw, 503, "store_unavailable")
    assert store.creates == 2  # the refused one and the next request's
    assert producers == []
    assert stored == []  # nothing of the refused response: no header, no event
    assert after.terminal["type"] == "response.completed"


def assert_error(response: httpx.Response, raw: bytes, status: int, code: str | None) -> None:
    assert response.status_code == status, raw
    assert response.headers["content-type"].startswith("application/json")
    error = json.loads(raw)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["code"] == code


async def _producers(router: RouterThread) -> list[str]:
    return [t.get_name() for t in router.runtime.tasks if t.get_name().startswith("produce ") and not t.done()]


async def _stored_ids(store: MemoryStore) -> list[str]:
    return list(store._entries)  # what the memory store holds, headers and events


class SlowCreate(MemoryStore):
    """A create that takes a while (the upstream has answered by the time it is done); commits are recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.commits: list[list[dict[str, Any]]] = []

    async def create(self, header: ResponseHeader, events: list[dict[str, Any]] | None = None) -> None:
        import asyncio

        await asyncio.sleep(0.05)  # a slow store, not a synchronisation: nothing below depends on its length
        if events:
            self.commits.append(list(events))
        await super().create(header, events)

    async def append(self, response_id: str, epoch: int, events: list[dict[str, Any]], **kw: Any) -> bool:
        if events:
            self.commits.append(list(events))
        return await super().append(response_id, epoch, events, **kw)


def test_with_a_slow_header_create_the_client_sees_only_durable_events_in_order(sim: Any) -> None:
    store = SlowCreate()
    with RouterThread(journal_config(sim.base_url), store=store) as router:
        _, stream = post_stream(router.base_url, {"model": "slow", "input": "durable first"})
        durable = _run(router, store.read_events(stream.response["id"]))
    assert_well_formed(stream)
    assert stream.events == durable  # exactly what is durable, dense from 0
    assert [e["sequence_number"] for e in durable] == list(range(len(durable)))
    # The start events waited for the first content and went out in its batch, with the header.
    first = [e["type"] for e in store.commits[0]]
    assert first[:2] == ["response.created", "response.in_progress"]
    assert "response.output_text.delta" in first


class OrderedStore(MemoryStore):
    """Logs each commit of events (and can refuse the first), for ordering against what the server sends. The first
    batch of an unkeyed response comes with its header's create."""

    def __init__(self, log: list[str], *, refuse_first: bool = False) -> None:
        super().__init__()
        self.log = log
        self.refuse_first = refuse_first

    async def create(self, header: ResponseHeader, events: list[dict[str, Any]] | None = None) -> None:
        if events and self.refuse_first:
            raise StoreUnavailable("throttled past the retry bound")
        await super().create(header, events)
        self._logged(events)

    async def append(self, response_id: str, epoch: int, events: list[dict[str, Any]], **kw: Any) -> bool:
        if events and self.refuse_first:
            raise StoreUnavailable("throttled past the retry bound")
        cancel = await super().append(response_id, epoch, events, **kw)
        self._logged(events)
        return cancel

    def _logged(self, events: list[dict[str, Any]] | None) -> None:
        if events:
            self.log.append(f"commit {events[0]['sequence_number']}..{events[-1]['sequence_number']}")


def _logging_sends(app: Any, log: list[str]) -> Any:
    """The ASGI app, with every response start and body chunk of `POST /v1/responses` logged as it is sent."""

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/responses":
            await app(scope, receive, send)
            return

        async def logged(message: Any) -> None:
            if message["type"] == "http.response.start":
                log.append(f"status {message['status']}")
            elif message.get("body"):
                log.append("body")
            await send(message)

        await app(scope, receive, logged)

    return wrapped


def test_nothing_not_even_the_status_leaves_before_the_first_batch_is_durable(sim: Any) -> None:
    log: list[str] = []
    router = RouterThread(journal_config(sim.base_url), store=OrderedStore(log))
    router.server.config.app = _logging_sends(router.app, log)
    with router:
        _, stream = post_stream(router.base_url, {"model": "slow", "input": "status after the commit"})
    assert_well_formed(stream)
    assert log[0].startswith("commit 0..") and log[1] == "status 200", log[:3]
    assert log.index("body") > 1


def test_a_first_batch_that_cannot_be_committed_is_an_error_status(sim: Any) -> None:
    log: list[str] = []
    with RouterThread(journal_config(sim.base_url), store=OrderedStore(log, refuse_first=True)) as router:
        response, raw = _raw_post(router.base_url, {"model": "slow", "input": "no journal", "stream": True})
    assert_error(response, raw, 503, "store_unavailable")  # nothing had been sent: the status can say it
    assert log == []


def _run(router: RouterThread, coro: Any) -> Any:
    """Run a coroutine on the router's own loop (the store belongs to it) and wait for its result."""
    import asyncio

    assert router.loop is not None
    return asyncio.run_coroutine_threadsafe(coro, router.loop).result(timeout=30)


def _raw_post(base_url: str, body: dict[str, Any],
              extra_headers: dict[str, str] | None = None) -> tuple[httpx.Response, bytes]:
    with httpx.Client(timeout=TIMEOUT) as client, client.stream("POST", f"{base_url}/responses", json=body,
                                                                headers={**headers(), **(extra_headers or {})}) as r:
        return r, r.read()


def test_two_processes_share_a_store_and_a_killed_producer_is_taken_over(tmp_path: Path, sim: Any) -> None:
    config = journal_config(sim.base_url)
    config["models"][1]["deployments"][0]["options"].update(length=80, tps=25)
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump(config))
    store = f"sqlite:///{tmp_path / 'shared.db'}"
    seen: list[dict[str, Any]] = []
    with RouterProcess(path, store) as a, RouterProcess(path, store) as b:
        body = {"model": "slow", "input": "survive a crash", "stream": True}
        with httpx.Client(timeout=TIMEOUT) as client, client.stream(
                "POST", f"{a.base_url}/responses", json=body, headers=headers()) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:]))
                if len(seen) >= 12:
                    break
            a.kill()  # SIGKILL mid-stream: no cleanup, like a Lambda that timed out or crashed
        cursor = seen[-1]["sequence_number"]
        rest = parse_sse(resume(b.base_url, seen[0]["response"]["id"], cursor), first_seq=cursor + 1)
    combined = seen + rest.events
    assert [e["sequence_number"] for e in combined] == list(range(len(combined)))
    assert rest.terminal["type"] == "response.completed"
    text = "".join(e["delta"] for e in combined if e["type"] == "response.output_text.delta")
    assert text == expected_text("survive a crash", length=80)
    messages = [i for i in rest.response["output"] if i["type"] == "message"]
    assert len(messages) == 1 and messages[0]["content"][0]["text"] == text
    # The new owner adds to the dead one: its streamed output estimated (no usage chunk ever came), its own reported.
    attempts = rest.response["router"]["attempts"]
    assert attempts[0]["outcome"] == "taken_over" and attempts[0]["usage_estimated"] is True
    assert attempts[0]["output_tokens"] > 0 and attempts[-1]["usage_estimated"] is False
    assert rest.response["usage"]["output_tokens"] == sum(a["output_tokens"] for a in attempts)
