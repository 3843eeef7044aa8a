"""`OpeningSSE` (api/streaming.py): a journaled POST's response, returned before its first output is durable. It
sends nothing, not even its status, until `opening()` returns; what `opening` raises leaves it with nothing sent (the
handler's error response goes out instead); the headers `opening` gives are in the status message.

Called as an ASGI app with a recording `send` and a `receive` that never reports a disconnect; every wait is on an
event, bounded."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from unbroken.api.streaming import OpeningSSE
from unbroken.errors import Failure

BOUND = 5.0
SCOPE = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "method": "POST", "path": "/v1/responses"}


async def _body() -> AsyncIterator[bytes]:
    yield b"data: first\n\n"
    yield b"data: [DONE]\n\n"


class Recorder:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.disconnect = asyncio.Event()

    async def send(self, message: dict[str, Any]) -> None:
        self.messages.append(message)

    async def receive(self) -> dict[str, Any]:
        await self.disconnect.wait()
        return {"type": "http.disconnect"}


async def test_nothing_is_sent_before_the_opening_returns_then_its_headers_and_body() -> None:
    durable, opened = asyncio.Event(), asyncio.Event()

    async def opening() -> tuple[AsyncIterator[bytes], dict[str, str]]:
        opened.set()
        await durable.wait()
        return _body(), {"x-unbroken-deployment": "a"}

    wire = Recorder()
    call = asyncio.create_task(OpeningSSE(opening)(SCOPE, wire.receive, wire.send))
    async with asyncio.timeout(BOUND):
        await opened.wait()
    await asyncio.sleep(0)
    assert wire.messages == []  # the response is being called, and has sent nothing
    durable.set()
    async with asyncio.timeout(BOUND):
        await call
    start, *bodies = wire.messages
    assert start["type"] == "http.response.start" and start["status"] == 200
    headers = dict(start["headers"])
    assert headers[b"content-type"].startswith(b"text/event-stream")
    assert headers[b"x-unbroken-deployment"] == b"a"
    assert b"".join(m.get("body", b"") for m in bodies) == b"data: first\n\ndata: [DONE]\n\n"


async def test_what_the_opening_raises_leaves_nothing_sent() -> None:
    async def opening() -> tuple[AsyncIterator[bytes], dict[str, str]]:
        raise Failure("unavailable", "The response store is unavailable.", code="store_unavailable")

    wire = Recorder()
    with pytest.raises(Failure):
        await asyncio.wait_for(OpeningSSE(opening)(SCOPE, wire.receive, wire.send), BOUND)
    assert wire.messages == []  # so the handler's error (an error object with its status) can still go out


async def test_a_client_gone_before_the_opening_returns_cancels_it_with_nothing_sent() -> None:
    opened, cancelled = asyncio.Event(), asyncio.Event()

    async def opening() -> tuple[AsyncIterator[bytes], dict[str, str]]:
        opened.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("unreachable")

    wire = Recorder()
    call = asyncio.create_task(OpeningSSE(opening)(SCOPE, wire.receive, wire.send))
    async with asyncio.timeout(BOUND):
        await opened.wait()
        wire.disconnect.set()
        await cancelled.wait()  # first_output then stops or detaches the run (tests/unit/test_header_create.py)
        await call
    assert wire.messages == []
