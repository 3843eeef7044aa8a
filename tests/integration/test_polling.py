"""Pollers: background responses read with plain GETs (the openai SDK's `responses.retrieve()`), a GET while a
stream runs, a dead producer taken over by polling alone, and `GET /v1/responses/{id}/input_items`."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from openai import OpenAI

from tests.integration.test_responses_api import expected_text
from tests.support.client import TIMEOUT, headers
from tests.support.server import API_KEY, RouterProcess, RouterThread, base_config, sim_model
from tests.support.spec import validate_item, validate_response
from tests.support.sse import parse_sse
from unbroken.ir import ReasoningSeal
from unbroken.journal.backends import open_store
from unbroken.journal.memory import MemoryStore
from unbroken.protocol.reasoning_codec import encode_reasoning
from unbroken.simulator import SimulatedUpstream

POLL_BOUND = 30.0  # seconds a poll loop may take before the test fails
SLOW_LENGTH = 60


@pytest.fixture(scope="module")
def sim() -> Iterator[Any]:
    with SimulatedUpstream.start_in_thread() as handle:
        yield handle


def polling_config(sim_url: str, *, slow_length: int = SLOW_LENGTH, tps: int = 30) -> dict[str, Any]:
    demo = sim_model("demo", deployments=1, length=40)
    slow = sim_model("slow", deployments=1, length=slow_length, tps=tps)
    for model in (demo, slow):
        model["deployments"][0]["base_url"] = sim_url
    return base_config(demo, slow, lease_seconds=1.0)


@pytest.fixture(scope="module")
def router(sim: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterThread]:
    db = tmp_path_factory.mktemp("polling") / "journal.db"
    with RouterThread(polling_config(sim.base_url), store=open_store(f"sqlite:///{db}")) as server:
        yield server


def sdk(base_url: str, key: str = API_KEY) -> OpenAI:
    return OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def client(router: RouterThread) -> OpenAI:
    return sdk(router.base_url)


def poll_until(fetch: Callable[[], dict[str, Any]], done: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """Every snapshot a poller sees until `done` holds (bounded: fails after POLL_BOUND seconds)."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + POLL_BOUND
    while time.monotonic() < deadline:
        seen.append(fetch())
        if done(seen[-1]):
            return seen
        time.sleep(0.02)  # a poller's pace, not a synchronisation: the loop ends on a condition
    raise AssertionError(f"not reached in {POLL_BOUND} s; last status {seen[-1].get('status')!r}")


def message_text(response: dict[str, Any]) -> str:
    return "".join(p.get("text", "") for item in response["output"] if item["type"] == "message"
                   for p in item["content"] if p["type"] == "output_text")


def retrieve_json(client: OpenAI, response_id: str) -> dict[str, Any]:
    """`responses.retrieve()` as the SDK parses it, and checked against the spec as the wire carried it."""
    raw = client.responses.with_raw_response.retrieve(response_id)
    body = json.loads(raw.text)
    validate_response(body)
    parsed = raw.parse()
    assert parsed.id == response_id and parsed.object == "response"
    return body


def replay(base_url: str, response_id: str) -> Any:
    with httpx.Client(timeout=TIMEOUT) as http, http.stream(
            "GET", f"{base_url}/responses/{response_id}", params={"stream": "true"}, headers=headers()) as r:
        assert r.status_code == 200
        return parse_sse(r.read())


def on_loop(router: RouterThread, coro: Any) -> Any:
    """Run a coroutine on the router's own loop (its store belongs to it) and wait for its result."""
    assert router.loop is not None
    return asyncio.run_coroutine_threadsafe(coro, router.loop).result(timeout=30)


def assert_status_order(polls: list[dict[str, Any]]) -> None:
    rank = {"queued": 0, "in_progress": 1, "completed": 2}
    ranks = [rank[p["status"]] for p in polls]
    assert ranks == sorted(ranks), [p["status"] for p in polls]


# -- background mode through polls ----------------------------------------------------------------------------


def test_background_retrieve_is_the_whole_response_from_queued_to_completed(client: OpenAI,
                                                                            router: RouterThread) -> None:
    created = client.responses.create(model="slow", input="poll me", background=True)
    assert created.status == "queued" and created.background is True
    first = client.responses.retrieve(created.id)
    assert first.id == created.id and first.status in ("queued", "in_progress")
    validate_response(first.model_dump(mode="json", exclude_unset=True))
    polls = poll_until(lambda: retrieve_json(client, created.id), lambda r: r["status"] == "completed")
    assert_status_order(polls)
    assert "in_progress" in [p["status"] for p in polls]
    final = client.responses.retrieve(created.id)
    streamed = replay(router.base_url, created.id)
    assert streamed.types[:3] == ["response.created", "response.queued", "response.in_progress"]
    assert final.output_text == streamed.text() == expected_text("poll me", length=SLOW_LENGTH)
    # Mid-way polls show the open content part's text so far: a growing prefix of the final text.
    partial = [message_text(p) for p in polls if p["status"] == "in_progress" and p["output"]]
    assert any(0 < len(t) < len(final.output_text) for t in partial)
    assert all(final.output_text.startswith(t) for t in partial)
    assert [len(t) for t in partial] == sorted(len(t) for t in partial)


