"""AnthropicProvider against a real HTTP fake that replays every recorded Anthropic stream and injects faults.

Expected values are read straight from the fixture files here (their own small parser), never from the adapter.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.fakes.anthropic import (
    ANTHROPIC_FIXTURES,
    MALFORMED_FRAME,
    FakeAnthropic,
    fixture_frames,
    http_error_script,
    stream_script,
)
from tests.fakes.upstream import Script, sse
from unbroken.config import Deployment
from unbroken.ir import (
    CONTINUE_INSTRUCTION,
    Continuation,
    Delta,
    Finish,
    FunctionCall,
    FunctionCallOutput,
    FunctionTool,
    GenerationRequest,
    ImagePart,
    JsonSchemaFormat,
    Message,
    Reasoning,
    ReasoningDelta,
    ReasoningSeal,
    TextDelta,
    TextPart,
    ToolCallDelta,
    ToolCallStart,
    ToolChoice,
    UpstreamModel,
    Usage,
)
from unbroken.providers.anthropic import AnthropicProvider
from unbroken.providers.base import ProviderError

FIXTURE_FILES = sorted(p.name for p in ANTHROPIC_FIXTURES.iterdir() if p.suffix in (".txt", ".yaml"))

# providers.md §9, written out independently of the adapter's table.
FINISH = {"end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop", "tool_use": "tool_calls",
          "max_tokens": "length", "model_context_window_exceeded": "length", "refusal": "content_filter"}

# Synthetic fixtures whose whole point is an error (vercel's spliced-message-start: the client must fail).
EXPECTED_ERRORS = {"spliced-message-start.chunks.txt": "malformed"}

TEXT_FIXTURE = "anthropic-text.chunks.txt"


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


def fixture_payloads(path: Path) -> list[dict[str, Any]]:
    """The JSON data payloads of a fixture, in order (test-side parser)."""
    if path.name.endswith(".chunks.txt"):
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".yaml":
        text = yaml.safe_load(path.read_text(encoding="utf-8"))["interactions"][0]["response"]["body"]["string"]
    else:
        text = path.read_text(encoding="utf-8")
    return [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")]


def expected_from_fixture(path: Path) -> dict[str, Any]:
    text, reasoning = "", ""
    calls: dict[int, list[str]] = {}
    signatures: list[str] = []
    redacted: list[str] = []
    usage: dict[str, int] = {}
    stop_reason = None
    model = None
    for p in fixture_payloads(path):
        t = p["type"]
        if t == "message_start":
            model = model or p["message"].get("model")
            usage.update({k: v for k, v in p["message"].get("usage", {}).items() if isinstance(v, int)})
        elif t == "content_block_start":
            cb = p["content_block"]
            if cb["type"] == "tool_use":
                calls[p["index"]] = [cb["id"], cb["name"], ""]
            elif cb["type"] == "redacted_thinking":
                redacted.append(cb["data"])
        elif t == "content_block_delta":
            d = p["delta"]
            if d["type"] == "text_delta":
                text += d["text"]
            elif d["type"] == "input_json_delta":
                calls[p["index"]][2] += d["partial_json"]
            elif d["type"] == "thinking_delta":
                reasoning += d["thinking"]
            elif d["type"] == "signature_delta":
                signatures.append(d["signature"])
        elif t == "message_delta":
            stop_reason = p["delta"].get("stop_reason") or stop_reason
            usage.update({k: v for k, v in p.get("usage", {}).items() if isinstance(v, int)})
    cached = usage.get("cache_read_input_tokens", 0)
    return {
        "text": text,
        "calls": [tuple(c) for c in calls.values()],
        "reasoning": reasoning,
        "signatures": signatures,
        "redacted": redacted,
        "finish": FINISH[stop_reason],
        "raw_finish": stop_reason,
        "usage": (usage.get("input_tokens", 0) + cached + usage.get("cache_creation_input_tokens", 0),
                  usage.get("output_tokens", 0), cached),
        "model": model,
    }


def summarize(deltas: list[Delta]) -> dict[str, Any]:
    calls: dict[int, list[str]] = {}
    for d in deltas:
        if isinstance(d, ToolCallStart):
            calls[d.index] = [d.call_id, d.name, ""]
        elif isinstance(d, ToolCallDelta):
            calls[d.index][2] += d.arguments
    finishes = [d for d in deltas if isinstance(d, Finish)]
    usages = [d for d in deltas if isinstance(d, Usage)]
    models = [d.name for d in deltas if isinstance(d, UpstreamModel)]
    return {
        "text": "".join(d.text for d in deltas if isinstance(d, TextDelta)),
        "calls": [tuple(c) for c in calls.values()],
        "reasoning": "".join(d.text for d in deltas if isinstance(d, ReasoningDelta)),
        "signatures": [d.signature for d in deltas if isinstance(d, ReasoningSeal) and d.signature],
        "redacted": [d.encrypted_content for d in deltas if isinstance(d, ReasoningSeal) and d.encrypted_content],
        "finish": finishes[-1].reason if finishes else None,
        "raw_finish": finishes[-1].raw if finishes else None,
        "usage": (usages[-1].input_tokens, usages[-1].output_tokens, usages[-1].cached_input_tokens)
        if usages else None,
        "model": models[0] if models else None,
    }


def deployment(base_url: str, **options: Any) -> Deployment:
    return Deployment(name="claude-test", provider="anthropic", model="claude-test-model", base_url=base_url,
                      api_key="sk-ant-test", options=options)


def user(text: str) -> Message:
    return Message("user", [TextPart(text)])


def simple_request(**kw: Any) -> GenerationRequest:
    return GenerationRequest(model="claude", items=kw.pop("items", [user("Hi")]), **kw)


async def collect(stream: AsyncIterator[Delta]) -> tuple[list[Delta], ProviderError | None]:
    out: list[Delta] = []
    try:
        async for d in stream:
            out.append(d)
    except ProviderError as exc:
        return out, exc
    return out, None


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeAnthropic]:
    with FakeAnthropic() as server:
        yield server


async def run(fake: FakeAnthropic, script: Script | list[Script], request: GenerationRequest | None = None,
              **options: Any) -> tuple[list[Delta], ProviderError | None, FakeAnthropic]:
    fake.play(*(script if isinstance(script, list) else [script]))
    async with httpx.AsyncClient() as http:
        provider = AnthropicProvider(deployment(fake.base_url, **options), http)
        deltas, err = await collect(provider.stream(request or simple_request()))
    return deltas, err, fake


def text_frames() -> list[bytes]:
    return fixture_frames(ANTHROPIC_FIXTURES / TEXT_FIXTURE)


def synthetic_stream(texts: list[str], stop_reason: str = "end_turn") -> Script:
    frames = [
        sse({"type": "message_start", "message": {"id": "msg_x", "model": "m", "role": "assistant", "content": [],
                                                  "usage": {"input_tokens": 3, "output_tokens": 1}}},
            "message_start"),
        sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            "content_block_start"),
        *[sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}},
              "content_block_delta") for t in texts],
        sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
        sse({"type": "message_delta", "delta": {"stop_reason": stop_reason}, "usage": {"output_tokens": 5}},
            "message_delta"),
        sse({"type": "message_stop"}, "message_stop"),
    ]
    return stream_script(frames)


# ---------------------------------------------------------------------------------------------------------------
# every recorded stream
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FIXTURE_FILES)
async def test_fixture_replay(name: str, fake: FakeAnthropic) -> None:
    path = ANTHROPIC_FIXTURES / name
    deltas, err, _ = await run(fake, stream_script(fixture_frames(path)))
    if name in EXPECTED_ERRORS:
        assert err is not None and err.kind == EXPECTED_ERRORS[name] and err.mid_stream
        return
    assert err is None, err
    assert summarize(deltas) == expected_from_fixture(path)
    assert isinstance(deltas[-1], Finish)
    assert all(s.provider == "anthropic" for s in deltas if isinstance(s, ReasoningSeal))


async def test_frames_split_across_chunks(fake: FakeAnthropic) -> None:
    """SSE lines cut at arbitrary byte boundaries (even inside multi-byte characters) are reassembled."""
    path = ANTHROPIC_FIXTURES / "anthropic-clear-thinking.1.chunks.txt"
    body = b"".join(fixture_frames(path))
    chunks = [body[i:i + 7] for i in range(0, len(body), 7)]
    deltas, err, _ = await run(fake, Script(200, {"Content-Type": "text/event-stream"}, chunks))
    assert err is None
    assert summarize(deltas) == expected_from_fixture(path)


async def test_duplicate_message_start_is_tolerated_spliced_is_not(fake: FakeAnthropic) -> None:
    """Decision: an identical repeat of message_start (same id, before any content block) is ignored; a
    message_start with another id, or after content began, is `malformed` — joining two answers would corrupt
    the output and a retrying proxy is the likely cause."""
    dup = ANTHROPIC_FIXTURES / "duplicate-message-start.chunks.txt"
    deltas, err, _ = await run(fake, stream_script(fixture_frames(dup)))
    assert err is None and summarize(deltas)["text"] == expected_from_fixture(dup)["text"]

    spliced = ANTHROPIC_FIXTURES / "spliced-message-start.chunks.txt"
    deltas, err, _ = await run(fake, stream_script(fixture_frames(spliced)))
    assert err is not None and err.kind == "malformed"
    # What came before the splice was forwarded; nothing of the second message was.
    first = [p for p in fixture_payloads(spliced)]
    second_start = [i for i, p in enumerate(first) if p["type"] == "message_start"][1]
    before = [p for p in first[:second_start] if p["type"] == "content_block_delta"]
    thinking = "".join(p["delta"].get("thinking", "") for p in before)
    assert summarize(deltas)["reasoning"] == thinking
    assert not any(isinstance(d, Finish) for d in deltas)

    # Same id but after content began: also refused.
    frames = fixture_frames(dup)
    deltas, err, _ = await run(fake, stream_script([frames[0], frames[2], frames[3], frames[1], *frames[4:]]))
    assert err is not None and err.kind == "malformed"


# ---------------------------------------------------------------------------------------------------------------
# faults
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "kind", "retry_after"),
    [
        (http_error_script(429, "Number of request tokens has exceeded your rate limit", retry_after="7"),
         "rate_limited", 7.0),
        (http_error_script(500, "Internal server error"), "server_error", None),
        (http_error_script(503, "Service unavailable"), "overloaded", None),
        (http_error_script(529, "Overloaded"), "overloaded", None),
        (http_error_script(401, "invalid x-api-key"), "auth", None),
        (http_error_script(403, "forbidden"), "auth", None),
        (http_error_script(404, "model: nope"), "not_found", None),
        (http_error_script(400, "prompt is too long: 208845 tokens > 200000 maximum"), "context_length", None),
        (http_error_script(400, "This model does not support assistant message prefill. The conversation must "
                                "end with a user message."), "prefill_rejected", None),
        (http_error_script(400, "Your credit balance is too low to access the Anthropic API."), "quota", None),
        (http_error_script(400, "messages.0.content: Field required"), "bad_request", None),
    ],
    ids=["429", "500", "503", "529", "401", "403", "404", "400-context", "400-prefill", "400-credit", "400"],
)
async def test_http_errors(script: Script, kind: str, retry_after: float | None, fake: FakeAnthropic) -> None:
    deltas, err, fake = await run(fake, script)
    assert deltas == []
    assert err is not None and err.kind == kind and not err.mid_stream
    assert err.status == script.status
    assert err.retry_after == retry_after
    assert len(fake.requests) == 1  # the adapter never retries on its own


@pytest.mark.parametrize(("error_type", "kind"), [("overloaded_error", "overloaded"), ("api_error", "server_error"),
                                                  ("rate_limit_error", "rate_limited")])
async def test_error_event_mid_stream(error_type: str, kind: str, fake: FakeAnthropic) -> None:
    frames = text_frames()
    n = 5  # message_start, content_block_start, ping, two text deltas
    deltas, err, _ = await run(fake, stream_script(frames, error_after=n, error_type=error_type))
    assert err is not None and err.kind == kind and err.mid_stream and err.code == error_type
    sent = fixture_payloads(ANTHROPIC_FIXTURES / TEXT_FIXTURE)[:n]
    assert summarize(deltas)["text"] == "".join(p["delta"]["text"] for p in sent if p["type"] ==
                                                "content_block_delta")
    assert not any(isinstance(d, Finish) for d in deltas)


async def test_connection_reset_mid_stream(fake: FakeAnthropic) -> None:
    deltas, err, _ = await run(fake, stream_script(text_frames(), reset_after=6))
    assert err is not None and err.kind == "connection" and err.mid_stream
    sent = fixture_payloads(ANTHROPIC_FIXTURES / TEXT_FIXTURE)[:6]
    # A TCP reset discards whatever the client had not read yet, so only a prefix is certain to arrive.
    assert "".join(p["delta"]["text"] for p in sent if p["type"] == "content_block_delta").startswith(
        summarize(deltas)["text"])
    assert not any(isinstance(d, Finish) for d in deltas)


async def test_missing_message_stop_is_truncated(fake: FakeAnthropic) -> None:
    deltas, err, _ = await run(fake, stream_script(text_frames(), drop_message_stop=True))
    assert err is not None and err.kind == "truncated" and err.mid_stream
    assert summarize(deltas)["text"] == expected_from_fixture(ANTHROPIC_FIXTURES / TEXT_FIXTURE)["text"]
    assert not any(isinstance(d, Finish) for d in deltas)


async def test_malformed_chunk(fake: FakeAnthropic) -> None:
    _deltas, err, _ = await run(fake, stream_script(text_frames(), malformed_after=4))
    assert err is not None and err.kind == "malformed" and err.mid_stream


async def test_non_sse_200_is_malformed(fake: FakeAnthropic) -> None:
    _deltas, err, _ = await run(fake, Script(200, {"Content-Type": "text/html"}, [b"<html>proxy error</html>"]))
    assert err is not None and err.kind == "malformed"


async def test_stall_leaves_stream_pending_and_cancellable(fake: FakeAnthropic) -> None:
    """A silent upstream is the attempt loop's to time out: the adapter keeps waiting, yields nothing more, and
    gives its connection back when cancelled."""
    stall_at = 5
    fake.play(stream_script(text_frames(), stall_after=stall_at))
    async with httpx.AsyncClient() as http:
        provider = AnthropicProvider(deployment(fake.base_url), http)
        gen = provider.stream(simple_request())
        sent = fixture_payloads(ANTHROPIC_FIXTURES / TEXT_FIXTURE)[:stall_at]
        want = sum(1 for p in sent if p["type"] in ("message_start", "content_block_delta"))
        got = [await gen.__anext__() for _ in range(want)]
        pending = asyncio.ensure_future(gen.__anext__())
        for _ in range(50):  # the loop runs freely while the read is outstanding
            await asyncio.sleep(0)
        assert not pending.done()
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        await gen.aclose()
    assert [type(d) for d in got] == [UpstreamModel] + [TextDelta] * (want - 1)


# ---------------------------------------------------------------------------------------------------------------
# request mapping
# ---------------------------------------------------------------------------------------------------------------


async def body_for(fake: FakeAnthropic, request: GenerationRequest, **options: Any) -> dict[str, Any]:
    _deltas, err, fake = await run(fake, stream_script(text_frames()), request, **options)
    assert err is None, err
    return fake.bodies[0]


async def test_headers_and_url(fake: FakeAnthropic) -> None:
    _, _, fake = await run(fake, stream_script(text_frames()))
    req = fake.requests[0]
    assert req.method == "POST" and req.path == "/v1/messages"
    assert req.headers["x-api-key"] == "sk-ant-test"
    assert req.headers["anthropic-version"] == "2023-06-01"
    body = req.json()
    assert body["stream"] is True and body["model"] == "claude-test-model"
    assert body["max_tokens"] == 4096


async def test_system_and_sampling(fake: FakeAnthropic) -> None:
    request = simple_request(
        instructions="Be brief.",
        items=[Message("developer", [TextPart("Answer in French.")]), user("Hi"),
               Message("system", [TextPart("No emojis.")])],
        temperature=0.2, top_p=0.9, max_output_tokens=300,
    )
    body = await body_for(fake, request)
    assert body["system"] == "Be brief.\n\nAnswer in French.\n\nNo emojis."
    assert body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    assert body["temperature"] == 0.2 and body["top_p"] == 0.9 and body["max_tokens"] == 300


async def test_max_tokens_default_from_options(fake: FakeAnthropic) -> None:
    assert (await body_for(fake, simple_request(), max_tokens=1234))["max_tokens"] == 1234


TOOLS = [FunctionTool("get_weather", "Weather for a city", {"type": "object", "properties": {"city": {"type":
                                                                                                       "string"}}}),
         FunctionTool("get_time", None, None)]


@pytest.mark.parametrize(
    ("choice", "parallel", "want"),
    [
        (ToolChoice(), None, {"type": "auto"}),
        (ToolChoice("required"), None, {"type": "any"}),
        (ToolChoice(name="get_time"), None, {"type": "tool", "name": "get_time"}),
        (ToolChoice("none"), None, {"type": "none"}),
        (ToolChoice(), False, {"type": "auto", "disable_parallel_tool_use": True}),
        (ToolChoice("required"), False, {"type": "any", "disable_parallel_tool_use": True}),
    ],
)
async def test_tools_and_tool_choice(choice: ToolChoice, parallel: bool | None, want: dict[str, Any],
                                     fake: FakeAnthropic) -> None:
    body = await body_for(fake, simple_request(tools=TOOLS, tool_choice=choice, parallel_tool_calls=parallel))
    assert body["tools"] == [
        {"name": "get_weather", "description": "Weather for a city",
         "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}},
        {"name": "get_time", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert body["tool_choice"] == want


async def test_allowed_tools_filter_the_tool_list(fake: FakeAnthropic) -> None:
    body = await body_for(fake, simple_request(tools=TOOLS, tool_choice=ToolChoice("required", allowed=["get_time"])))
    assert [t["name"] for t in body["tools"]] == ["get_time"]


async def test_tool_calls_and_results_merge_into_alternating_turns(fake: FakeAnthropic) -> None:
    items = [
        user("Weather in Paris and Rome?"),
        Message("assistant", [TextPart("Checking both.")]),
        FunctionCall("toolu_1", "get_weather", '{"city": "Paris"}'),
        FunctionCall("toolu_2", "get_weather", '{"city": "Rome"}'),
        FunctionCallOutput("toolu_1", "18C"),
        FunctionCallOutput("toolu_2", "24C"),
        user("And tomorrow?"),
    ]
    body = await body_for(fake, simple_request(items=items, tools=TOOLS))
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Rome?"}]},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Checking both."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Rome"}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": "24C"},
            {"type": "text", "text": "And tomorrow?"},
        ]},
    ]


async def test_images(fake: FakeAnthropic) -> None:
    items = [Message("user", [TextPart("What is this?"), ImagePart("data:image/png;base64,iVBORw0KGgo="),
                              ImagePart("https://example.com/cat.jpg")])]
    body = await body_for(fake, simple_request(items=items))
    assert body["messages"][0]["content"] == [
        {"type": "text", "text": "What is this?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]


async def test_unsupported_image_url_is_rejected_before_sending(fake: FakeAnthropic) -> None:
    items = [Message("user", [ImagePart("ftp://example.com/cat.jpg")])]
    _deltas, err, fake = await run(fake, stream_script(text_frames()), simple_request(items=items))
    assert err is not None and err.kind == "bad_request" and fake.requests == []


async def test_json_schema_as_forced_tool_streams_text(fake: FakeAnthropic) -> None:
    """The forced tool's input comes back as message text; the tool_use stop is a plain stop to the client."""
    path = ANTHROPIC_FIXTURES / "anthropic-json-tool.2.chunks.txt"  # its tool is named "json"
    schema = {"type": "object", "properties": {"elements": {"type": "array"}}}
    request = simple_request(text_format=JsonSchemaFormat("json", schema, "Weather elements"))
    deltas, err, fake = await run(fake, stream_script(fixture_frames(path)), request)
    assert err is None
    body = fake.bodies[0]
    assert body["tools"] == [{"name": "json", "input_schema": schema, "description": "Weather elements"}]
    assert body["tool_choice"] == {"type": "tool", "name": "json"}
    want = expected_from_fixture(path)
    got = summarize(deltas)
    assert got["calls"] == []
    assert got["text"] == want["text"] + "".join(c[2] for c in want["calls"])
    assert got["finish"] == "stop" and got["raw_finish"] == "tool_use"


