"""The Gemini adapter against a real HTTP fake replaying every recorded Gemini stream, every fault kind, and the
request mapping (read back from what the fake received)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fakes.gemini import GEMINI_FIXTURES, GeminiFake, gemini_recordings
from tests.fakes.sse_replay import data_frame, frame_payloads, stream
from tests.providers.sse_support import Expected, fold, make_provider, run, simple_request, usage_dict
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
from unbroken.providers.base import Provider, ProviderError

RECORDINGS = gemini_recordings()
MODEL = "gemini-3-pro-preview"
PNG_B64 = "iVBORw0KGgo="


@pytest.fixture(scope="module")
def server() -> Iterator[GeminiFake]:
    with GeminiFake() as f:
        yield f


@pytest.fixture
def fake(server: GeminiFake) -> GeminiFake:
    server.reset()
    return server


def provider(http: httpx.AsyncClient, fake: GeminiFake, model: str = MODEL, **options: Any) -> Provider:
    return make_provider(http, "gemini", model, fake.base_url, **options)


# -- expected values, read straight from the recording -----------------------------------------------------------

_FILTER = {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY", "LANGUAGE"}


def expected_gemini(frames: list[bytes]) -> tuple[Expected, list[tuple[str, dict[str, Any]]]]:
    """(expected summary, [(call name, call arguments)]). Streamed Vertex arguments are rebuilt from their
    `$.key` paths (the only form in the recordings)."""
    e = Expected()
    calls: list[tuple[str, dict[str, Any]]] = []
    raw_finish = None
    for payload in frame_payloads(frames):
        chunk = json.loads(payload)
        if "error" in chunk:
            e.error_code = chunk["error"].get("status")
            break
        if e.model is None and chunk.get("modelVersion"):
            e.model = chunk["modelVersion"]
        meta = chunk.get("usageMetadata") or {}
        if "promptTokenCount" in meta:
            thoughts = meta.get("thoughtsTokenCount", 0)
            e.usage = {"input": meta["promptTokenCount"], "output": meta.get("candidatesTokenCount", 0) + thoughts,
                       "cached": meta.get("cachedContentTokenCount", 0), "reasoning": thoughts}
        for cand in (chunk.get("candidates") or [])[:1]:
            for part in (cand.get("content") or {}).get("parts") or []:
                if part.get("thoughtSignature"):
                    e.seals.append(part["thoughtSignature"])
                fc = part.get("functionCall")
                if fc is not None:
                    if fc.get("name"):
                        calls.append((fc["name"], dict(fc.get("args") or {})))
                    for piece in fc.get("partialArgs") or []:
                        key = piece["jsonPath"].removeprefix("$.")
                        args = calls[-1][1]
                        if "stringValue" in piece:
                            args[key] = args.get(key, "") + piece["stringValue"]
                        else:
                            args[key] = piece.get("numberValue", piece.get("boolValue"))
                elif part.get("thought"):
                    e.summary += part.get("text", "")
                else:
                    e.text += part.get("text", "")
            raw_finish = cand.get("finishReason") or raw_finish
    if raw_finish == "STOP":
        e.finish = "tool_calls" if calls else "stop"
    elif raw_finish == "MAX_TOKENS":
        e.finish = "length"
    elif raw_finish in _FILTER:
        e.finish = "content_filter"
    return e, calls


def test_every_fixture_file_is_covered() -> None:
    streams = {p.name for p in GEMINI_FIXTURES.iterdir() if p.name.endswith((".chunks.txt", ".yaml"))}
    assert streams == {name.split("#")[0] for name in RECORDINGS}
    others = {p.name for p in GEMINI_FIXTURES.iterdir()} - streams
    assert others == {"google-429-retry-info.json"}  # replayed by test_429_retry_info_from_the_recorded_body


@pytest.mark.parametrize("name", sorted(RECORDINGS))
async def test_recorded_stream(name: str, http: httpx.AsyncClient, fake: GeminiFake) -> None:
    fake.serve(fake.replay(name))
    got = await run(provider(http, fake), simple_request())
    want, calls = expected_gemini(RECORDINGS[name])
    assert got.error is None, got.error
    assert got.text == want.text
    assert got.summary == want.summary and got.reasoning == ""
    assert got.seals == want.seals and got.seal_providers <= {"gemini"}
    assert [(n, json.loads(a)) for _, n, a in got.calls] == calls
    ids = [cid for cid, _, _ in got.calls]
    assert all(ids) and len(set(ids)) == len(ids)
    assert got.finish == want.finish
    assert usage_dict(got.usage) == want.usage and got.usage_count == 1
    assert got.models[:1] == ([want.model] if want.model else [])
    # Usage and Finish close the stream.
    assert [d.kind for d in got.deltas[-2:]] == ["usage", "finish"]


async def test_signature_precedes_its_function_call(http: httpx.AsyncClient, fake: GeminiFake) -> None:
    fake.serve(fake.replay("google-tool-call.chunks.txt"))
    got = await run(provider(http, fake), simple_request())
    kinds = [d.kind for d in got.deltas if d.kind in ("reasoning_seal", "tool_start")]
    assert kinds == ["reasoning_seal", "tool_start"]


async def test_streamed_arguments_arrive_in_pieces(http: httpx.AsyncClient, fake: GeminiFake) -> None:
    fake.serve(fake.replay("google-stream-tool-call-arguments.chunks.txt"))
    got = await run(provider(http, fake), simple_request())
    pieces = [d for d in got.deltas if d.kind == "tool_delta" and d.index == 0]  # type: ignore[union-attr]
    assert len(pieces) > 1
    assert [json.loads(a) for _, _, a in got.calls] == [{"location": "Boston"}, {"location": "San Francisco"}]


# -- finish reasons ----------------------------------------------------------------------------------------------


def _chunk(text: str | None = None, finish: str | None = None, **extra: Any) -> bytes:
    cand: dict[str, Any] = {"content": {"role": "model", "parts": [{"text": text}] if text is not None else []}}
    if finish:
        cand["finishReason"] = finish
    return data_frame({"candidates": [cand], "modelVersion": "gemini-test", **extra})


@pytest.mark.parametrize(("raw", "finish"), [
    ("STOP", "stop"), ("MAX_TOKENS", "length"), ("SAFETY", "content_filter"), ("RECITATION", "content_filter"),
    ("BLOCKLIST", "content_filter"), ("PROHIBITED_CONTENT", "content_filter"), ("SPII", "content_filter"),
    ("IMAGE_SAFETY", "content_filter"), ("LANGUAGE", "content_filter"),
])
async def test_finish_reasons(raw: str, finish: str, http: httpx.AsyncClient, fake: GeminiFake) -> None:
    fake.serve(stream([_chunk("Hi"), _chunk("", raw)]))
    got = await run(provider(http, fake), simple_request())
    assert (got.text, got.finish, got.error) == ("Hi", finish, None)


async def test_malformed_function_call_fails(http: httpx.AsyncClient, fake: GeminiFake) -> None:
    fake.serve(stream([_chunk("Hi"), _chunk(None, "MALFORMED_FUNCTION_CALL")]))
    got = await run(provider(http, fake), simple_request())
    assert got.error is not None and (got.error.kind, got.error.mid_stream) == ("server_error", True)
    assert got.finish is None


async def test_prompt_blocked(http: httpx.AsyncClient, fake: GeminiFake) -> None:
    fake.serve(stream([data_frame({"promptFeedback": {"blockReason": "SAFETY"},
                                   "usageMetadata": {"promptTokenCount": 7, "totalTokenCount": 7}})]))
    got = await run(provider(http, fake), simple_request())
    assert (got.text, got.finish, got.error) == ("", "content_filter", None)
    assert got.usage is not None and got.usage.input_tokens == 7


async def test_connection_drop_after_finish_still_finishes(http: httpx.AsyncClient, fake: GeminiFake) -> None:
    frames = RECORDINGS["google-text.chunks.txt"]
    fake.serve(stream(frames, reset_after=len(frames)))
    got = await run(provider(http, fake), simple_request())
    assert got.error is None and got.finish == "stop"
    assert got.text == expected_gemini(frames)[0].text


# -- faults -------------------------------------------------------------------------------------------------------

TEXT = "test_google_stream_usage_is_live_mid_stream.yaml"


def text_of_first(name: str, n: int) -> str:
    return expected_gemini(RECORDINGS[name][:n])[0].text


async def test_429_retry_info_from_the_recorded_body(http: httpx.AsyncClient, fake: GeminiFake) -> None:
    fake.serve(fake.retry_info_429())
    got = await run(provider(http, fake), simple_request())
    body = json.loads((GEMINI_FIXTURES / "google-429-retry-info.json").read_text())
    delay = next(d["retryDelay"] for d in body["error"]["details"] if d["@type"].endswith("RetryInfo"))
    assert got.error is not None
    assert (got.error.kind, got.error.status, got.error.mid_stream) == ("rate_limited", 429, False)
    assert got.error.retry_after == pytest.approx(float(delay.rstrip("s")))
    assert got.error.code == body["error"]["status"]


async def test_429_retry_after_header_when_no_retry_info(http: httpx.AsyncClient, fake: GeminiFake) -> None:
    fake.serve(fake.http_error(429, "quota", headers={"retry-after": "3"}))
    got = await run(provider(http, fake), simple_request())
    assert got.error is not None and (got.error.kind, got.error.retry_after) == ("rate_limited", 3.0)


@pytest.mark.parametrize(("code", "message", "kind"), [
    (500, "Internal error encountered.", "server_error"),
    (503, "The model is overloaded.", "overloaded"),
    (504, "Deadline exceeded.", "timeout"),
    (400, "The input token count (1200000) exceeds the maximum number of tokens allowed (1048576).",
     "context_length"),
    (400, "Invalid JSON payload received.", "bad_request"),
    (403, "Permission denied.", "auth"),
    (404, "models/nope is not found.", "not_found"),
])
async def test_http_errors(code: int, message: str, kind: str, http: httpx.AsyncClient, fake: GeminiFake) -> None:
    fake.serve(fake.http_error(code, message))
    got = await run(provider(http, fake), simple_request())
    assert got.error is not None and (got.error.kind, got.error.status) == (kind, code)
    assert got.deltas == []


@pytest.mark.parametrize(("code", "status", "kind"), [
    (503, "UNAVAILABLE", "overloaded"),
    (429, "RESOURCE_EXHAUSTED", "rate_limited"),
    (500, "INTERNAL", "server_error"),
])
async def test_in_band_error(code: int, status: str, kind: str, http: httpx.AsyncClient, fake: GeminiFake) -> None:
    fake.serve(fake.in_band_error(TEXT, 2, code, status))
    got = await run(provider(http, fake), simple_request())
    assert got.error is not None
    assert (got.error.kind, got.error.code, got.error.mid_stream) == (kind, status, True)
    assert got.text == text_of_first(TEXT, 2) != ""
    assert got.finish is None


async def test_connection_reset_mid_stream(http: httpx.AsyncClient, fake: GeminiFake) -> None:
    fake.serve(fake.reset_after(TEXT, 2))
    got = await run(provider(http, fake), simple_request())
    assert got.error is not None and (got.error.kind, got.error.mid_stream) == ("connection", True)
    assert got.text == text_of_first(TEXT, 2) and got.finish is None


async def test_stall_then_reset(http: httpx.AsyncClient) -> None:
    """A stalled upstream yields what it sent and nothing more; when it drops the connection the adapter raises a
    mid-stream connection error (stall timeouts belong to the attempt loop)."""
    want = text_of_first(TEXT, 1)
    seen: list[Delta] = []
    got_all = asyncio.Event()
    with GeminiFake() as fake:
        fake.serve(fake.stall_after(TEXT, 1))

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
    assert fold(seen).finish is None


async def test_malformed_chunk(http: httpx.AsyncClient, fake: GeminiFake) -> None:
    fake.serve(fake.malformed_after(TEXT, 1))
    got = await run(provider(http, fake), simple_request())
    assert got.error is not None and (got.error.kind, got.error.mid_stream) == ("malformed", True)


@pytest.mark.parametrize("name", [TEXT, "google-tool-call.chunks.txt"])
async def test_missing_finish_reason_is_truncated(name: str, http: httpx.AsyncClient, fake: GeminiFake) -> None:
    fake.serve(fake.missing_terminator(name))
    got = await run(provider(http, fake), simple_request())
    assert got.error is not None and (got.error.kind, got.error.mid_stream) == ("truncated", True)
    assert got.text == expected_gemini(RECORDINGS[name])[0].text and got.finish is None


# -- request mapping ----------------------------------------------------------------------------------------------


def _ok(fake: GeminiFake) -> None:
    fake.serve(fake.replay("google-text.chunks.txt"))


async def _sent(http: httpx.AsyncClient, fake: GeminiFake, request: GenerationRequest, model: str = MODEL,
                **options: Any) -> dict[str, Any]:
    _ok(fake)
    got = await run(provider(http, fake, model, **options), request)
    assert got.error is None, got.error
    return fake.requests[-1].json()


async def test_url_and_auth(http: httpx.AsyncClient, fake: GeminiFake) -> None:
    await _sent(http, fake, simple_request())
    req = fake.requests[0]
    assert req.path == f"/v1beta/models/{MODEL}:streamGenerateContent?alt=sse"
    assert req.headers["x-goog-api-key"] == "test-key" and "authorization" not in req.headers


async def test_vertex_url_and_bearer(http: httpx.AsyncClient, fake: GeminiFake) -> None:
    _ok(fake)
    dep_base = fake.base_url + "/v1/projects/p/locations/global/publishers/google"
    p = make_provider(http, "gemini", MODEL, dep_base, vertex=True)
    await run(p, simple_request())
    req = fake.requests[0]
    assert req.path == f"/v1/projects/p/locations/global/publishers/google/models/{MODEL}:streamGenerateContent" \
                       "?alt=sse"
    assert req.headers["authorization"] == "Bearer test-key" and "x-goog-api-key" not in req.headers


async def test_request_mapping(http: httpx.AsyncClient, fake: GeminiFake) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}
    request = GenerationRequest(
        model="public",
        instructions="Be brief.",
        items=[
            Message("system", [TextPart("Use metric units.")]),
            Message("user", [TextPart("Weather here and in Rome?"),
                             ImagePart(f"data:image/png;base64,{PNG_B64}")]),
            Message("assistant", [TextPart("Checking.")]),
            FunctionCall("call_1", "get_weather", '{"city":"Paris"}'),
            FunctionCall("call_2", "get_weather", '{"city":"Rome"}'),
            FunctionCallOutput("call_1", '{"temp":21}'),
            FunctionCallOutput("call_2", "18 degrees"),
        ],
        tools=[FunctionTool("get_weather", "Weather for a city", schema), FunctionTool("noop")],
        max_output_tokens=321, temperature=0.2, top_p=0.9,
        text_format=JsonSchemaFormat("answer", schema),
    )
    body = await _sent(http, fake, request, model="gemini-2.5-flash")
    assert body["systemInstruction"] == {"parts": [{"text": "Be brief."}, {"text": "Use metric units."}]}
    assert body["contents"] == [
        {"role": "user", "parts": [{"text": "Weather here and in Rome?"},
                                   {"inlineData": {"mimeType": "image/png", "data": PNG_B64}}]},
        {"role": "model", "parts": [
            {"text": "Checking."},
            {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
            {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}}]},
        {"role": "user", "parts": [
            {"functionResponse": {"name": "get_weather", "response": {"output": '{"temp":21}'}}},
            {"functionResponse": {"name": "get_weather", "response": {"output": "18 degrees"}}}]},
    ]
    assert body["tools"] == [{"functionDeclarations": [
        {"name": "get_weather", "description": "Weather for a city", "parametersJsonSchema": schema},
        {"name": "noop"}]}]
    assert body["toolConfig"] == {"functionCallingConfig": {"mode": "AUTO"}}
    assert body["generationConfig"] == {"maxOutputTokens": 321, "temperature": 0.2, "topP": 0.9,
                                        "responseMimeType": "application/json", "responseJsonSchema": schema}


async def test_openapi_schema_fields(http: httpx.AsyncClient, fake: GeminiFake) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": False}
    request = simple_request(tools=[FunctionTool("f", None, schema)], text_format=JsonSchemaFormat("x", schema))
    body = await _sent(http, fake, request, schema_fields="openapi")
    plain = {"type": "object", "properties": {"a": {"type": "string"}}}
    assert body["tools"][0]["functionDeclarations"][0]["parameters"] == plain
    assert body["generationConfig"]["responseSchema"] == plain


@pytest.mark.parametrize(("choice", "config", "declared"), [
    (ToolChoice("auto"), {"mode": "AUTO"}, ["a", "b"]),
    (ToolChoice("none"), {"mode": "NONE"}, ["a", "b"]),
    (ToolChoice("required"), {"mode": "ANY"}, ["a", "b"]),
    (ToolChoice("auto", name="b"), {"mode": "ANY", "allowedFunctionNames": ["b"]}, ["a", "b"]),
    (ToolChoice("required", allowed=["a"]), {"mode": "ANY", "allowedFunctionNames": ["a"]}, ["a"]),
    (ToolChoice("auto", allowed=["b"]), {"mode": "AUTO"}, ["b"]),
])
async def test_tool_choice(choice: ToolChoice, config: dict[str, Any], declared: list[str],
                           http: httpx.AsyncClient, fake: GeminiFake) -> None:
    body = await _sent(http, fake, simple_request(tools=[FunctionTool("a"), FunctionTool("b")], tool_choice=choice))
    assert body["toolConfig"] == {"functionCallingConfig": config}
    assert [d["name"] for d in body["tools"][0]["functionDeclarations"]] == declared


async def test_https_image_rejected_by_default(http: httpx.AsyncClient, fake: GeminiFake) -> None:
    _ok(fake)
    request = GenerationRequest(model="m", items=[Message("user", [ImagePart("https://example.com/cat.png")])])
    got = await run(provider(http, fake), request)
    assert got.error is not None and got.error.kind == "bad_request"
    assert "data URL" in got.error.message and "does not fetch" in got.error.message
    assert fake.requests == []


async def test_https_image_as_file_data_when_enabled(http: httpx.AsyncClient, fake: GeminiFake) -> None:
    request = GenerationRequest(model="m", items=[Message("user", [ImagePart("https://example.com/cat.png")])])
    body = await _sent(http, fake, request, image_urls=True)
    assert body["contents"][0]["parts"] == [{"fileData": {"fileUri": "https://example.com/cat.png",
                                                          "mimeType": "image/png"}}]


async def test_function_output_without_its_call_is_rejected(http: httpx.AsyncClient, fake: GeminiFake) -> None:
    _ok(fake)
    request = GenerationRequest(model="m", items=[Message("user", [TextPart("hi")]),
                                                  FunctionCallOutput("call_x", "1")])
    got = await run(provider(http, fake), request)
    assert got.error is not None and got.error.kind == "bad_request" and fake.requests == []


@pytest.mark.parametrize(("model", "effort", "thinking"), [
    ("gemini-3-pro-preview", "high", {"includeThoughts": True, "thinkingLevel": "high"}),
    ("gemini-3-flash-preview", "low", {"includeThoughts": True, "thinkingLevel": "low"}),
    ("gemini-2.5-flash", "medium", {"includeThoughts": True, "thinkingBudget": 8192}),
    ("gemini-2.5-flash", "none", {"includeThoughts": False, "thinkingBudget": 0}),
])
async def test_reasoning_effort(model: str, effort: str, thinking: dict[str, Any], http: httpx.AsyncClient,
                                fake: GeminiFake) -> None:
    body = await _sent(http, fake, simple_request(reasoning_effort=effort), model=model)
    assert body["generationConfig"]["thinkingConfig"] == thinking


async def test_literal_continuation_is_a_trailing_model_turn(http: httpx.AsyncClient, fake: GeminiFake) -> None:
    assert provider(http, fake).capabilities.literal_continuation is True
    assert provider(http, fake, literal_continuation=False).capabilities.literal_continuation is False
    body = await _sent(http, fake, simple_request("Tell a story", continuation=Continuation("Once upon a ", True)))
    assert body["contents"] == [{"role": "user", "parts": [{"text": "Tell a story"}]},
                                {"role": "model", "parts": [{"text": "Once upon a "}]}]


async def test_instruction_continuation(http: httpx.AsyncClient, fake: GeminiFake) -> None:
    body = await _sent(http, fake, simple_request("Tell a story", continuation=Continuation("Once upon a", False)))
    assert body["contents"][-2:] == [{"role": "model", "parts": [{"text": "Once upon a"}]},
                                     {"role": "user", "parts": [{"text": CONTINUE_INSTRUCTION}]}]


async def test_reasoning_round_trip_and_foreign_reasoning_dropped(http: httpx.AsyncClient,
                                                                  fake: GeminiFake) -> None:
    request = GenerationRequest(model="m", items=[
        Message("user", [TextPart("Weather?")]),
        Reasoning(summary=["**Planning**"], signature="sig-thought", provider="gemini"),
        Reasoning(signature="sig-call", provider="gemini"),
        FunctionCall("call_1", "weather", '{"location":"SF"}'),
        Reasoning(text="foreign thoughts", signature="sig-anthropic", provider="anthropic"),
        Reasoning(encrypted_content="gAAAA", provider="openai_responses"),
        FunctionCallOutput("call_1", "sunny"),
        Message("assistant", [TextPart("It is sunny.")]),
        Reasoning(signature="sig-text", provider="gemini"),
        Message("user", [TextPart("Thanks")]),
    ])
    body = await _sent(http, fake, request)
    assert body["contents"] == [
        {"role": "user", "parts": [{"text": "Weather?"}]},
        {"role": "model", "parts": [
            {"text": "**Planning**", "thought": True, "thoughtSignature": "sig-thought"},
            {"functionCall": {"name": "weather", "args": {"location": "SF"}}, "thoughtSignature": "sig-call"}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "weather", "response": {"output": "sunny"}}}]},
        {"role": "model", "parts": [{"text": "It is sunny."}, {"text": "", "thoughtSignature": "sig-text"}]},
        {"role": "user", "parts": [{"text": "Thanks"}]},
    ]
    assert "foreign" not in json.dumps(body) and "sig-anthropic" not in json.dumps(body)


async def test_gemini3_calls_without_signature_get_the_documented_sentinel(http: httpx.AsyncClient,
                                                                           fake: GeminiFake) -> None:
    items = [Message("user", [TextPart("Weather?")]),
             FunctionCall("call_1", "weather", '{"location":"SF"}'),
             FunctionCall("call_2", "weather", '{"location":"LA"}'),
             FunctionCallOutput("call_1", "sunny"), FunctionCallOutput("call_2", "hot")]
    body = await _sent(http, fake, GenerationRequest(model="m", items=items))
    calls = body["contents"][1]["parts"]
    assert calls[0]["thoughtSignature"] == "skip_thought_signature_validator"
    assert "thoughtSignature" not in calls[1]  # only the first call of a turn carries one
    body = await _sent(http, fake, GenerationRequest(model="m", items=items), model="gemini-2.5-flash")
    assert all("thoughtSignature" not in p for p in body["contents"][1]["parts"])


async def test_dropped_fields_are_logged_by_name_only(http: httpx.AsyncClient, fake: GeminiFake,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    request = GenerationRequest(
        model="m",
        items=[Message("user", [TextPart("my secret prompt"), ImagePart(f"data:image/png;base64,{PNG_B64}", "high")]),
               FunctionCall("call_1", "f", '{"cut": "in the mid'), FunctionCallOutput("call_1", "x")],
        tools=[FunctionTool("f", strict=True)], parallel_tool_calls=False)
    with caplog.at_level("WARNING", logger="unbroken.providers.gemini"):
        body = await _sent(http, fake, request)
    messages = " | ".join(r.getMessage() for r in caplog.records)
    for field in ("parallel_tool_calls", "tools[].strict", "input_image.detail", "function_call.arguments"):
        assert field in messages
    assert "secret" not in messages and "in the mid" not in messages
    assert body["contents"][1]["parts"][0]["functionCall"] == {"name": "f", "args": {}}
