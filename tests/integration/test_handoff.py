"""Streams longer than one invocation: a journaled foreground stream whose client opted in to recovery events ends
at its deadline with `router:stream.resume` and `[DONE]` (no terminal event) while the generation goes on — in
this process locally, in the worker Lambda on AWS — and resuming with `starting_after` reads on to the single
terminal event. Without the opt-in the stream ends `response.incomplete` (`stream_deadline`) as before."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.integration.test_responses_api import expected_text
from tests.support.client import TIMEOUT, headers, post_stream
from tests.support.server import API_KEY, RouterThread, base_config, config_from, sim_model
from tests.support.sse import Stream, parse_sse
from unbroken import worker
from unbroken.api.app import create_app
from unbroken.client import resumable_http_client, stream_events
from unbroken.durable import service
from unbroken.journal.memory import MemoryStore
from unbroken.journal.store import TERMINAL_EVENT_TYPES
from unbroken.protocol.request import ResponsesRequest
from unbroken.simulator import SimulatedUpstream

RECOVERY = {"X-Unbroken-Recovery-Events": "true"}
LENGTH = 120
BODY = {"model": "slow", "input": "A story longer than one invocation"}
# 120 tokens at 60 tokens/s: about 2 s of generation against a 0.7 s stream deadline, so three or four streams.
MODEL = sim_model("slow", deployments=1, tps=60, length=LENGTH)
DEADLINE = 0.7


@pytest.fixture(scope="module")
def router() -> Iterator[RouterThread]:
    config = base_config(MODEL, stream_deadline_seconds=DEADLINE, lease_seconds=1.0, heartbeat_seconds=0.2)
    with RouterThread(config, store=MemoryStore()) as server:
        yield server


def _get_stream(base_url: str, response_id: str, after: int) -> Stream:
    with httpx.Client(timeout=TIMEOUT) as client, client.stream(
        "GET", f"{base_url}/responses/{response_id}", params={"stream": "true", "starting_after": str(after)},
        headers=headers(),
    ) as response:
        assert response.status_code == 200
        raw = response.read()
    return parse_sse(raw, allow_extensions=True, first_seq=after + 1)


def _split(stream: Stream) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The response's events of one stream, and its `router:stream.resume` (None if it has none)."""
    resume = [e for e in stream.events if e["type"] == "router:stream.resume"]
    assert len(resume) <= 1 and (not resume or stream.events[-1] is resume[0]), "resume comes last, once"
    return [e for e in stream.events if e["type"] != "router:stream.resume"], resume[0] if resume else None


def _text(events: list[dict[str, Any]]) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")


def _terminals(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events if e["type"] in TERMINAL_EVENT_TYPES]


def test_opted_in_stream_ends_with_resume_and_reads_on_to_one_terminal(router: RouterThread) -> None:
    response, first = post_stream(router.base_url, BODY, extra_headers=RECOVERY, allow_extensions=True)
    assert response.status_code == 200
    assert first.done, "the stream ends with data: [DONE]"
    events, resume = _split(first)
    assert resume is not None and _terminals(events) == []
    assert resume["sequence_number"] == events[-1]["sequence_number"] == resume["starting_after"]
    response_id = events[0]["response"]["id"]
    assert resume["response_id"] == response_id
    segments = 1
    while not _terminals(events):  # every resumed stream is bounded by the deadline too
        more, resume = _split(_get_stream(router.base_url, response_id, events[-1]["sequence_number"]))
        assert (resume is None) == bool(_terminals(more))
        events += more
        segments += 1
        assert segments < 20
    assert segments >= 2
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert _terminals(events) == ["response.completed"] and events[-1]["type"] == "response.completed"
    assert _text(events) == expected_text(BODY["input"], length=LENGTH)
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == _text(events)


def test_without_opt_in_the_deadline_still_ends_the_response_incomplete(router: RouterThread) -> None:
    _, stream = post_stream(router.base_url, BODY)
    assert stream.done and stream.terminal["type"] == "response.incomplete"
    assert stream.response["incomplete_details"] == {"reason": "stream_deadline"}
    assert 0 < len(stream.text()) < len(expected_text(BODY["input"], length=LENGTH))
    # Terminal in the journal too: a resume replays the same ending and nothing goes on.
    rest = _get_stream(router.base_url, stream.response["id"], stream.events[-1]["sequence_number"])
    assert rest.events == [] and rest.done


def test_python_client_resumes_across_the_deadline(router: RouterThread) -> None:
    events = list(stream_events(router.base_url, BODY, api_key=API_KEY, headers=RECOVERY))
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert "router:stream.resume" not in [e["type"] for e in events]
    assert _terminals(events) == ["response.completed"] and events[-1]["type"] == "response.completed"
    assert _text(events) == expected_text(BODY["input"], length=LENGTH)