async def test_json_schema_with_caller_tools_requires_some_tool(fake: FakeAnthropic) -> None:
    request = simple_request(tools=TOOLS, text_format=JsonSchemaFormat("my.schema", {"type": "object"}))
    body = await body_for(fake, request)
    assert [t["name"] for t in body["tools"]] == ["get_weather", "get_time", "my_schema"]
    assert body["tool_choice"] == {"type": "any"}


async def test_json_schema_non_object_root_is_rejected(fake: FakeAnthropic) -> None:
    request = simple_request(text_format=JsonSchemaFormat("list", {"type": "array"}))
    _deltas, err, fake = await run(fake, stream_script(text_frames()), request)
    assert err is not None and err.kind == "bad_request" and fake.requests == []


async def test_json_schema_native(fake: FakeAnthropic) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    body = await body_for(fake, simple_request(text_format=JsonSchemaFormat("x", schema)), native_json_schema=True)
    assert body["output_config"] == {"format": {"type": "json_schema", "schema": schema}}
    assert "tools" not in body and "tool_choice" not in body


@pytest.mark.parametrize(
    ("seen", "deltas", "forwarded"),
    [
        ("The answer is  ", [" ", " 42."], "42."),  # the model re-emits the whitespace: not doubled
        ("The answer is ", ["42."], "42."),  # it does not: the client's whitespace stands
        ("Para one.\n\n", ["\n", "Para two."], "Para two."),  # partial re-emission across deltas
        ("Word ", ["\n\nNext"], "\n\nNext"),  # different whitespace is forwarded as is
        ("No trailing", [" more"], " more"),
    ],
)
async def test_literal_continuation(seen: str, deltas: list[str], forwarded: str, fake: FakeAnthropic) -> None:
    request = simple_request(continuation=Continuation(seen, literal=True))
    out, err, fake = await run(fake, synthetic_stream(deltas), request)
    assert err is None
    assert fake.bodies[0]["messages"][-1] == {"role": "assistant", "content": [{"type": "text",
                                                                                 "text": seen.rstrip()}]}
    assert summarize(out)["text"] == forwarded


