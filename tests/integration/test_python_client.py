"""unbroken.client resumes broken streams by itself: through a proxy that cuts the connection mid-stream, the
events a caller sees (with `stream_events`, or through the official `openai` SDK on a resumable http client) are
one stream with dense sequence numbers, one terminal event, and exactly the text of an uncut run."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.support.cutting_proxy import CuttingProxy
from tests.support.server import API_KEY, RouterThread, base_config, sim_model
from unbroken.client import (
    Backoff,
    StreamBroken,
    async_resumable_http_client,
    async_stream_events,
    resumable_http_client,
    stream_events,
)
from unbroken.journal.memory import MemoryStore

BODY = {"model": "slow", "input": "Tell me a long story"}
FAST = Backoff(max_retries=5, initial=0.01, cap=0.05)


@pytest.fixture(scope="module")
def router() -> Iterator[RouterThread]:
    config = base_config(sim_model("slow", deployments=1, length=120, tps=400))
    with RouterThread(config, store=MemoryStore()) as server:
        yield server


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")


def assert_one_dense_stream(events: list[dict[str, Any]]) -> None:
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events if e["type"].startswith("response.") and e["type"] in
            ("response.completed", "response.incomplete", "response.failed")] == ["response.completed"]
    assert events[-1]["type"] == "response.completed"


@pytest.fixture(scope="module")
def uncut(router: RouterThread) -> str:
    events = list(stream_events(router.base_url, BODY, api_key=API_KEY))
    assert_one_dense_stream(events)
    return text_of(events)


def test_stream_events_resume_across_cuts(router: RouterThread, uncut: str) -> None:
    with CuttingProxy(router.port, [2500, 2500, None]) as proxy:
        events = list(stream_events(proxy.base_url, BODY, api_key=API_KEY, backoff=FAST))
    assert proxy.cuts == 2 and proxy.connections == 3  # the POST, then two resumes
    assert_one_dense_stream(events)
    assert text_of(events) == uncut


def test_async_stream_events_resume_across_cuts(router: RouterThread, uncut: str) -> None:
    async def collect(url: str) -> list[dict[str, Any]]:
        return [e async for e in async_stream_events(url, BODY, api_key=API_KEY, backoff=FAST)]

    with CuttingProxy(router.port, [3000, None]) as proxy:
        events = asyncio.run(collect(proxy.base_url))
    assert proxy.cuts == 1
    assert_one_dense_stream(events)
    assert text_of(events) == uncut


def test_openai_sdk_stream_resumes_on_a_resumable_http_client(router: RouterThread, uncut: str) -> None:
    with CuttingProxy(router.port, [2500, 4000, None]) as proxy:
        client = openai.OpenAI(base_url=proxy.base_url, api_key=API_KEY, max_retries=0,
                               http_client=resumable_http_client(backoff=FAST))
        with client.responses.stream(model="slow", input=BODY["input"]) as stream:
            seqs = [event.sequence_number for event in stream]
            final = stream.get_final_response()
    assert proxy.cuts == 2
    assert seqs == list(range(len(seqs)))
    assert final.status == "completed" and final.output_text == uncut


def test_async_openai_sdk_stream_resumes(router: RouterThread, uncut: str) -> None:
    async def run(url: str) -> str:
        client = openai.AsyncOpenAI(base_url=url, api_key=API_KEY, max_retries=0,
                                    http_client=async_resumable_http_client(backoff=FAST))
        text = []
        stream = await client.responses.create(model="slow", input=BODY["input"], stream=True)
        async for event in stream:
            if event.type == "response.output_text.delta":
                text.append(event.delta)
        await client.close()
        return "".join(text)

    with CuttingProxy(router.port, [3000, None]) as proxy:
        assert asyncio.run(run(proxy.base_url)) == uncut
    assert proxy.cuts == 1


def test_a_cut_before_the_response_id_cannot_be_resumed(router: RouterThread) -> None:
    # Past the headers (about 150 bytes), inside the first event (response.created, which carries the id).
    with CuttingProxy(router.port, [300]) as proxy, pytest.raises(StreamBroken, match="before the response id"):
        list(stream_events(proxy.base_url, BODY, api_key=API_KEY, backoff=FAST))


def test_without_a_store_a_cut_says_the_server_cannot_resume() -> None:
    config = base_config(sim_model("slow", deployments=1, length=120, tps=400))
    with RouterThread(config) as plain, CuttingProxy(plain.port, [2500, None]) as proxy:
        uncut_events = list(stream_events(plain.base_url, BODY, api_key=API_KEY))
        assert uncut_events[-1]["type"] == "response.completed"  # a plain Open Responses stream when nothing breaks
        with pytest.raises(StreamBroken, match="cannot resume"):
            list(stream_events(proxy.base_url, BODY, api_key=API_KEY, backoff=FAST))


def test_errors_before_the_stream_are_raised_with_the_error_object(router: RouterThread) -> None:
    import httpx

    with pytest.raises(httpx.HTTPStatusError) as exc:
        list(stream_events(router.base_url, {"model": "nope", "input": "hi"}, api_key=API_KEY))
    assert exc.value.response.status_code == 404
    assert exc.value.response.json()["error"]["code"] == "model_not_found"