def test_a_queued_response_is_whole_and_a_poll_relaunches_it_when_its_worker_never_came(sim: Any) -> None:
    """With a worker Lambda (`launch_background`), a background response is only a header until the worker claims
    it: a poll shows the whole queued object, and once the lease has expired a poll launches a worker again."""
    launched: list[tuple[str, int]] = []

    async def launcher(response_id: str, epoch: int) -> None:
        launched.append((response_id, epoch))

    with RouterThread(polling_config(sim.base_url), store=MemoryStore()) as router:
        router.runtime.launch_background = launcher  # a worker that never comes
        client = sdk(router.base_url)
        created = client.responses.create(model="demo", input="wait for me", background=True)
        assert launched == [(created.id, 0)]
        queued = retrieve_json(client, created.id)
        assert queued["status"] == "queued" and queued["output"] == [] and queued["background"] is True
        assert {k: queued[k] for k in ("id", "model", "created_at")} == {
            "id": created.id, "model": "demo", "created_at": created.created_at}
        poll_until(lambda: retrieve_json(client, created.id), lambda r: len(launched) > 1)
        assert launched[1] == (created.id, 0)  # the same claim again: a duplicate worker is fenced
        router.runtime.launch_background = None  # now this process takes it over at the next stale poll
        polls = poll_until(lambda: retrieve_json(client, created.id), lambda r: r["status"] == "completed")
    assert_status_order([queued, *polls])
    assert message_text(polls[-1]) == expected_text("wait for me")


def test_a_get_while_a_stream_runs_shows_the_text_so_far(client: OpenAI, router: RouterThread) -> None:
    seen: list[dict[str, Any]] = []
    polled: dict[str, Any] = {}
    so_far = ""
    with httpx.Client(timeout=TIMEOUT) as http, http.stream(
            "POST", f"{router.base_url}/responses", headers=headers(),
            json={"model": "slow", "input": "watch me", "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                seen.append(json.loads(line[6:]))
            deltas = [e["delta"] for e in seen if e["type"] == "response.output_text.delta"]
            if len(deltas) >= 8 and not polled:
                polled = retrieve_json(client, seen[0]["response"]["id"])
                so_far = "".join(deltas)
    final = expected_text("watch me", length=SLOW_LENGTH)
    assert polled["status"] == "in_progress"
    message = [i for i in polled["output"] if i["type"] == "message"]
    assert len(message) == 1 and message[0]["status"] == "in_progress"
    text = message[0]["content"][0]["text"]
    # What the client saw is committed, so the poll shows at least that, and no more than the answer.
    assert text.startswith(so_far) and final.startswith(text) and len(text) < len(final)
    assert "".join(e["delta"] for e in seen if e["type"] == "response.output_text.delta") == final


def test_polls_alone_take_over_a_response_whose_producer_was_killed(tmp_path: Path, sim: Any) -> None:
    length = 80
    config = polling_config(sim.base_url, slow_length=length, tps=25)
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump(config))
    db = tmp_path / "shared.db"
    with RouterProcess(path, f"sqlite:///{db}") as a, \
            RouterThread(config, store=open_store(f"sqlite:///{db}")) as b:
        producer = sdk(a.base_url)
        created = producer.responses.create(model="slow", input="outlive the producer", background=True)
        before = poll_until(lambda: retrieve_json(producer, created.id),
                            lambda r: r["status"] == "in_progress" and len(message_text(r)) > 0)
        a.kill()  # SIGKILL: its lease is no longer renewed, nobody generates the response
        poller = sdk(b.base_url)
        after = poll_until(lambda: retrieve_json(poller, created.id), lambda r: r["status"] == "completed")
        header = on_loop(b, b.runtime.store.get(created.id))
        streamed = replay(b.base_url, created.id)  # only now, after the polls finished it: dense, one ending
    assert header.owner_epoch == 1  # taken over once, by a poll of router b
    assert_status_order(before + after)
    text = expected_text("outlive the producer", length=length)
    assert message_text(after[-1]) == streamed.text() == text
    assert message_text(before[-1]) and text.startswith(message_text(before[-1]))
    assert len([i for i in after[-1]["output"] if i["type"] == "message"]) == 1


# -- input_items ----------------------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "developer", "content": "Be brief."},
    {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "What is the weather?"}]},
    {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}", "id": "fc_client"},
    {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
    {"role": "assistant", "content": "It is sunny."},
    {"role": "user", "content": "Thanks"},
]