async def test_literal_continuation_disables_thinking(fake: FakeAnthropic) -> None:
    request = simple_request(continuation=Continuation("Half", literal=True), reasoning_effort="high")
    body = await body_for(fake, request, thinking=True)
    assert "thinking" not in body
    assert body["messages"][-1]["role"] == "assistant"


async def test_continue_instruction_mode(fake: FakeAnthropic) -> None:
    request = simple_request(continuation=Continuation("The answer is ", literal=False))
    out, _err, fake = await run(fake, synthetic_stream([" 42."]), request)
    assert fake.bodies[0]["messages"][-2:] == [
        {"role": "assistant", "content": [{"type": "text", "text": "The answer is"}]},
        {"role": "user", "content": [{"type": "text", "text": CONTINUE_INSTRUCTION}]},
    ]
    assert summarize(out)["text"] == " 42."  # overlap stripping is the router's job in this mode


async def test_reasoning_round_trip_same_provider_only(fake: FakeAnthropic) -> None:
    items = [
        user("Hi"),
        Reasoning(text="Let me think.", signature="sig-1", provider="anthropic"),
        Reasoning(encrypted_content="REDACTED==", provider="anthropic"),
        Reasoning(text="foreign", encrypted_content="gAAAA", provider="openai_responses"),
        Reasoning(text="bedrock", signature="sig-b", provider="bedrock"),
        Reasoning(text="unsigned", provider="anthropic"),
        Message("assistant", [TextPart("Hello!")]),
        user("Again"),
    ]
    body = await body_for(fake, simple_request(items=items))
    assert body["messages"][1] == {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "Let me think.", "signature": "sig-1"},
        {"type": "redacted_thinking", "data": "REDACTED=="},
        {"type": "text", "text": "Hello!"},
    ]}


