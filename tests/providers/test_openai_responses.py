"""The OpenAI Responses adapter against a real HTTP fake replaying every recorded Responses stream, every fault kind,
and the request mapping (read back from what the fake received)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator

import httpx
import pytest

from tests.fakes.openai_responses import RESPONSES_FIXTURES, ResponsesFake, responses_recordings
from tests.fakes.sse_replay import data_frame, frame_payloads, json_error, stream
from tests.fakes.upstream import Script
from tests.providers.sse_support import (
    expected_responses,
    fold,
    make_provider,
    run,
    simple_request,
    usage_dict,
)
from unbroken.ir import (
    CONTINUE_INSTRUCTION,
    Continuation,
    Delta,
    FunctionCall,
    FunctionCallOutput,
    FunctionTool,
    GenerationRequest,
    ImagePart,
    JsonSchemaFormat,
    Message,
    Reasoning,
    TextPart,
    ToolChoice,
)
from unbroken.providers.base import ProviderError

RECORDINGS = responses_recordings()
PNG = "data:image/png;base64,iVBORw0KGgo="


@pytest.fixture(scope="module")
def server() -> Iterator[ResponsesFake]:
    # One server for the module: stopping one costs its poll interval.
    with ResponsesFake() as f:
        yield f


@pytest.fixture
def fake(server: ResponsesFake) -> ResponsesFake:
    server.reset()
    return server


def provider(http: httpx.AsyncClient, fake: ResponsesFake, **options: object):  # type: ignore[no-untyped-def]
    return make_provider(http, "openai_responses", "gpt-5", fake.base_url + "/v1", **options)


def test_every_fixture_file_is_replayed() -> None:
    files = {p.name for p in RESPONSES_FIXTURES.iterdir() if p.name.endswith((".chunks.txt", ".yaml"))}
    assert files == {name.split("#")[0] for name in RECORDINGS}
    # The 4-stream file is split into its 4 responses.
    assert sum(n.startswith("openai-reasoning-encrypted-content") for n in RECORDINGS) == 4


@pytest.mark.parametrize("name", sorted(RECORDINGS))
async def test_recorded_stream(name: str, http: httpx.AsyncClient, fake: ResponsesFake) -> None:
    fake.serve(fake.replay(name))
    got = await run(provider(http, fake), simple_request())
    want = expected_responses(RECORDINGS[name])
    assert got.text == want.text
    assert got.refusal == want.refusal
    assert got.summary == want.summary
    assert got.reasoning == want.reasoning
    assert got.seals == want.seals
    assert got.seal_providers <= {"openai_responses"}
    assert got.calls == want.calls
    for _, _, args in got.calls:
        json.loads(args)  # complete JSON documents
    if want.error_code is not None:
        assert got.error is not None and got.error.mid_stream
        assert got.error.code == want.error_code
        assert got.finish is None
    else:
        assert got.error is None, got.error
        assert got.finish == want.finish
        assert usage_dict(got.usage) == want.usage
        assert got.usage_count == (1 if want.usage else 0)
    if want.model:
        assert got.models[:1] == [want.model]


async def test_error_fixture_is_quota(http: httpx.AsyncClient, fake: ResponsesFake) -> None:
    fake.serve(fake.replay("openai-error.1.chunks.txt"))
    got = await run(provider(http, fake), simple_request())
    assert got.error is not None and got.error.kind == "quota"


async def test_custom_tool_call_is_ignored_with_a_warning(http: httpx.AsyncClient, fake: ResponsesFake,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    fake.serve(fake.replay("openai-custom-tool.1.chunks.txt"))
    with caplog.at_level(logging.WARNING, logger="unbroken.providers.openai_responses"):
        got = await run(provider(http, fake), simple_request())
    assert got.calls == [] and got.error is None
    assert any("custom" in r.getMessage() for r in caplog.records)
    assert not any("SELECT" in r.getMessage() for r in caplog.records)  # never the value


async def test_correlates_by_output_index_when_item_ids_rotate(http: httpx.AsyncClient, fake: ResponsesFake) -> None:
    # The Copilot recording rotates item_id on every event; rebuild a function-call stream the same way.
    frames = [
        {"type": "response.created", "response": {"model": "gpt-x"}},
        {"type": "response.output_item.added", "output_index": 0,
         "item": {"type": "function_call", "id": "id-1", "call_id": "call_a", "name": "f", "arguments": ""}},
        {"type": "response.output_item.added", "output_index": 1,
         "item": {"type": "function_call", "id": "id-2", "call_id": "call_b", "name": "g", "arguments": ""}},
        {"type": "response.function_call_arguments.delta", "output_index": 1, "item_id": "id-3", "delta": '{"y"'},
        {"type": "response.function_call_arguments.delta", "output_index": 0, "item_id": "id-4", "delta": '{"x":1}'},
        {"type": "response.function_call_arguments.delta", "output_index": 1, "item_id": "id-5", "delta": ":2}"},
        {"type": "response.completed", "response": {"status": "completed", "usage": None}},
    ]
    fake.serve(stream([data_frame(f, event=f["type"]) for f in frames]))
    got = await run(provider(http, fake), simple_request())
    assert got.calls == [("call_a", "f", '{"x":1}'), ("call_b", "g", '{"y":2}')]
    assert got.finish == "tool_calls"


async def test_incomplete_maps_reason(http: httpx.AsyncClient, fake: ResponsesFake) -> None:
    for reason, finish in (("max_output_tokens", "length"), ("content_filter", "content_filter")):
        ev = {"type": "response.incomplete", "response": {"status": "incomplete",
                                                          "incomplete_details": {"reason": reason},
                                                          "usage": {"input_tokens": 3, "output_tokens": 4}}}
        fake.serve(stream([data_frame({"type": "response.output_text.delta", "delta": "hi"}),
                           data_frame(ev, event=ev["type"])]))
        got = await run(provider(http, fake), simple_request())
        assert (got.text, got.finish, got.usage and got.usage.output_tokens) == ("hi", finish, 4)


# -- faults -------------------------------------------------------------------------------------------------------

TEXT = "openai-phase.1.chunks.txt"


def text_of_first(frames: list[bytes], n: int) -> str:
    return "".join(json.loads(p).get("delta", "") for p in frame_payloads(frames[:n])
                   if json.loads(p)["type"] == "response.output_text.delta")


async def test_429_with_retry_after(http: httpx.AsyncClient, fake: ResponsesFake) -> None:
    fake.serve(fake.http_error(429, "rate_limit_exceeded", "slow down", headers={"retry-after": "7"}))
    got = await run(provider(http, fake), simple_request())
    assert got.error is not None
    assert (got.error.kind, got.error.status, got.error.retry_after, got.error.mid_stream) == \
        ("rate_limited", 429, 7.0, False)


async def test_429_retry_after_ms_wins(http: httpx.AsyncClient, fake: ResponsesFake) -> None:
    fake.serve(fake.http_error(429, "rate_limit_exceeded", headers={"retry-after": "7", "retry-after-ms": "1500"}))
    got = await run(provider(http, fake), simple_request())
    assert got.error is not None and got.error.retry_after == 1.5


@pytest.mark.parametrize(("status", "code", "kind"), [
    (500, "server_error", "server_error"),
    (503, "server_error", "overloaded"),
    (429, "insufficient_quota", "quota"),
    (400, "context_length_exceeded", "context_length"),
    (400, "invalid_request_error", "bad_request"),
    (401, "invalid_api_key", "auth"),
    (404, "model_not_found", "not_found"),
])
async def test_http_errors(status: int, code: str, kind: str, http: httpx.AsyncClient, fake: ResponsesFake) -> None:
    fake.serve(fake.http_error(status, code))
    got = await run(provider(http, fake), simple_request())
    assert got.error is not None and got.error.kind == kind and got.error.status == status
    assert got.deltas == []


async def test_recorded_http_error_body(http: httpx.AsyncClient, fake: ResponsesFake) -> None:
    body = json.loads((RESPONSES_FIXTURES / "openai-error.1.json").read_text())
    fake.serve(json_error(429, body))
    got = await run(provider(http, fake), simple_request())
    assert got.error is not None and got.error.kind == "quota"


@pytest.mark.parametrize(("code", "kind"), [
    ("server_is_overloaded", "overloaded"),
    ("rate_limit_exceeded", "rate_limited"),
    ("insufficient_quota", "quota"),
    ("something_else", "server_error"),
])
@pytest.mark.parametrize("nested", [True, False])
async def test_in_band_error_event(code: str, kind: str, nested: bool, http: httpx.AsyncClient,
                                   fake: ResponsesFake) -> None:
    fake.serve(fake.in_band_error(TEXT, 6, code, nested=nested))
    got = await run(provider(http, fake), simple_request())
    assert got.error is not None
    assert (got.error.kind, got.error.code, got.error.mid_stream) == (kind, code, True)
    assert got.text == text_of_first(RECORDINGS[TEXT], 6) != ""


async def test_response_failed_alone(http: httpx.AsyncClient, fake: ResponsesFake) -> None:
    fake.serve(fake.failed_after(TEXT, 6, "server_error"))
    got = await run(provider(http, fake), simple_request())
    assert got.error is not None and (got.error.kind, got.error.mid_stream) == ("server_error", True)


async def test_connection_reset_mid_stream(http: httpx.AsyncClient, fake: ResponsesFake) -> None:
    fake.serve(fake.reset_after(TEXT, 6))
    got = await run(provider(http, fake), simple_request())
    assert got.error is not None and (got.error.kind, got.error.mid_stream) == ("connection", True)
    assert got.text == text_of_first(RECORDINGS[TEXT], 6)
    assert got.finish is None


async def test_stall_then_reset(http: httpx.AsyncClient) -> None:
    """A stalled upstream yields what it sent and nothing more; when it finally drops the connection the adapter
    raises a mid-stream connection error (stall timeouts belong to the attempt loop)."""
    with ResponsesFake() as fake:
        await _stall_then_reset(http, fake)


async def _stall_then_reset(http: httpx.AsyncClient, fake: ResponsesFake) -> None:
    fake.serve(fake.stall_after(TEXT, 6))
    want = text_of_first(RECORDINGS[TEXT], 6)
    seen: list[Delta] = []
    got_all = asyncio.Event()

    async def consume() -> None:
        async for d in provider(http, fake).stream(simple_request()):
            seen.append(d)
            if fold(seen).text == want:
                got_all.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_all.wait(), 10)
    assert not task.done()
    await asyncio.to_thread(fake.close)
    with pytest.raises(ProviderError) as exc:
        await asyncio.wait_for(task, 10)
    assert exc.value.kind == "connection" and exc.value.mid_stream
    assert fold(seen).text == want and fold(seen).finish is None


async def test_malformed_chunk(http: httpx.AsyncClient, fake: ResponsesFake) -> None:
    fake.serve(fake.malformed_after(TEXT, 5))
    got = await run(provider(http, fake), simple_request())
    assert got.error is not None and (got.error.kind, got.error.mid_stream) == ("malformed", True)


@pytest.mark.parametrize("name", [TEXT, "openai-reasoning-encrypted-content.1.chunks.txt#1"])
async def test_missing_terminal_event_is_truncated(name: str, http: httpx.AsyncClient, fake: ResponsesFake) -> None:
    fake.serve(fake.missing_terminator(name))
    got = await run(provider(http, fake), simple_request())
    assert got.error is not None and (got.error.kind, got.error.mid_stream) == ("truncated", True)
    assert got.text == expected_responses(RECORDINGS[name]).text
    assert got.finish is None


async def test_not_sse_is_malformed(http: httpx.AsyncClient, fake: ResponsesFake) -> None:
    fake.serve(Script(200, {"content-type": "text/html"}, [b"<html>proxy error</html>"]))
    got = await run(provider(http, fake), simple_request())
    assert got.error is not None and got.error.kind == "malformed"


# -- request mapping ----------------------------------------------------------------------------------------------


def _ok(fake: ResponsesFake) -> None:
    fake.serve(fake.replay(TEXT))


async def test_request_mapping(http: httpx.AsyncClient, fake: ResponsesFake) -> None:
    _ok(fake)
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    request = GenerationRequest(
        model="public",
        instructions="Be brief.",
        items=[
            Message("developer", [TextPart("Use metric units.")]),
            Message("user", [TextPart("Weather here?"), ImagePart(PNG, detail="low"),
                             ImagePart("https://example.com/a.jpg")]),
            Message("assistant", [TextPart("Let me check.")]),
            FunctionCall("call_1", "get_weather", '{"city":"Paris"}'),
            FunctionCallOutput("call_1", '{"temp":21}'),
        ],
        tools=[FunctionTool("get_weather", "Weather for a city", schema, strict=True), FunctionTool("noop")],
        tool_choice=ToolChoice("auto"),
        parallel_tool_calls=False,
        max_output_tokens=321,
        temperature=0.2,
        top_p=0.9,
        text_format=JsonSchemaFormat("answer", schema, description="The answer", strict=True),
    )
    got = await run(provider(http, fake), request)
    assert got.error is None
    [req] = fake.requests
    assert req.method == "POST" and req.path == "/v1/responses"
    assert req.headers["authorization"] == "Bearer test-key"
    body = req.json()
    assert body["model"] == "gpt-5" and body["stream"] is True and body["store"] is False
    assert body["instructions"] == "Be brief."
    assert body["input"] == [
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Use metric units."}]},
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Weather here?"},
            {"type": "input_image", "image_url": PNG, "detail": "low"},
            {"type": "input_image", "image_url": "https://example.com/a.jpg", "detail": "auto"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me check."}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": '{"temp":21}'},
    ]
    assert body["tools"] == [
        {"type": "function", "name": "get_weather", "description": "Weather for a city", "parameters": schema,
         "strict": True},
        {"type": "function", "name": "noop", "parameters": {"type": "object", "properties": {}}},
    ]
    assert body["tool_choice"] == "auto" and body["parallel_tool_calls"] is False
    assert (body["max_output_tokens"], body["temperature"], body["top_p"]) == (321, 0.2, 0.9)
    assert body["text"] == {"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True,
                                       "description": "The answer"}}
    assert "reasoning" not in body and "include" not in body


@pytest.mark.parametrize(("choice", "wire"), [
    (ToolChoice("none"), "none"),
    (ToolChoice("required"), "required"),
    (ToolChoice("auto", name="b"), {"type": "function", "name": "b"}),
    (ToolChoice("required", allowed=["a"]),
     {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "a"}]}),
    (ToolChoice("auto", allowed=["a", "b"]), {"type": "allowed_tools", "mode": "auto", "tools": [
        {"type": "function", "name": "a"}, {"type": "function", "name": "b"}]}),
])
async def test_tool_choice(choice: ToolChoice, wire: object, http: httpx.AsyncClient, fake: ResponsesFake) -> None:
    _ok(fake)
    await run(provider(http, fake), simple_request(tools=[FunctionTool("a"), FunctionTool("b")], tool_choice=choice))
    assert fake.requests[0].json()["tool_choice"] == wire


async def test_https_image_rejected_when_disabled(http: httpx.AsyncClient, fake: ResponsesFake) -> None:
    _ok(fake)
    req = GenerationRequest(model="m", items=[Message("user", [ImagePart("https://example.com/a.png")])])
    got = await run(provider(http, fake, image_urls=False), req)
    assert got.error is not None and got.error.kind == "bad_request" and "data URL" in got.error.message
    assert fake.requests == []


async def test_continuation_is_a_continue_instruction(http: httpx.AsyncClient, fake: ResponsesFake) -> None:
    _ok(fake)
    p = provider(http, fake)
    assert p.capabilities.literal_continuation is False
    await run(p, simple_request("Tell a story", continuation=Continuation("Once upon a", literal=False)))
    assert fake.requests[0].json()["input"][-2:] == [
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Once upon a"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": CONTINUE_INSTRUCTION}]},
    ]


async def test_literal_continuation_when_configured(http: httpx.AsyncClient, fake: ResponsesFake) -> None:
    _ok(fake)
    p = provider(http, fake, literal_continuation=True)
    assert p.capabilities.literal_continuation is True
    await run(p, simple_request("Tell a story", continuation=Continuation("Once upon a", literal=True)))
    assert fake.requests[0].json()["input"][-1] == {
        "type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Once upon a"}]}


async def test_reasoning_round_trip_and_foreign_reasoning_dropped(http: httpx.AsyncClient,
                                                                  fake: ResponsesFake) -> None:
    _ok(fake)
    request = GenerationRequest(model="m", reasoning_effort="high", items=[
        Message("user", [TextPart("2+2?")]),
        Reasoning(summary=["Adding."], encrypted_content="gAAAA-own", provider="openai_responses"),
        Reasoning(text="thinking", signature="sig-anthropic", provider="anthropic"),
        Reasoning(encrypted_content="gAAAA-azure", provider="azure"),
        Reasoning(summary=["no content"], provider="openai_responses"),
        FunctionCall("call_1", "add", '{"a":2,"b":2}'),
        FunctionCallOutput("call_1", "4"),
    ])
    await run(provider(http, fake), request)
    body = fake.requests[0].json()
    reasoning = [i for i in body["input"] if i["type"] == "reasoning"]
    assert reasoning == [{"type": "reasoning", "encrypted_content": "gAAAA-own",
                          "summary": [{"type": "summary_text", "text": "Adding."}]}]
    assert body["reasoning"] == {"effort": "high", "summary": "auto"}
    assert body["include"] == ["reasoning.encrypted_content"]


async def test_reasoning_items_alone_ask_for_encrypted_content(http: httpx.AsyncClient, fake: ResponsesFake) -> None:
    _ok(fake)
    request = GenerationRequest(model="m", items=[
        Message("user", [TextPart("hi")]),
        Reasoning(encrypted_content="gAAAA-own", provider="openai_responses"),
    ])
    await run(provider(http, fake), request)
    body = fake.requests[0].json()
    assert body["include"] == ["reasoning.encrypted_content"] and "reasoning" not in body


async def test_default_base_url() -> None:
    async with httpx.AsyncClient() as client:
        p = make_provider(client, "openai_responses", "gpt-5", None)
        assert p.url() == "https://api.openai.com/v1/responses"  # type: ignore[attr-defined]