def test_hand_on_hops_match_the_worker() -> None:
    assert service.HAND_ON_HOPS == worker.MAX_HOPS


# -- AWS: the gateway hands the generation to the worker ----------------------------------------------------------


@pytest.fixture(scope="module")
def sim() -> Iterator[Any]:
    with SimulatedUpstream.start_in_thread() as handle:
        yield handle


async def test_on_aws_the_gateway_hands_the_stream_to_the_worker(sim: Any) -> None:
    model = sim_model("slow", deployments=1, tps=60, length=LENGTH)
    model["deployments"][0]["base_url"] = sim.base_url
    config = config_from(base_config(model, stream_deadline_seconds=DEADLINE, lease_seconds=1.0))
    store = MemoryStore()
    launched: list[tuple[str, int]] = []

    async def launch(response_id: str, epoch: int) -> None:
        launched.append((response_id, epoch))

    gateway = create_app(config, store, launch_background=launch)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="http://gateway/v1",
                                 timeout=TIMEOUT) as client:
        response = await client.post("/responses", json={**BODY, "stream": True}, headers=headers(**RECOVERY))
    assert response.status_code == 200
    events, resume = _split(parse_sse(response.content, allow_extensions=True))
    assert resume is not None and _terminals(events) == []
    response_id = events[0]["response"]["id"]
    # The launch came before the stream's end (a Lambda may be frozen once its answer is out), from epoch 0.
    assert launched == [(response_id, 0)]
    header = await store.get(response_id)
    assert header is not None and not header.terminal and header.owner_epoch == 0
    committed = await store.read_events(response_id)
    assert committed[-1]["sequence_number"] == resume["sequence_number"]  # everything committed was sent

    # The worker (another Lambda sharing the store) takes it over from that epoch and finishes it.
    worker_runtime = create_app(config, store).state.runtime
    invoked: list[dict[str, Any]] = []
    done = await worker.run_event(worker_runtime, {"kind": "background", "response_id": response_id, "epoch": 0},
                                  time.time() + 900, invoked.append)
    assert done == {"status": "done", "response_id": response_id} and invoked == []
    all_events = await store.read_events(response_id)
    assert [e["sequence_number"] for e in all_events] == list(range(len(all_events)))
    assert all_events[:len(events)] == events
    assert _terminals(all_events) == ["response.completed"]
    assert _text(all_events) == expected_text(BODY["input"], length=LENGTH)
    header = await store.get(response_id)
    assert header is not None and header.status == "completed" and header.owner_epoch == 1
    await worker_runtime.aclose()
    await gateway.state.runtime.aclose()


async def test_a_client_that_left_is_not_handed_on(sim: Any) -> None:
    """A client gone before the deadline: the detached cap ends the response incomplete, as before; no worker."""
    model = sim_model("slow", deployments=1, tps=60, length=LENGTH)
    model["deployments"][0]["base_url"] = sim.base_url
    config = config_from(base_config(model, stream_deadline_seconds=5.0, detached_cap_seconds=0.3,
                                     lease_seconds=1.0))
    store = MemoryStore()
    launched: list[tuple[str, int]] = []

    async def launch(response_id: str, epoch: int) -> None:
        launched.append((response_id, epoch))

    gateway = create_app(config, store, launch_background=launch)
    runtime = gateway.state.runtime
    parsed = ResponsesRequest.parse({**BODY, "stream": True})
    created = await service.create_response(runtime, parsed, service.Caller("t1", time.time() + 5.0,
                                                                            recovery_events=True))
    assert isinstance(created, service.Journaled) and created.run is not None and created.run.task is not None
    created.run.detach()
    await asyncio.wait_for(created.run.task, 10)
    header = await store.get(created.response_id)
    assert header is not None and header.status == "incomplete" and launched == []
    await runtime.aclose()


def test_openai_sdk_on_a_resumable_http_client_reads_across_the_deadline(router: RouterThread) -> None:
    client = openai.OpenAI(base_url=router.base_url, api_key=API_KEY, default_headers=RECOVERY,
                           http_client=resumable_http_client())
    with client.responses.stream(model=BODY["model"], input=BODY["input"]) as stream:
        types = [event.type for event in stream]
        final = stream.get_final_response()
    assert types.count("response.completed") == 1 and types[-1] == "response.completed"
    assert "router:stream.resume" not in types
    assert final.output_text == expected_text(BODY["input"], length=LENGTH)