async def test_thinking_from_reasoning_effort(fake: FakeAnthropic) -> None:
    body = await body_for(fake, simple_request(reasoning_effort="low", temperature=0.3), thinking=True)
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    assert body["max_tokens"] == 4096 + 2048
    assert "temperature" not in body
    # Not enabled for the deployment: no thinking.
    assert "thinking" not in await body_for(fake, simple_request(reasoning_effort="low"))
    # A caller's max_output_tokens bounds the budget; too small a room drops thinking.
    body = await body_for(fake, simple_request(reasoning_effort="high", max_output_tokens=2000), thinking=True)
    assert body["thinking"]["budget_tokens"] == 1999 and body["max_tokens"] == 2000
    body = await body_for(fake, simple_request(reasoning_effort="high", max_output_tokens=900), thinking=True)
    assert "thinking" not in body and body["max_tokens"] == 900


def test_capabilities() -> None:
    http = httpx.AsyncClient()
    assert AnthropicProvider(deployment("http://x"), http).capabilities.literal_continuation is True
    caps = AnthropicProvider(deployment("http://x", literal_continuation=False), http).capabilities
    assert caps.literal_continuation is False and caps.native_json_schema is False


async def test_malformed_frame_constant_is_not_json() -> None:
    # Guard for the fault injector itself: the frame must really be broken JSON.
    data = MALFORMED_FRAME.decode().split("data: ", 1)[1].strip()
    with pytest.raises(ValueError):
        json.loads(data)


