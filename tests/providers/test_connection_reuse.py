"""An adapter reads its upstream's stream to the end of the body, past the end marker (`[DONE]`, `message_stop`,
`response.completed`): the connection then goes back to the shared client's pool, and the next request to the same
upstream sends at once instead of opening a new TCP (and, in production, TLS) connection before its first token.
Against a real HTTP/1.1 server on 127.0.0.1 that counts the connections it accepts."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import pytest

from tests.fakes.sse_replay import data_frame
from tests.fakes.upstream import FakeUpstream, ReceivedRequest, Script
from tests.providers.sse_support import make_provider, run, simple_request
from unbroken.providers import _http

BOUND = 10.0
SSE = {"content-type": "text/event-stream"}


def _chat() -> list[bytes]:
    chunk = {"id": "c1", "object": "chat.completion.chunk", "model": "m",
             "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]}
    done = {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    return [data_frame(chunk), data_frame(done), data_frame("[DONE]")]


def _anthropic() -> list[bytes]:
    return [
        data_frame({"type": "message_start", "message": {"id": "msg_1", "model": "m", "role": "assistant",
                                                         "content": [], "usage": {"input_tokens": 3}}},
                   "message_start"),
        data_frame({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                   "content_block_start"),
        data_frame({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
                   "content_block_delta"),
        data_frame({"type": "content_block_stop", "index": 0}, "content_block_stop"),
        data_frame({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 1}},
                   "message_delta"),
        data_frame({"type": "message_stop"}, "message_stop"),
    ]


def _responses() -> list[bytes]:
    response = {"id": "resp_1", "object": "response", "model": "m", "status": "in_progress", "output": []}
    done = {**response, "status": "completed", "usage": {"input_tokens": 3, "output_tokens": 1}}
    return [
        data_frame({"type": "response.created", "response": response}, "response.created"),
        data_frame({"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0, "content_index": 0,
                    "delta": "Hi"}, "response.output_text.delta"),
        data_frame({"type": "response.completed", "response": done}, "response.completed"),
    ]


def _gemini() -> list[bytes]:
    return [data_frame({"candidates": [{"content": {"role": "model", "parts": [{"text": "Hi"}]},
                                        "finishReason": "STOP"}],
                        "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 1}})]


# provider -> (model, frames of one healthy stream)
PROTOCOLS: dict[str, tuple[str, Callable[[], list[bytes]]]] = {
    "openai": ("gpt-4.1-nano", _chat),
    "anthropic": ("claude-haiku", _anthropic),
    "openai_responses": ("gpt-4.1-nano", _responses),
    "gemini": ("gemini-2.5-flash", _gemini),
}


@pytest.mark.parametrize("provider", list(PROTOCOLS))
async def test_streams_to_one_upstream_share_one_connection(provider: str) -> None:
    model, frames = PROTOCOLS[provider]

    def answer(_: ReceivedRequest) -> Script:
        return Script(200, SSE, frames())

    with FakeUpstream(answer) as fake:
        async with httpx.AsyncClient() as http:
            adapter = make_provider(http, provider, model, fake.base_url)
            for _ in range(3):
                summary = await asyncio.wait_for(run(adapter, simple_request()), BOUND)
                assert summary.error is None and summary.text == "Hi" and summary.finish == "stop"
        assert len(fake.requests) == 3
        assert fake.connections == 1


async def test_an_upstream_that_goes_on_after_its_end_marker_is_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    """The body after `[DONE]` never ends: the stream still ends (the read is bounded), with everything before
    the marker, and the next request opens a new connection instead of waiting for that one."""
    monkeypatch.setattr(_http, "FINISH_BODY_SECONDS", 0.2)

    def answer(_: ReceivedRequest) -> Script:
        return Script(200, SSE, _chat(), stall_after=3)  # the three frames, then silence on an open body

    with FakeUpstream(answer) as fake:
        async with httpx.AsyncClient() as http:
            adapter = make_provider(http, "openai", "gpt-4.1-nano", fake.base_url)
            for _ in range(2):
                summary = await asyncio.wait_for(run(adapter, simple_request()), BOUND)
                assert summary.error is None and summary.text == "Hi" and summary.finish == "stop"
        assert fake.connections == 2
