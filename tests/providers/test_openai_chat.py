"""The OpenAI Chat Completions adapter (`openai`, and `openai_compatible` for vLLM, Ollama, Groq, OpenRouter,
DeepSeek...) against a real HTTP fake replaying every recorded chat stream, every fault kind, and the request mapping
(read back from what the fake received).

Recordings: `openai_chat/*.bin` are raw SSE bodies (with `data: [DONE]`), `.chunks.txt` one data payload per line
(the fake adds the framing and `[DONE]`), `.yaml` VCR cassettes whose bodies are replayed as recorded (OpenRouter's
`: OPENROUTER PROCESSING` comment lines included).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakes.openai_responses import openai_error_body
from tests.fakes.sse_replay import (
    ScriptedFake,
    cassette_bodies,
    data_frame,
    data_lines,
    frame_payloads,
    json_error,
    malformed_after,
    recordings,
    split_sse,
    stream,
)
from tests.fakes.upstream import Script
from tests.providers.sse_support import (
    expected_chat,
    make_provider,
    run,
    simple_request,
    stall_then_reset,
    usage_dict,
)
from tests.support.paths import FIXTURES
from unbroken.ir import (
    CONTINUE_INSTRUCTION,
    Continuation,
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
    Usage,
)
from unbroken.providers.base import Provider
from unbroken.providers.openai_chat import OpenAIChatProvider, OpenAICompatibleProvider

# fixture folder -> the provider that speaks it
FOLDERS = {"openai_chat": "openai", "openai_compatible": "openai_compatible"}
DONE = data_frame("[DONE]")
PNG = "data:image/png;base64,iVBORw0KGgo="

TEXT = "openai-text.chunks.txt"  # gpt-4.1-nano, plain text, usage chunk
PARALLEL_TOOLS = "f82268f2fefd5cfbc7eeb59c297688be2f6ca0849a6e4f17851b517310841d9b.bin"
OPENROUTER_ERROR = "test_openrouter_stream_error.yaml"


# -- the recordings and the fake ----------------------------------------------------------------------------------


def streams_of(path: Path) -> list[list[bytes]]:
    if path.suffix == ".bin":
        return [split_sse(path.read_text(encoding="utf-8"))]
    if path.name.endswith(".chunks.txt"):
        return [[data_frame(line) for line in data_lines(path)] + [DONE]]
    return [split_sse(body) for body in cassette_bodies(path)]


def chat_recordings() -> dict[str, tuple[str, list[bytes]]]:
    """name (`file` or `file#i`) -> (provider, SSE frames)."""
    out: dict[str, tuple[str, list[bytes]]] = {}
    for folder, provider_name in FOLDERS.items():
        for name, frames in recordings(FIXTURES / folder, streams_of,
                                       suffixes=(".chunks.txt", ".yaml", ".bin")).items():
            out[name] = (provider_name, frames)
    return out


RECORDINGS = chat_recordings()


def frames(name: str) -> list[bytes]:
    return RECORDINGS[name][1]


def chunk_of(frame: bytes) -> dict[str, Any] | None:
    payloads = frame_payloads([frame])
    if not payloads or payloads[0] == "[DONE]":
        return None
    return json.loads(payloads[0])


def has_finish(frame: bytes) -> bool:
    chunk = chunk_of(frame)
    return chunk is not None and any(c.get("finish_reason") for c in chunk.get("choices") or [])


def with_finish_reason(frames_: list[bytes], reason: str) -> list[bytes]:
    out = []
    for frame in frames_:
        chunk = chunk_of(frame)
        if chunk is not None and has_finish(frame):
            for choice in chunk["choices"]:
                if choice.get("finish_reason"):
                    choice["finish_reason"] = reason
            frame = data_frame(chunk)
        out.append(frame)
    return out


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> bytes:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return data_frame({"id": "chatcmpl-x", "object": "chat.completion.chunk", "model": "m", "choices": choices,
                       **extra})


class ChatFake(ScriptedFake):
    """`with ChatFake() as fake: fake.serve(fake.replay(TEXT))`; serves any path (the tests check it)."""

    @staticmethod
    def replay(name: str) -> Script:
        return stream(frames(name))

    @staticmethod
    def http_error(status: int, code: str = "server_error", message: str = "upstream failure", *,
                   headers: dict[str, str] | None = None) -> Script:
        return json_error(status, openai_error_body(code, message), headers)

    @staticmethod
    def error_after(name: str, n: int, error: Any, *, done: bool = False) -> Script:
        """n frames of a recording, then an in-band `data: {"error": ...}` (OpenAI: the socket closes; vLLM:
        `[DONE]` follows)."""
        return stream([*frames(name)[:n], data_frame({"error": error}), *([DONE] if done else [])])

    @staticmethod
    def without_finish(name: str) -> Script:
        """Every chunk that carries a finish_reason left out; `[DONE]` still comes."""
        return stream([f for f in frames(name) if not has_finish(f)])

    @staticmethod
    def cut_before_finish(name: str) -> Script:
        """The stream ends cleanly (no reset) just before the finish chunk: no finish_reason, no `[DONE]`."""
        fs = frames(name)
        return stream(fs[:next(i for i, f in enumerate(fs) if has_finish(f))])

    @staticmethod
    def without_done(name: str) -> Script:
        return stream([f for f in frames(name) if f != DONE and frame_payloads([f]) != ["[DONE]"]])


@pytest.fixture(scope="module")
def server() -> Iterator[ChatFake]:
    with ChatFake() as f:
        yield f


@pytest.fixture
def fake(server: ChatFake) -> ChatFake:
    server.reset()
    return server


def provider(http: httpx.AsyncClient, fake: ChatFake, name: str = "openai", model: str = "gpt-4.1",
             **options: Any) -> Provider:
    return make_provider(http, name, model, fake.base_url + "/v1", **options)


# -- every recorded stream ----------------------------------------------------------------------------------------


def test_every_fixture_file_is_replayed() -> None:
    on_disk = {p.name for folder in FOLDERS for p in (FIXTURES / folder).iterdir()}
    assert on_disk == {name.split("#")[0] for name in RECORDINGS}
    assert sum(n.startswith("test_run_stream_sync_streams_real_model") for n in RECORDINGS) == 2
    assert {p for p, _ in RECORDINGS.values()} == set(FOLDERS.values())


@pytest.mark.parametrize("name", sorted(RECORDINGS))
async def test_recorded_stream(name: str, http: httpx.AsyncClient, fake: ChatFake) -> None:
    provider_name, recorded = RECORDINGS[name]
    fake.serve(fake.replay(name))
    p = provider(http, fake, provider_name)
    assert isinstance(p, OpenAICompatibleProvider if provider_name == "openai_compatible" else OpenAIChatProvider)
    got = await run(p, simple_request())
    want = expected_chat(recorded)
    assert got.text == want.text
    assert got.refusal == want.refusal
    assert got.reasoning == want.reasoning and got.summary == "" and got.seals == []
    assert got.models[:1] == [want.model]
    assert len(got.models) == 1
    if want.error_code is not None:
        # OpenRouter's in-band error rides in a normal chunk (after chunks that already said `length`).
        assert got.error is not None and got.error.mid_stream
        assert got.finish is None
        return
    assert got.error is None, got.error
    assert got.text or got.refusal or got.calls  # the recording holds something
    assert got.calls == want.calls
    for _, _, args in got.calls:
        json.loads(args)  # complete JSON documents
    assert got.finish == want.finish
    assert usage_dict(got.usage) == want.usage
    assert got.usage_count == (1 if want.usage else 0)
    # Usage (when there is one) then Finish close the stream.
    assert [d.kind for d in got.deltas[-2:]][-1] == "finish"
    if want.usage:
        assert got.deltas[-2].kind == "usage"


async def test_recorded_openrouter_error_is_context_length(http: httpx.AsyncClient, fake: ChatFake) -> None:
    """`{"error": {"code": 400, "message": "Token limit reached"}}` inside a chunk: the reasoning before it was
    forwarded, the error is a mid-stream context_length failure."""
    fake.serve(fake.replay(OPENROUTER_ERROR))
    got = await run(provider(http, fake, "openai_compatible"), simple_request())
    assert got.error is not None
    assert (got.error.kind, got.error.status, got.error.code, got.error.mid_stream) == \
        ("context_length", 400, "400", True)
    assert got.reasoning == expected_chat(frames(OPENROUTER_ERROR)).reasoning != ""


async def test_parallel_tool_calls_keep_their_index(http: httpx.AsyncClient, fake: ChatFake) -> None:
    fake.serve(fake.replay(PARALLEL_TOOLS))
    got = await run(provider(http, fake), simple_request())
    starts = [d for d in got.deltas if d.kind == "tool_start"]
    assert [d.index for d in starts] == [0, 1]  # type: ignore[union-attr]
    assert [c[0] for c in got.calls] == [c[0] for c in expected_chat(frames(PARALLEL_TOOLS)).calls]
    assert got.finish == "tool_calls"


async def test_continuation_chunk_does_not_rename_the_call(http: httpx.AsyncClient, fake: ChatFake) -> None:
    """A compatible server re-sends `type` and `name: ""` with the arguments: the first name stands."""
    fake.serve(fake.replay("mistral-incremental-tool-call.chunks.txt"))
    got = await run(provider(http, fake, "openai_compatible"), simple_request())
    assert [(n, json.loads(a)) for _, n, a in got.calls] == [("webSearchTool", {"query": "current Berlin weather"})]
    assert got.usage == Usage(input_tokens=171, output_tokens=14, cached_input_tokens=128)


async def test_groq_usage_inside_x_groq(http: httpx.AsyncClient, fake: ChatFake) -> None:
    fake.serve(fake.replay("groq-tool-call.chunks.txt"))
    got = await run(provider(http, fake, "openai_compatible"), simple_request())
    assert got.usage is not None and got.usage.input_tokens == 210
    assert [json.loads(a) for _, _, a in got.calls] == [{}]  # the whole arguments in one chunk


# -- the stream, synthetic ----------------------------------------------------------------------------------------


async def test_usage_with_cached_and_reasoning_tokens(http: httpx.AsyncClient, fake: ChatFake) -> None:
    usage = {"prompt_tokens": 1200, "completion_tokens": 300, "total_tokens": 1500,
             "prompt_tokens_details": {"cached_tokens": 1024}, "completion_tokens_details": {"reasoning_tokens": 256}}
    fake.serve(stream([chunk({"role": "assistant", "content": "Hi"}), chunk({}, "stop"),
                       chunk(None, usage=usage), chunk(None, usage={**usage, "prompt_tokens": 1}), DONE]))
    got = await run(provider(http, fake), simple_request())
    assert got.usage == Usage(input_tokens=1200, output_tokens=300, cached_input_tokens=1024, reasoning_tokens=256)
    assert got.usage_count == 1  # a repeated usage chunk is not counted twice
    assert [d.kind for d in got.deltas[-2:]] == ["usage", "finish"]


async def test_other_choices_are_ignored(http: httpx.AsyncClient, fake: ChatFake) -> None:
    other = data_frame({"id": "x", "model": "m", "choices": [{"index": 1, "delta": {"content": "OTHER"},
                                                              "finish_reason": "length"}]})
    fake.serve(stream([chunk({"content": "mine"}), other, chunk({}, "stop"), DONE]))
    got = await run(provider(http, fake), simple_request())
    assert (got.text, got.finish) == ("mine", "stop")


async def test_tool_call_without_id_gets_one(http: httpx.AsyncClient, fake: ChatFake) -> None:
    fake.serve(stream([chunk({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "{}"}}]}),
                       chunk({}, "tool_calls"), DONE]))
    got = await run(provider(http, fake, "openai_compatible"), simple_request())
    assert got.calls == [("call_0", "f", "{}")] and got.finish == "tool_calls"


@pytest.mark.parametrize(("reason", "finish"), [("stop", "stop"), ("length", "length"), ("tool_calls", "tool_calls"),
                                                ("function_call", "tool_calls"), ("content_filter", "content_filter"),
                                                ("something_new", "stop")])
async def test_finish_reasons(reason: str, finish: str, http: httpx.AsyncClient, fake: ChatFake) -> None:
    fake.serve(stream(with_finish_reason(frames(TEXT), reason)))
    got = await run(provider(http, fake), simple_request())
    assert got.error is None and got.finish == finish
    assert got.text == expected_chat(frames(TEXT)).text


async def test_finish_reason_error_is_a_failure(http: httpx.AsyncClient, fake: ChatFake) -> None:
    fake.serve(stream(with_finish_reason(frames(TEXT), "error")))
    got = await run(provider(http, fake, "openai_compatible"), simple_request())
    assert got.error is not None and (got.error.kind, got.error.mid_stream) == ("server_error", True)
    assert got.finish is None


async def test_missing_done_after_finish_is_tolerated(http: httpx.AsyncClient, fake: ChatFake) -> None:
    fake.serve(fake.without_done(TEXT))
    got = await run(provider(http, fake), simple_request())
    want = expected_chat(frames(TEXT))
    assert got.error is None and (got.text, got.finish, usage_dict(got.usage)) == (want.text, want.finish, want.usage)


# -- errors -------------------------------------------------------------------------------------------------------


async def test_429_with_retry_after(http: httpx.AsyncClient, fake: ChatFake) -> None:
    fake.serve(fake.http_error(429, "rate_limit_exceeded", "Rate limit reached", headers={"retry-after": "12"}))
    got = await run(provider(http, fake), simple_request())
    assert got.error is not None
    assert (got.error.kind, got.error.status, got.error.retry_after, got.error.mid_stream) == \
        ("rate_limited", 429, 12.0, False)
    assert got.deltas == []
    assert len(fake.requests) == 1  # the adapter never retries on its own


async def test_429_retry_after_ms_wins(http: httpx.AsyncClient, fake: ChatFake) -> None:
    fake.serve(fake.http_error(429, "rate_limit_exceeded", headers={"retry-after": "12", "retry-after-ms": "250"}))
    got = await run(provider(http, fake), simple_request())
    assert got.error is not None and got.error.retry_after == 0.25


@pytest.mark.parametrize(("status", "code", "message", "kind"), [
    (500, "server_error", "The server had an error", "server_error"),
    (502, "bad_gateway", "Bad gateway", "server_error"),
    (503, "server_error", "The engine is currently overloaded", "overloaded"),
    (504, "timeout", "Gateway timeout", "timeout"),
    (401, "invalid_api_key", "Incorrect API key provided", "auth"),
    (403, "unsupported_country_region_territory", "Country not supported", "auth"),
    (404, "model_not_found", "The model does not exist", "not_found"),
    (402, "payment_required", "Insufficient credits", "quota"),  # OpenRouter
    (429, "insufficient_quota", "You exceeded your current quota", "quota"),
    (400, "context_length_exceeded", "This model's maximum context length is 128000 tokens.", "context_length"),
    (400, "invalid_request_error", "This model's maximum context length is 8192 tokens. However, your messages "
                                   "resulted in 9000 tokens.", "context_length"),
    (400, "string_above_max_length", "Invalid 'messages[0].content': string too long.", "context_length"),
    (400, "content_filter", "The response was filtered", "content_filter"),
    (400, "content_policy_violation", "Your request was rejected by the safety system", "content_filter"),
    (400, "invalid_request_error", "Assistant response prefill is incompatible with enable_thinking.",
     "prefill_rejected"),  # llama.cpp
    (400, "invalid_request_error", "Unrecognized request argument supplied: foo", "bad_request"),
    (413, "request_too_large", "Request too large", "context_length"),
])
async def test_http_errors(status: int, code: str, message: str, kind: str, http: httpx.AsyncClient,
                           fake: ChatFake) -> None:
    fake.serve(fake.http_error(status, code, message))
    got = await run(provider(http, fake), simple_request())
    assert got.error is not None
    assert (got.error.kind, got.error.status, got.error.mid_stream) == (kind, status, False)
    assert got.error.message == message
    assert got.deltas == []


async def test_error_body_that_is_not_json(http: httpx.AsyncClient, fake: ChatFake) -> None:
    fake.serve(Script(502, {"content-type": "text/html"}, [b"<html>Bad Gateway</html>"]))
    got = await run(provider(http, fake), simple_request())
    assert got.error is not None and (got.error.kind, got.error.status) == ("server_error", 502)


@pytest.mark.parametrize(("error", "done", "kind", "status", "code"), [
    # OpenAI (the real capture): no choices, no [DONE]
    ({"message": "The server had an error while processing your request. Sorry about that!",
      "type": "server_error"}, False, "server_error", None, "server_error"),
    ({"message": "Rate limit reached", "type": "rate_limit_exceeded"}, False, "rate_limited", None,
     "rate_limit_exceeded"),
    ({"message": "Overloaded", "type": "overloaded_error"}, False, "overloaded", None, "overloaded_error"),
    # vLLM: the HTTP status as `code`, then [DONE]
    ({"message": "max_tokens is too large", "type": "BadRequestError", "param": None, "code": 400}, True,
     "bad_request", 400, "400"),
    ({"message": "This model's maximum context length is 4096 tokens", "type": "BadRequestError", "code": 400},
     True, "context_length", 400, "400"),
    ({"message": "Internal error", "type": "InternalServerError", "code": 500}, True, "server_error", 500, "500"),
    ({"message": "Too many requests", "code": 429}, True, "rate_limited", 429, "429"),
    ({"message": "Service unavailable", "code": 503}, True, "overloaded", 503, "503"),
    # Ollama: a bare string
    ("model not found", True, "server_error", None, None),
])
async def test_in_band_error_chunk(error: Any, done: bool, kind: str, status: int | None, code: str | None,
                                   http: httpx.AsyncClient, fake: ChatFake) -> None:
    n = 5
    fake.serve(fake.error_after(TEXT, n, error, done=done))
    got = await run(provider(http, fake, "openai_compatible"), simple_request())
    assert got.error is not None
    assert (got.error.kind, got.error.status, got.error.code, got.error.mid_stream) == (kind, status, code, True)
    assert got.text == expected_chat(frames(TEXT)[:n]).text != ""
    assert got.finish is None and got.usage is None


@pytest.mark.parametrize("name", sorted(n for n in RECORDINGS if n != OPENROUTER_ERROR))
async def test_no_finish_reason_is_truncated(name: str, http: httpx.AsyncClient, fake: ChatFake) -> None:
    """`[DONE]` without a finish reason: the stream did not complete."""
    fake.serve(fake.without_finish(name))
    got = await run(provider(http, fake, RECORDINGS[name][0]), simple_request())
    assert got.error is not None and (got.error.kind, got.error.mid_stream) == ("truncated", True)
    assert got.finish is None


async def test_stream_that_just_ends_is_truncated(http: httpx.AsyncClient, fake: ChatFake) -> None:
    fake.serve(fake.cut_before_finish(TEXT))
    got = await run(provider(http, fake), simple_request())
    assert got.error is not None and (got.error.kind, got.error.mid_stream) == ("truncated", True)
    assert got.text == expected_chat(frames(TEXT)).text  # every content delta came before the finish chunk


async def test_connection_reset_mid_stream(http: httpx.AsyncClient, fake: ChatFake) -> None:
    fake.serve(stream(frames(TEXT), reset_after=len(frames(TEXT)) // 2))
    got = await run(provider(http, fake), simple_request())
    assert got.error is not None and (got.error.kind, got.error.mid_stream) == ("connection", True)
    # A reset discards what the client had not read yet: only a prefix is certain to arrive.
    assert expected_chat(frames(TEXT)).text.startswith(got.text)
    assert got.finish is None


async def test_malformed_chunk(http: httpx.AsyncClient, fake: ChatFake) -> None:
    fake.serve(malformed_after(frames(TEXT), 3))
    got = await run(provider(http, fake), simple_request())
    assert got.error is not None and (got.error.kind, got.error.mid_stream) == ("malformed", True)
    assert got.text == expected_chat(frames(TEXT)[:3]).text


async def test_chunk_that_is_not_an_object_is_malformed(http: httpx.AsyncClient, fake: ChatFake) -> None:
    fake.serve(stream([*frames(TEXT)[:3], data_frame("[1, 2]")]))
    got = await run(provider(http, fake), simple_request())
    assert got.error is not None and (got.error.kind, got.error.mid_stream) == ("malformed", True)


async def test_not_sse_is_malformed(http: httpx.AsyncClient, fake: ChatFake) -> None:
    fake.serve(Script(200, {"content-type": "application/json"}, [b'{"choices": []}']))
    got = await run(provider(http, fake), simple_request())
    assert got.error is not None and got.error.kind == "malformed"


async def test_stall_then_reset(http: httpx.AsyncClient) -> None:
    n = 6
    with ChatFake() as fake:  # its own server: the test closes it
        fake.serve(stream(frames(TEXT), stall_after=n))
        got = await stall_then_reset(provider(http, fake), fake, expected_chat(frames(TEXT)[:n]).text)
    assert got.text != ""


# -- request mapping ----------------------------------------------------------------------------------------------


async def body_for(http: httpx.AsyncClient, fake: ChatFake, request: GenerationRequest, name: str = "openai",
                   **options: Any) -> dict[str, Any]:
    fake.serve(fake.replay(TEXT))
    got = await run(provider(http, fake, name, **options), request)
    assert got.error is None, got.error
    return fake.requests[0].json()


SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


async def test_request_mapping(http: httpx.AsyncClient, fake: ChatFake) -> None:
    request = GenerationRequest(
        model="public",
        instructions="Be brief.",
        items=[
            Message("developer", [TextPart("Use metric units.")]),
            Message("user", [TextPart("Weather in Paris and Rome?"), ImagePart(PNG, detail="low"),
                             ImagePart("https://example.com/a.jpg")]),
            Message("assistant", [TextPart("Let me check.")]),
            Reasoning(text="thinking", signature="sig", provider="anthropic"),  # Chat cannot carry reasoning back
            FunctionCall("call_1", "get_weather", '{"city":"Paris"}'),
            FunctionCall("call_2", "get_weather", '{"city":"Rome"}'),
            FunctionCallOutput("call_1", '{"temp":21}'),
            FunctionCallOutput("call_2", '{"temp":25}'),
        ],
        tools=[FunctionTool("get_weather", "Weather for a city", SCHEMA, strict=True), FunctionTool("noop")],
        tool_choice=ToolChoice("auto"),
        parallel_tool_calls=False,
        max_output_tokens=321,
        temperature=0.2,
        top_p=0.9,
        text_format=JsonSchemaFormat("answer", SCHEMA, description="The answer", strict=True),
        reasoning_effort="low",
    )
    body = await body_for(http, fake, request)
    [req] = fake.requests
    assert req.method == "POST" and req.path == "/v1/chat/completions"
    assert req.headers["authorization"] == "Bearer test-key"
    assert req.headers["content-type"] == "application/json"
    assert body == {
        "model": "gpt-4.1",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "system", "content": "Use metric units."},
            {"role": "user", "content": [
                {"type": "text", "text": "Weather in Paris and Rome?"},
                {"type": "image_url", "image_url": {"url": PNG, "detail": "low"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg", "detail": "auto"}}]},
            {"role": "assistant", "content": "Let me check."},
            # Parallel calls of one turn share one assistant message.
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                  "arguments": '{"city":"Paris"}'}},
                {"id": "call_2", "type": "function", "function": {"name": "get_weather",
                                                                  "arguments": '{"city":"Rome"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp":21}'},
            {"role": "tool", "tool_call_id": "call_2", "content": '{"temp":25}'},
        ],
        "tools": [
            {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                              "parameters": SCHEMA, "strict": True}},
            {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}}},
        ],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "max_completion_tokens": 321,
        "temperature": 0.2,
        "top_p": 0.9,
        "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA,
                                                                   "strict": True, "description": "The answer"}},
        "reasoning_effort": "low",
    }


async def test_minimal_body(http: httpx.AsyncClient, fake: ChatFake) -> None:
    body = await body_for(http, fake, simple_request())
    assert body == {"model": "gpt-4.1", "stream": True, "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": "Hello"}]}


@pytest.mark.parametrize(("choice", "wire", "offered"), [
    (ToolChoice("auto"), "auto", ["a", "b"]),
    (ToolChoice("none"), "none", ["a", "b"]),
    (ToolChoice("required"), "required", ["a", "b"]),
    (ToolChoice("auto", name="b"), {"type": "function", "function": {"name": "b"}}, ["a", "b"]),
    (ToolChoice("required", allowed=["a"]), "required", ["a"]),  # allowed_tools: the list itself is cut
])
async def test_tool_choice(choice: ToolChoice, wire: object, offered: list[str], http: httpx.AsyncClient,
                           fake: ChatFake) -> None:
    body = await body_for(http, fake, simple_request(tools=[FunctionTool("a"), FunctionTool("b")],
                                                     tool_choice=choice))
    assert body["tool_choice"] == wire
    assert [t["function"]["name"] for t in body["tools"]] == offered
    assert "parallel_tool_calls" not in body


async def test_no_tools_no_tool_fields(http: httpx.AsyncClient, fake: ChatFake) -> None:
    body = await body_for(http, fake, simple_request(tool_choice=ToolChoice("required"), parallel_tool_calls=True))
    assert not {"tools", "tool_choice", "parallel_tool_calls"} & set(body)


async def test_json_schema_without_strict_or_description(http: httpx.AsyncClient, fake: ChatFake) -> None:
    body = await body_for(http, fake, simple_request(text_format=JsonSchemaFormat("doc", {"type": "array"})))
    assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "doc",
                                                                              "schema": {"type": "array"}}}


@pytest.mark.parametrize(("options", "key", "value"), [
    ({}, "reasoning_effort", "high"),
    ({"reasoning_effort": False}, "reasoning_effort", None),  # servers that reject the field
    ({"max_tokens_field": "max_tokens"}, "max_tokens", 99),  # servers that do not know max_completion_tokens
    ({}, "max_completion_tokens", 99),
    ({"extra_body": {"top_k": 20, "chat_template_kwargs": {"enable_thinking": False}}}, "top_k", 20),
])
async def test_dialect_options(options: dict[str, Any], key: str, value: Any, http: httpx.AsyncClient,
                               fake: ChatFake) -> None:
    body = await body_for(http, fake, simple_request(reasoning_effort="high", max_output_tokens=99),
                          "openai_compatible", **options)
    assert body.get(key) == value
    if "max_tokens_field" in options:
        assert "max_completion_tokens" not in body


async def test_system_role_developer(http: httpx.AsyncClient, fake: ChatFake) -> None:
    request = simple_request(instructions="Be brief.")
    request.items.insert(0, Message("developer", [TextPart("Metric units.")]))
    body = await body_for(http, fake, request, system_role="developer")
    assert body["messages"][:2] == [{"role": "developer", "content": "Be brief."},
                                    {"role": "developer", "content": "Metric units."}]


async def test_https_image_rejected_when_disabled(http: httpx.AsyncClient, fake: ChatFake) -> None:
    fake.serve(fake.replay(TEXT))
    request = GenerationRequest(model="m", items=[Message("user", [ImagePart("https://example.com/a.png")])])
    got = await run(provider(http, fake, "openai_compatible", image_urls=False), request)
    assert got.error is not None and got.error.kind == "bad_request" and "data URL" in got.error.message
    assert fake.requests == []
    # Data URLs still go through.
    body = await body_for(http, fake, GenerationRequest(model="m", items=[Message("user", [ImagePart(PNG)])]),
                          "openai_compatible", image_urls=False)
    assert body["messages"][0]["content"] == [{"type": "image_url", "image_url": {"url": PNG, "detail": "auto"}}]


async def test_no_api_key_no_authorization(http: httpx.AsyncClient, fake: ChatFake) -> None:
    fake.serve(fake.replay(TEXT))
    p = make_provider(http, "openai_compatible", "llama3", fake.base_url + "/v1", api_key=None)
    got = await run(p, simple_request())
    assert got.error is None and "authorization" not in fake.requests[0].headers


async def test_default_base_url() -> None:
    async with httpx.AsyncClient() as client:
        p = make_provider(client, "openai", "gpt-4.1", None)
        assert p.url() == "https://api.openai.com/v1/chat/completions"  # type: ignore[attr-defined]
        p = make_provider(client, "openai_compatible", "llama3", "http://localhost:11434/v1/")
        assert p.url() == "http://localhost:11434/v1/chat/completions"  # type: ignore[attr-defined]


# -- continuation -------------------------------------------------------------------------------------------------

VLLM = {"continue_final_message": True, "add_generation_prompt": False}


@pytest.mark.parametrize("name", ["openai", "openai_compatible"])
async def test_continuation_is_an_instruction_by_default(name: str, http: httpx.AsyncClient, fake: ChatFake) -> None:
    fake.serve(fake.replay(TEXT))
    dialect = {"prefix_flag": True} if name == "openai_compatible" else {}
    p = provider(http, fake, name, continuation_body=VLLM, **dialect)
    assert p.capabilities.literal_continuation is False
    await run(p, simple_request("Tell a story", continuation=Continuation("Once upon a ", literal=False)))
    body = fake.requests[0].json()
    # OpenAI restarts rather than continues a trailing assistant message: the text is sent as is, then the ask.
    assert body["messages"][-2:] == [{"role": "assistant", "content": "Once upon a "},
                                     {"role": "user", "content": CONTINUE_INSTRUCTION}]
    assert not set(VLLM) & set(body)  # the literal-only body flags stay out


async def test_vllm_continue_final_message(http: httpx.AsyncClient, fake: ChatFake) -> None:
    fake.serve(fake.replay(TEXT))
    p = provider(http, fake, "openai_compatible", literal_continuation=True, continuation_body=VLLM)
    assert p.capabilities.literal_continuation is True
    await run(p, simple_request("Tell a story", continuation=Continuation("Once upon a", literal=True)))
    body = fake.requests[0].json()
    assert body["messages"][-1] == {"role": "assistant", "content": "Once upon a"}
    assert body["messages"][-2]["role"] == "user"
    assert {k: body[k] for k in VLLM} == VLLM


async def test_deepseek_prefix_flag(http: httpx.AsyncClient, fake: ChatFake) -> None:
    fake.serve(fake.replay(TEXT))
    p = provider(http, fake, "openai_compatible", literal_continuation=True, prefix_flag=True)
    await run(p, simple_request("Tell a story", continuation=Continuation("Once upon a", literal=True)))
    assert fake.requests[0].json()["messages"][-1] == {"role": "assistant", "content": "Once upon a", "prefix": True}


async def test_prefix_flag_is_a_compatible_dialect_only(http: httpx.AsyncClient, fake: ChatFake) -> None:
    # `openai` has no such option: the config refuses it rather than ignoring it.
    with pytest.raises(ValueError, match=r"options\.prefix_flag"):
        provider(http, fake, "openai", literal_continuation=True, prefix_flag=True)
    fake.serve(fake.replay(TEXT))
    p = provider(http, fake, "openai", literal_continuation=True)
    await run(p, simple_request("Tell a story", continuation=Continuation("Once upon a", literal=True)))
    assert fake.requests[0].json()["messages"][-1] == {"role": "assistant", "content": "Once upon a"}