async def test_thinking_dropped_when_last_tool_turn_is_unsigned(fake: FakeAnthropic) -> None:
    """History from another provider: the tool-calling turn has no thinking block, which Claude would 400 on."""
    loop = [user("t?"), FunctionCall("c1", "get_time", "{}"), FunctionCallOutput("c1", "noon")]
    body = await body_for(fake, simple_request(items=loop, tools=TOOLS, reasoning_effort="low"), thinking=True)
    assert "thinking" not in body
    signed = [user("t?"), Reasoning(text="hm", signature="sig", provider="anthropic"), *loop[1:]]
    body = await body_for(fake, simple_request(items=signed, tools=TOOLS, reasoning_effort="low"), thinking=True)
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    assert body["messages"][1]["content"][0]["type"] == "thinking"


async def test_literal_prefill_turn_carries_no_thinking(fake: FakeAnthropic) -> None:
    """The cut answer's own signed thinking (a completed item) cannot ride along with a prefill."""
    items = [user("Hi"), Reasoning(text="hm", signature="sig", provider="anthropic")]
    body = await body_for(fake, simple_request(items=items, continuation=Continuation("Half way", literal=True)))
    assert body["messages"][-1] == {"role": "assistant", "content": [{"type": "text", "text": "Half way"}]}


async def test_dropped_fields_are_logged_by_name_not_value(fake: FakeAnthropic,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    secret = "SECRET-PROMPT-TEXT"
    request = simple_request(items=[Message("user", [TextPart(secret), ImagePart("https://x/y.png", detail="high")])],
                             tools=[FunctionTool("f", secret, {"type": "object"}, strict=True)],
                             reasoning_effort="high", temperature=0.5)
    with caplog.at_level("WARNING", logger="unbroken.providers"):
        await body_for(fake, request, thinking=True)
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "tools[].strict" in logged and "input_image.detail" in logged and "temperature" in logged
    assert secret not in logged and "sk-ant-test" not in logged
