"""BedrockProvider (boto3 ConverseStream in a worker thread) against a real HTTP fake speaking AWS event-stream.

Expected values are read from the fixture files here: `.chunks.txt` lines directly, cassette bodies through
botocore's own event-stream decoder — never through the adapter.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from botocore.eventstream import EventStreamBuffer

from tests.fakes.bedrock import (
    BEDROCK_FIXTURES,
    EVENTSTREAM,
    FakeBedrock,
    cassette_interactions,
    cassette_script,
    event_frame,
    fixture_frames,
    http_error_script,
    rechunked,
    stream_script,
)
from tests.fakes.upstream import Script
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
    Usage,
)
from unbroken.providers.base import ProviderError
from unbroken.providers.bedrock import QUEUE_DEPTH, BedrockProvider

# providers.md §9, written out independently of the adapter's table.
FINISH = {"end_turn": "stop", "stop_sequence": "stop", "tool_use": "tool_calls", "max_tokens": "length",
          "model_context_window_exceeded": "length", "content_filtered": "content_filter",
          "guardrail_intervened": "content_filter"}

TEXT_FIXTURE = "amazon-bedrock-text.chunks.txt"


def _cases() -> list[tuple[str, int]]:
    cases: list[tuple[str, int]] = []
    for path in sorted(BEDROCK_FIXTURES.iterdir()):
        if path.name.endswith(".chunks.txt"):
            cases.append((path.name, 0))
        elif path.suffix == ".yaml":
            cases += [(path.name, i) for i in range(len(cassette_interactions(path)))]
    return cases


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


def fixture_events(path: Path, interaction: int = 0) -> list[tuple[str, dict[str, Any]]]:
    """(event type, JSON payload) of a fixture, decoded independently of the adapter."""
    if path.name.endswith(".chunks.txt"):
        lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [next(iter(d.items())) for d in lines]
    body = cassette_interactions(path)[interaction]["response"]["body"]["string"]
    buf = EventStreamBuffer()
    buf.add_data(body)
    return [(m.headers[":event-type"], json.loads(m.payload)) for m in buf]


def expected_from_fixture(path: Path, interaction: int = 0) -> dict[str, Any]:
    text, reasoning = "", ""
    calls: dict[int, list[str]] = {}
    signatures: list[str] = []
    redacted: list[str] = []
    stop = None
    usage: dict[str, int] = {}
    for etype, p in fixture_events(path, interaction):
        if etype == "contentBlockStart" and "toolUse" in p["start"]:
            calls[p["contentBlockIndex"]] = [p["start"]["toolUse"]["toolUseId"], p["start"]["toolUse"]["name"], ""]
        elif etype == "contentBlockDelta":
            d = p["delta"]
            if "text" in d:
                text += d["text"]
            elif "toolUse" in d:
                calls[p["contentBlockIndex"]][2] += d["toolUse"]["input"]
            elif "reasoningContent" in d:
                rc = d["reasoningContent"]
                reasoning += rc.get("text", "")
                if "signature" in rc:
                    signatures.append(rc["signature"])
                if "redactedContent" in rc:
                    redacted.append(rc["redactedContent"])  # base64 text, as on the wire
        elif etype == "messageStop":
            stop = p["stopReason"]
        elif etype == "metadata":
            usage = p["usage"]
    cached = usage.get("cacheReadInputTokens", 0)
    return {
        "text": text, "calls": [tuple(c) for c in calls.values()], "reasoning": reasoning,
        "signatures": signatures, "redacted": redacted, "finish": FINISH[stop], "raw_finish": stop,
        "usage": (usage["inputTokens"] + cached + usage.get("cacheWriteInputTokens", 0), usage["outputTokens"],
                  cached),
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
    }


def deployment(base_url: str, *, api_key: str | None = None, **options: Any) -> Deployment:
    return Deployment(name="bedrock-test", provider="bedrock", model="us.anthropic.claude-test-v1:0",
                      base_url=base_url, region="us-east-1", api_key=api_key,
                      options={"aws_access_key_id": "AKIDTEST", "aws_secret_access_key": "secret", **options})


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
def fake() -> Iterator[FakeBedrock]:
    with FakeBedrock() as server:
        yield server


async def run(fake: FakeBedrock, script: Script, request: GenerationRequest | None = None, *,
              api_key: str | None = None, **options: Any) -> tuple[list[Delta], ProviderError | None]:
    fake.play(script)
    provider = BedrockProvider(deployment(fake.base_url, api_key=api_key, **options), httpx.AsyncClient())
    return await collect(provider.stream(request or simple_request()))


def text_frames() -> list[bytes]:
    return fixture_frames(BEDROCK_FIXTURES / TEXT_FIXTURE)


def text_before(n: int) -> str:
    events = fixture_events(BEDROCK_FIXTURES / TEXT_FIXTURE)[:n]
    return "".join(p["delta"].get("text", "") for e, p in events if e == "contentBlockDelta")


def synthetic(texts: list[str], stop: str = "end_turn") -> Script:
    frames = [event_frame("messageStart", {"role": "assistant"}),
              *[event_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": t}}) for t in texts],
              event_frame("contentBlockStop", {"contentBlockIndex": 0}),
              event_frame("messageStop", {"stopReason": stop}),
              event_frame("metadata", {"usage": {"inputTokens": 5, "outputTokens": 7, "totalTokens": 12},
                                       "metrics": {"latencyMs": 1}})]
    return stream_script(frames)


# ---------------------------------------------------------------------------------------------------------------
# every recorded stream
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "interaction"), _cases())
async def test_fixture_replay(name: str, interaction: int, fake: FakeBedrock) -> None:
    path = BEDROCK_FIXTURES / name
    if path.suffix == ".yaml":
        response = cassette_interactions(path)[interaction]["response"]
        script = cassette_script(path, interaction)
        if response["status"]["code"] != 200:
            # test_bedrock_streaming_error: a real pre-stream 400 for an invalid model id (no x-amzn-ErrorType).
            deltas, err = await run(fake, script)
            assert deltas == [] and err is not None and not err.mid_stream
            assert err.status == response["status"]["code"]
            assert err.message == response["parsed_body"]["message"]
            assert err.kind == "not_found"  # the model id is this deployment's problem: fail over
            return
    else:
        script = stream_script(fixture_frames(path))
    deltas, err = await run(fake, script)
    assert err is None, err
    assert summarize(deltas) == expected_from_fixture(path, interaction)
    assert isinstance(deltas[-1], Finish)


async def test_body_rechunked_across_frame_boundaries(fake: FakeBedrock) -> None:
    path = BEDROCK_FIXTURES / "amazon-bedrock-reasoning.chunks.txt"
    script = Script(200, {"Content-Type": EVENTSTREAM}, rechunked(fixture_frames(path), 7))
    deltas, err = await run(fake, script)
    assert err is None
    assert summarize(deltas) == expected_from_fixture(path)


# ---------------------------------------------------------------------------------------------------------------
# faults
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "kind", "retry_after"),
    [
        (http_error_script(429), "rate_limited", None),
        (http_error_script(429, headers={"retry-after": "3"}), "rate_limited", 3.0),
        (http_error_script(500, "Internal error"), "server_error", None),
        (http_error_script(503, "Service unavailable"), "overloaded", None),
        (http_error_script(429, "Model not ready", "ModelNotReadyException"), "overloaded", None),
        (http_error_script(400, "Input is too long for requested model."), "context_length", None),
        (http_error_script(400, "This model does not support assistant message prefill. The conversation must "
                                "end with a user message."), "prefill_rejected", None),
        (http_error_script(400, "messages.0: field required"), "bad_request", None),
        (http_error_script(403, "You don't have access to the model"), "auth", None),
        (http_error_script(404, "Model not found"), "not_found", None),
        (http_error_script(408, "Model timed out", "ModelTimeoutException"), "timeout", None),
        (http_error_script(424, "Model error", "ModelErrorException"), "server_error", None),
    ],
    ids=["429", "429-retry-after", "500", "503", "model-not-ready", "400-context", "400-prefill", "400", "403",
         "404", "408", "424"],
)
async def test_http_errors(script: Script, kind: str, retry_after: float | None, fake: FakeBedrock) -> None:
    deltas, err = await run(fake, script)
    assert deltas == []
    assert err is not None and err.kind == kind and not err.mid_stream
    assert err.status == script.status and err.retry_after == retry_after
    assert len(fake.requests) == 1  # botocore does not retry behind the router's back


@pytest.mark.parametrize(
    ("exception_type", "kind"),
    [("throttlingException", "rate_limited"), ("modelStreamErrorException", "server_error"),
     ("internalServerException", "server_error"), ("serviceUnavailableException", "overloaded"),
     ("validationException", "bad_request")],
)
async def test_exception_frame_mid_stream(exception_type: str, kind: str, fake: FakeBedrock) -> None:
    n = 4  # messageStart + 3 text deltas
    deltas, err = await run(fake, stream_script(text_frames(), exception_after=n, exception_type=exception_type))
    assert err is not None and err.kind == kind and err.mid_stream and err.code == exception_type
    assert summarize(deltas)["text"] == text_before(n)
    assert not any(isinstance(d, Finish) for d in deltas)


async def test_connection_reset_mid_stream(fake: FakeBedrock) -> None:
    deltas, err = await run(fake, stream_script(text_frames(), reset_after=5))
    assert err is not None and err.kind == "connection" and err.mid_stream
    # A TCP reset discards whatever the client had not read yet, so only a prefix is certain to arrive.
    assert text_before(5).startswith(summarize(deltas)["text"])
    assert not any(isinstance(d, Finish) for d in deltas)


@pytest.mark.parametrize("after_stop", ["exception", "clean_end"])
async def test_failure_after_message_stop_keeps_the_answer(after_stop: str, fake: FakeBedrock) -> None:
    """messageStop came, the metadata frame did not: the answer is whole, only the usage is missing."""
    frames = text_frames()
    stop_at = next(i for i, (e, _) in enumerate(fixture_events(BEDROCK_FIXTURES / TEXT_FIXTURE))
                   if e == "messageStop")
    script = (stream_script(frames, exception_after=stop_at + 1) if after_stop == "exception"
              else stream_script(frames[:stop_at + 1]))
    deltas, err = await run(fake, script)
    assert err is None
    got = summarize(deltas)
    assert got["text"] == expected_from_fixture(BEDROCK_FIXTURES / TEXT_FIXTURE)["text"]
    assert got["finish"] == "stop" and got["usage"] is None
    assert isinstance(deltas[-1], Finish)


async def test_stall_hits_read_timeout(fake: FakeBedrock) -> None:
    deltas, err = await run(fake, stream_script(text_frames(), stall_after=3), read_timeout=1)
    assert err is not None and err.kind == "timeout" and err.mid_stream
    assert summarize(deltas)["text"] == text_before(3)


async def test_corrupt_frame_is_malformed(fake: FakeBedrock) -> None:
    deltas, err = await run(fake, stream_script(text_frames(), malformed_after=3))
    assert err is not None and err.kind == "malformed" and err.mid_stream
    assert summarize(deltas)["text"] == text_before(3)


async def test_payload_that_is_not_json_is_malformed(fake: FakeBedrock) -> None:
    frames = [*text_frames()[:3], event_frame("contentBlockDelta", b'{"contentBlockIndex":0,"delta":{"te')]
    _deltas, err = await run(fake, stream_script(frames))
    assert err is not None and err.kind == "malformed"


async def test_missing_message_stop_is_truncated(fake: FakeBedrock) -> None:
    deltas, err = await run(fake, stream_script(text_frames(), drop_message_stop=True))
    assert err is not None and err.kind == "truncated" and err.mid_stream
    assert summarize(deltas)["text"] == expected_from_fixture(BEDROCK_FIXTURES / TEXT_FIXTURE)["text"]


async def test_malformed_stop_reason_is_a_failure(fake: FakeBedrock) -> None:
    _deltas, err = await run(fake, synthetic(["{\"a\":"], stop="malformed_tool_use"))
    assert err is not None and err.kind == "server_error" and err.code == "malformed_tool_use"


@pytest.mark.parametrize(("stop", "reason"), [("max_tokens", "length"), ("content_filtered", "content_filter"),
                                              ("guardrail_intervened", "content_filter"),
                                              ("model_context_window_exceeded", "length"),
                                              ("stop_sequence", "stop")])
async def test_stop_reasons(stop: str, reason: str, fake: FakeBedrock) -> None:
    deltas, err = await run(fake, synthetic(["x"], stop=stop))
    assert err is None and summarize(deltas)["finish"] == reason and summarize(deltas)["usage"] == (5, 7, 0)


async def test_cache_tokens_count_as_input(fake: FakeBedrock) -> None:
    frames = [event_frame("messageStart", {"role": "assistant"}),
              event_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "hi"}}),
              event_frame("messageStop", {"stopReason": "end_turn"}),
              event_frame("metadata", {"usage": {"inputTokens": 10, "outputTokens": 2, "cacheReadInputTokens": 100,
                                                 "cacheWriteInputTokens": 50, "totalTokens": 162}})]
    deltas, _err = await run(fake, stream_script(frames))
    assert summarize(deltas)["usage"] == (160, 2, 100)


# ---------------------------------------------------------------------------------------------------------------
# the worker thread
# ---------------------------------------------------------------------------------------------------------------


async def test_event_loop_stays_responsive_while_the_stream_blocks(fake: FakeBedrock) -> None:
    """The fake stops sending after 4 frames and holds the connection: the worker thread is blocked in a socket
    read. Another coroutine still gets every one of its ticks, and cancelling the read ends the thread."""
    fake.play(stream_script(text_frames(), stall_after=4))
    provider = BedrockProvider(deployment(fake.base_url), httpx.AsyncClient())
    gen = provider.stream(simple_request())
    got = [await gen.__anext__() for _ in range(3)]
    assert "".join(d.text for d in got if isinstance(d, TextDelta)) == text_before(4)
    pending = asyncio.ensure_future(gen.__anext__())

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        for _ in range(200):
            await asyncio.sleep(0)
            ticks += 1

    await ticker()
    assert ticks == 200 and not pending.done()
    (worker,) = list(provider.workers)
    assert worker.is_alive()

    pending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending
    await gen.aclose()
    worker.join(timeout=10)  # bounded; the shutdown makes it return at once
    assert not worker.is_alive()


async def test_abandoned_stream_stops_the_worker(fake: FakeBedrock) -> None:
    """A consumer that stops after one delta: the thread (blocked on the full hand-off queue) ends."""
    many = [f"tok{i} " for i in range(QUEUE_DEPTH * 3)]
    fake.play(synthetic(many))
    provider = BedrockProvider(deployment(fake.base_url), httpx.AsyncClient())
    gen = provider.stream(simple_request())
    first = await gen.__anext__()
    assert first == TextDelta("tok0 ")
    await gen.aclose()
    (worker,) = list(provider.workers)
    worker.join(timeout=10)
    assert not worker.is_alive()


async def test_abandoned_stalled_stream_stops_the_worker(fake: FakeBedrock) -> None:
    fake.play(stream_script(text_frames(), stall_after=3))
    provider = BedrockProvider(deployment(fake.base_url), httpx.AsyncClient())
    gen = provider.stream(simple_request())
    await gen.__anext__()
    await gen.aclose()
    (worker,) = list(provider.workers)
    worker.join(timeout=10)
    assert not worker.is_alive()


# ---------------------------------------------------------------------------------------------------------------
# request mapping
# ---------------------------------------------------------------------------------------------------------------


async def body_for(fake: FakeBedrock, request: GenerationRequest, **options: Any) -> dict[str, Any]:
    _, err = await run(fake, stream_script(text_frames()), request, **options)
    assert err is None, err
    return fake.bodies[0]


async def test_path_auth_and_basic_body(fake: FakeBedrock) -> None:
    body = await body_for(fake, simple_request(instructions="Be brief.", temperature=0.1, top_p=0.5,
                                               max_output_tokens=77,
                                               items=[Message("developer", [TextPart("French.")]), user("Hi")]))
    req = fake.requests[0]
    assert req.method == "POST"
    assert unquote(req.path) == "/model/us.anthropic.claude-test-v1:0/converse-stream"
    assert req.headers["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDTEST/")
    assert body == {
        "messages": [{"role": "user", "content": [{"text": "Hi"}]}],
        "system": [{"text": "Be brief."}, {"text": "French."}],
        "inferenceConfig": {"maxTokens": 77, "temperature": 0.1, "topP": 0.5},
    }


async def test_bedrock_api_key_is_sent_as_bearer(fake: FakeBedrock) -> None:
    _, err = await run(fake, stream_script(text_frames()), api_key="bedrock-api-key-123")
    assert err is None
    assert fake.requests[0].headers["authorization"] == "Bearer bedrock-api-key-123"


async def test_history_matches_recorded_converse_request(fake: FakeBedrock) -> None:
    """The 2nd request of a real recorded tool loop, rebuilt from IR, equals what pydantic-ai sent (we leave out
    the optional toolResult status)."""
    recorded = json.loads(cassette_interactions(BEDROCK_FIXTURES / "test_bedrock_model_iter_stream.yaml")[1]
                          ["request"]["body"])
    rec_msgs = recorded["messages"]
    tool_use = rec_msgs[1]["content"][1]["toolUse"]
    result = rec_msgs[2]["content"][0]["toolResult"]
    request = GenerationRequest(
        model="nova",
        instructions=recorded["system"][0]["text"],
        items=[
            user(rec_msgs[0]["content"][0]["text"]),
            Message("assistant", [TextPart(rec_msgs[1]["content"][0]["text"])]),
            FunctionCall(tool_use["toolUseId"], tool_use["name"], json.dumps(tool_use["input"])),
            FunctionCallOutput(result["toolUseId"], result["content"][0]["text"]),
        ],
        tools=[FunctionTool(t["toolSpec"]["name"], t["toolSpec"]["description"], t["toolSpec"]["inputSchema"]["json"])
               for t in recorded["toolConfig"]["tools"]],
        top_p=recorded["inferenceConfig"]["topP"],
    )
    body = await body_for(fake, request)
    del rec_msgs[2]["content"][0]["toolResult"]["status"]
    assert body == recorded


@pytest.mark.parametrize(
    ("choice", "want"),
    [(ToolChoice(), None), (ToolChoice("required"), {"any": {}}),
     (ToolChoice(name="get_time"), {"tool": {"name": "get_time"}})],
)
async def test_tool_choice(choice: ToolChoice, want: dict[str, Any] | None, fake: FakeBedrock) -> None:
    tools = [FunctionTool("get_time", "Time", {"type": "object", "properties": {}}), FunctionTool("noop")]
    body = await body_for(fake, simple_request(tools=tools, tool_choice=choice))
    assert body["toolConfig"]["tools"] == [
        {"toolSpec": {"name": "get_time", "description": "Time", "inputSchema": {"json": {"type": "object",
                                                                                          "properties": {}}}}},
        {"toolSpec": {"name": "noop", "inputSchema": {"json": {"type": "object", "properties": {}}}}},
    ]
    assert body["toolConfig"].get("toolChoice") == want


async def test_tool_choice_none(fake: FakeBedrock) -> None:
    tools = [FunctionTool("get_time")]
    body = await body_for(fake, simple_request(tools=tools, tool_choice=ToolChoice("none")))
    assert "toolConfig" not in body
    # With tool blocks in the history Converse needs the toolConfig anyway: tools stay, choice is auto.
    items = [user("t?"), FunctionCall("c1", "get_time", "{}"), FunctionCallOutput("c1", "noon")]
    body = await body_for(fake, simple_request(items=items, tools=tools, tool_choice=ToolChoice("none")))
    assert [t["toolSpec"]["name"] for t in body["toolConfig"]["tools"]] == ["get_time"]
    assert "toolChoice" not in body["toolConfig"]


async def test_tool_history_without_tools_gets_stub_specs(fake: FakeBedrock) -> None:
    items = [user("t?"), FunctionCall("c1", "get_time", "{}"), FunctionCallOutput("c1", "noon"), user("ok")]
    body = await body_for(fake, simple_request(items=items))
    assert body["toolConfig"] == {"tools": [{"toolSpec": {"name": "get_time", "inputSchema": {
        "json": {"type": "object", "properties": {}}}}}]}
    assert body["messages"][-1] == {"role": "user", "content": [
        {"toolResult": {"toolUseId": "c1", "content": [{"text": "noon"}]}}, {"text": "ok"}]}


async def test_images(fake: FakeBedrock) -> None:
    raw = b"\x89PNG\r\n\x1a\nfake"
    url = "data:image/png;base64," + base64.b64encode(raw).decode()
    body = await body_for(fake, simple_request(items=[Message("user", [TextPart("What?"), ImagePart(url)])]))
    assert body["messages"][0]["content"] == [
        {"text": "What?"}, {"image": {"format": "png", "source": {"bytes": base64.b64encode(raw).decode()}}}]


@pytest.mark.parametrize("url", ["https://example.com/cat.png", "data:image/tiff;base64,AAAA"])
async def test_images_bedrock_cannot_take(url: str, fake: FakeBedrock) -> None:
    _deltas, err = await run(fake, stream_script(text_frames()),
                            simple_request(items=[Message("user", [ImagePart(url)])]))
    assert err is not None and err.kind == "bad_request" and fake.requests == []
    if url.startswith("https"):
        assert "data URL" in err.message


async def test_json_schema_as_forced_tool(fake: FakeBedrock) -> None:
    path = BEDROCK_FIXTURES / "amazon-bedrock-tool-call.1.chunks.txt"  # its tool is named "test-tool"
    schema = {"type": "object", "properties": {"value": {"type": "string"}}}
    fake.play(stream_script(fixture_frames(path)))
    provider = BedrockProvider(deployment(fake.base_url), httpx.AsyncClient())
    deltas, err = await collect(provider.stream(simple_request(text_format=JsonSchemaFormat("test-tool", schema))))
    assert err is None
    assert fake.bodies[0]["toolConfig"] == {
        "tools": [{"toolSpec": {"name": "test-tool", "description": "Respond with this JSON document.",
                                "inputSchema": {"json": schema}}}],
        "toolChoice": {"tool": {"name": "test-tool"}},
    }
    want = expected_from_fixture(path)
    got = summarize(deltas)
    assert got["calls"] == [] and got["text"] == want["calls"][0][2]
    assert got["finish"] == "stop" and got["raw_finish"] == "tool_use"


async def test_json_schema_native(fake: FakeBedrock) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    body = await body_for(fake, simple_request(text_format=JsonSchemaFormat("answer", schema, "An answer")),
                          native_json_schema=True)
    assert body["outputConfig"] == {"textFormat": {"type": "json_schema", "structure": {"jsonSchema": {
        "schema": json.dumps(schema), "name": "answer", "description": "An answer"}}}}
    assert "toolConfig" not in body


@pytest.mark.parametrize(
    ("seen", "deltas", "forwarded"),
    [("The answer is  ", [" ", " 42."], "42."), ("The answer is ", ["42."], "42."),
     ("Para.\n\n", ["\n", "Next."], "Next."), ("Word ", ["\n\nNext"], "\n\nNext")],
)
async def test_literal_continuation(seen: str, deltas: list[str], forwarded: str, fake: FakeBedrock) -> None:
    out, err = await run(fake, synthetic(deltas), simple_request(continuation=Continuation(seen, literal=True)))
    assert err is None
    assert fake.bodies[0]["messages"][-1] == {"role": "assistant", "content": [{"text": seen.rstrip()}]}
    assert summarize(out)["text"] == forwarded


async def test_continue_instruction_mode(fake: FakeBedrock) -> None:
    out, _err = await run(fake, synthetic([" 42."]),
                         simple_request(continuation=Continuation("The answer is ", literal=False)))
    assert fake.bodies[0]["messages"][-2:] == [
        {"role": "assistant", "content": [{"text": "The answer is"}]},
        {"role": "user", "content": [{"text": CONTINUE_INSTRUCTION}]},
    ]
    assert summarize(out)["text"] == " 42."


async def test_reasoning_round_trip_same_provider_only(fake: FakeBedrock) -> None:
    redacted = base64.b64encode(b"opaque-redacted-bytes").decode()
    items = [
        user("Hi"),
        Reasoning(text="Thinking.", signature="sig-b", provider="bedrock"),
        Reasoning(encrypted_content=redacted, provider="bedrock"),
        Reasoning(text="anthropic's", signature="sig-a", provider="anthropic"),
        Reasoning(encrypted_content="gAAAA", provider="openai_responses"),
        Message("assistant", [TextPart("Hello!")]),
        user("Again"),
    ]
    body = await body_for(fake, simple_request(items=items))
    assert body["messages"][1] == {"role": "assistant", "content": [
        {"reasoningContent": {"reasoningText": {"text": "Thinking.", "signature": "sig-b"}}},
        {"reasoningContent": {"redactedContent": redacted}},
        {"text": "Hello!"},
    ]}


async def test_thinking(fake: FakeBedrock) -> None:
    body = await body_for(fake, simple_request(reasoning_effort="medium", temperature=0.5), thinking=True,
                          additional_model_request_fields={"top_k": 5})
    assert body["additionalModelRequestFields"] == {"top_k": 5, "thinking": {"type": "enabled",
                                                                             "budget_tokens": 8192}}
    assert body["inferenceConfig"] == {"maxTokens": 4096 + 8192}
    body = await body_for(fake, simple_request(reasoning_effort="medium"))
    assert "additionalModelRequestFields" not in body
    body = await body_for(fake, simple_request(reasoning_effort="high", tools=[FunctionTool("f")],
                                               tool_choice=ToolChoice("required")), thinking=True)
    assert "additionalModelRequestFields" not in body  # forced tool use and thinking do not mix


def test_capabilities() -> None:
    http = httpx.AsyncClient()
    caps = BedrockProvider(deployment("http://x"), http).capabilities
    assert caps.literal_continuation is False and caps.image_urls is False
    assert BedrockProvider(deployment("http://x", literal_continuation=True), http).capabilities \
        .literal_continuation is True


def test_boto3_is_imported_lazily() -> None:
    """Importing the adapter must not import boto3 (cold start); checked in a fresh interpreter."""
    import subprocess
    import sys

    code = "import sys, unbroken.providers.bedrock; print('boto3' in sys.modules, 'botocore' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["False", "False"]


async def test_thinking_dropped_when_last_tool_turn_is_unsigned(fake: FakeBedrock) -> None:
    loop = [user("t?"), FunctionCall("c1", "f", "{}"), FunctionCallOutput("c1", "noon")]
    tools = [FunctionTool("f")]
    body = await body_for(fake, simple_request(items=loop, tools=tools, reasoning_effort="low"), thinking=True)
    assert "additionalModelRequestFields" not in body
    signed = [user("t?"), Reasoning(text="hm", signature="sig", provider="bedrock"), *loop[1:]]
    body = await body_for(fake, simple_request(items=signed, tools=tools, reasoning_effort="low"), thinking=True)
    assert body["additionalModelRequestFields"] == {"thinking": {"type": "enabled", "budget_tokens": 2048}}


async def test_literal_prefill_turn_carries_no_reasoning(fake: FakeBedrock) -> None:
    items = [user("Hi"), Reasoning(text="hm", signature="sig", provider="bedrock")]
    body = await body_for(fake, simple_request(items=items, continuation=Continuation("Half way", literal=True)))
    assert body["messages"][-1] == {"role": "assistant", "content": [{"text": "Half way"}]}