def test_input_items_lists_the_request_input_with_ids(client: OpenAI) -> None:
    response = client.responses.create(model="demo", input=CONVERSATION)  # type: ignore[arg-type]
    page = client.responses.input_items.list(response.id)
    items = [i.model_dump(mode="json", exclude_unset=True) for i in page.data]
    for item in items:
        validate_item(item)
    asc = list(reversed(items))  # the default order is desc: newest first
    assert [i["type"] for i in asc] == ["message", "message", "function_call", "function_call_output", "message",
                                        "message"]
    assert [i.get("role") for i in asc] == ["developer", "user", None, None, "assistant", "user"]
    assert asc[0]["content"] == [{"type": "input_text", "text": "Be brief."}]
    assert asc[4]["content"][0]["type"] == "output_text" and asc[4]["content"][0]["text"] == "It is sunny."
    assert asc[2]["id"] == "fc_client"  # an item sent with an id keeps it
    ids = [i["id"] for i in asc]
    assert len(set(ids)) == len(ids) and all(i.startswith(("msg_", "fc_", "fco_")) for i in ids)
    assert page.has_more is False
    again = client.responses.input_items.list(response.id, order="asc")
    assert [i.id for i in again.data] == ids  # stable across reads


def test_input_items_pages_with_limit_order_and_after(client: OpenAI) -> None:
    response = client.responses.create(model="demo", input=CONVERSATION)  # type: ignore[arg-type]
    ids = [i.id for i in client.responses.input_items.list(response.id, order="asc").data]
    first = client.responses.input_items.list(response.id, order="asc", limit=4)
    assert [i.id for i in first.data] == ids[:4] and first.has_more is True
    raw = json.loads(client.responses.input_items.with_raw_response.list(
        response.id, order="asc", limit=4, after=ids[3]).text)
    assert raw["object"] == "list" and [i["id"] for i in raw["data"]] == ids[4:]
    assert raw["first_id"] == ids[4] and raw["last_id"] == ids[-1] and raw["has_more"] is False
    newest = client.responses.input_items.list(response.id, limit=2)
    assert [i.id for i in newest.data] == ids[::-1][:2]
    # The SDK's auto-pagination follows `after` to the end.
    assert [i.id for i in client.responses.input_items.list(response.id, limit=1)] == ids[::-1]
    with httpx.Client(timeout=TIMEOUT) as http:
        url = f"{client.base_url}responses/{response.id}/input_items"
        for params, param in (({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"order": "up"}, "order"),
                              ({"after": "msg_nope"}, "after")):
            r = http.get(url, params=params, headers=headers())
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_input_items_are_the_request_own_not_the_previous_chain(client: OpenAI) -> None:
    first = client.responses.create(model="demo", input="first turn")
    second = client.responses.create(model="demo", input="second turn", previous_response_id=first.id)
    items = client.responses.input_items.list(second.id).data
    assert len(items) == 1
    assert items[0].model_dump(exclude_unset=True)["content"] == [{"type": "input_text", "text": "second turn"}]
    first_items = client.responses.input_items.list(first.id).data
    assert [i.model_dump()["content"][0]["text"] for i in first_items] == ["first turn"]


def test_input_items_include_encrypted_reasoning_only_on_request(client: OpenAI) -> None:
    sealed = encode_reasoning(ReasoningSeal("anthropic", signature="sig"))
    response = client.responses.create(model="demo", input=[  # type: ignore[arg-type]
        {"role": "user", "content": "think"},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "hm"}], "encrypted_content": sealed},
        {"role": "user", "content": "again"}])
    plain = client.responses.input_items.list(response.id, order="asc").data
    assert [i.type for i in plain] == ["message", "reasoning", "message"]
    assert plain[1].model_dump(exclude_unset=True).get("encrypted_content") is None
    included = client.responses.input_items.list(response.id, order="asc", include=["reasoning.encrypted_content"])
    item = included.data[1].model_dump(mode="json", exclude_unset=True)
    validate_item(item)
    assert item["encrypted_content"] == sealed and item["id"] == plain[1].id


def test_input_items_of_another_tenant_are_a_404(client: OpenAI, router: RouterThread) -> None:
    response = client.responses.create(model="demo", input="mine")
    with pytest.raises(openai.NotFoundError):
        sdk(router.base_url, key="sk-other").responses.input_items.list(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list("resp_doesnotexist")
