"""An adapter says when its upstream request is out (`request_written`): a journaled response's run goes first up to
there. Against the simulated upstream, a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextvars
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import pytest_asyncio

from tests.providers.sse_support import make_provider, simple_request
from unbroken.providers._http import open_stream
from unbroken.providers.base import REQUEST_WRITTEN, ProviderError
from unbroken.simulator import SimulatedUpstream

BOUND = 10.0


@pytest_asyncio.fixture
async def sim() -> AsyncIterator[SimulatedUpstream]:
    async with SimulatedUpstream() as upstream:
        yield upstream


def listening(record: list[str]) -> contextvars.Context:
    """A context whose listener notes "written" in `record`."""
    context = contextvars.copy_context()
    context.run(REQUEST_WRITTEN.set, lambda: record.append("written"))
    return context


async def in_context(context: contextvars.Context, fn: Callable[[], Any]) -> Any:
    return await asyncio.get_running_loop().create_task(fn(), context=context)


async def test_open_stream_tells_the_listener_once_the_request_is_written(http: httpx.AsyncClient,
                                                                           sim: SimulatedUpstream) -> None:
    record: list[str] = []

    async def call() -> None:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                "metadata": {"sim_length": "3"}}
        async with open_stream(http, "POST", f"{sim.base_url}/chat/completions", headers={},
                               json_body=body) as response:
            record.append(f"response {response.status_code}")
            await response.aread()

    await asyncio.wait_for(in_context(listening(record), call), BOUND)
    assert record == ["written", "response 200"]  # once, and before the response was there


async def test_a_request_that_could_not_be_sent_tells_nobody(http: httpx.AsyncClient) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    record: list[str] = []

    async def call() -> None:
        async with open_stream(http, "POST", f"http://127.0.0.1:{port}/v1/chat/completions", headers={},
                               json_body={}):
            pass

    with pytest.raises(ProviderError) as caught:
        await asyncio.wait_for(in_context(listening(record), call), BOUND)
    assert caught.value.kind == "connection"
    assert record == []


async def test_an_adapter_tells_the_listener_before_its_first_delta(http: httpx.AsyncClient,
                                                                     sim: SimulatedUpstream) -> None:
    record: list[str] = []
    provider = make_provider(http, "openai_compatible", "sim", sim.base_url)

    async def call() -> None:
        async for _ in provider.stream(simple_request()):
            record.append("delta")

    await asyncio.wait_for(in_context(listening(record), call), BOUND)
    assert record[0] == "written" and record.count("written") == 1
    assert "delta" in record


async def test_without_a_listener_nothing_is_traced(http: httpx.AsyncClient, sim: SimulatedUpstream) -> None:
    seen: list[dict[str, Any]] = []
    send = http.send

    async def spy(request: httpx.Request, **kwargs: Any) -> httpx.Response:
        seen.append(dict(request.extensions))
        return await send(request, **kwargs)

    http.send = spy  # type: ignore[method-assign]
    async with open_stream(http, "POST", f"{sim.base_url}/chat/completions", headers={},
                           json_body={"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                      "stream": True}) as response:
        await response.aread()
    assert seen and "trace" not in seen[0]
