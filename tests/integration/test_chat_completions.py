"""`POST /v1/chat/completions` through a real uvicorn router in front of the simulated upstream, read with the official
`openai` SDK and, for the exact wire shape, with a strict raw reader: text and tool calls, usage, errors, failover
before output and continuation after a mid-stream cut (same attempt loop as /v1/responses)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.support.client import TIMEOUT, headers
from tests.support.server import API_KEY, RouterThread, base_config, sim_model
from unbroken.api.errors import STATUS
from unbroken.errors import Failure
from unbroken.protocol.chat import ChatChunker, completion_from_response
from unbroken.simulator import input_key_of, simulated_tokens

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}},
                                       "required": ["zone"]}}}


def expected_text(messages: list[dict[str, Any]], *, seed: str = "7", length: int = 40) -> str:
    """The simulated upstream's fault-free answer, from its own generator (the router is what is under test)."""
    return "".join(simulated_tokens(seed, input_key_of(messages), length))


@pytest.fixture(scope="module")
def router() -> Iterator[RouterThread]:
    config = base_config(sim_model("demo"),
                         sim_model("frail", deployments=1, max_retries=0),
                         sim_model("slow", deployments=1, tps=20, length=10),
                         heartbeat_seconds=0.02)
    with RouterThread(config) as server:
        yield server


@pytest.fixture(scope="module")
def client(router: RouterThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=router.base_url, api_key=API_KEY, max_retries=0, timeout=30.0) as c:
        yield c


# -- a strict reader of the raw chat stream ----------------------------------------------------------------------


@dataclass
class ChatStream:
    chunks: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, Any] | None = None
    done: bool = False
    heartbeats: int = 0

    def text(self) -> str:
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in self.chunks if c["choices"])

    def finish_reasons(self) -> list[str]:
        return [c["choices"][0]["finish_reason"] for c in self.chunks
                if c["choices"] and c["choices"][0]["finish_reason"] is not None]


def read_chat_stream(raw: bytes) -> ChatStream:
    """`data:`-only frames, `\\n` line endings, chunks of one id, then `[DONE]` or an error object as the last frame."""
    text = raw.decode()
    assert "\r" not in text
    blocks = text.split("\n\n")
    assert blocks[-1] == "", "the stream does not end with a blank line"
    out = ChatStream()
    for block in blocks[:-1]:
        if block.startswith(":"):
            out.heartbeats += 1
            continue
        assert not out.done and out.error is None, "data after the end of the stream"
        assert block.startswith("data: ") and "\n" not in block, f"unexpected frame {block[:80]!r}"
        data = block[6:]
        if data == "[DONE]":
            out.done = True
            continue
        obj = json.loads(data)
        if "error" in obj:
            out.error = obj["error"]
            continue
        assert obj["object"] == "chat.completion.chunk"
        out.chunks.append(obj)
    assert out.done != (out.error is not None), "a stream ends with either [DONE] or an error"
    ids = {c["id"] for c in out.chunks}
    assert len(ids) <= 1 and all(i.startswith("chatcmpl-") for i in ids)
    return out


def post_chat_stream(base_url: str, body: dict[str, Any]) -> tuple[httpx.Response, ChatStream | None]:
    with httpx.Client(timeout=TIMEOUT) as c, c.stream("POST", f"{base_url}/chat/completions",
                                                      json={**body, "stream": True}, headers=headers()) as r:
        raw = r.read()
    if r.status_code != 200:
        return r, None
    assert r.headers["content-type"].startswith("text/event-stream")
    return r, read_chat_stream(raw)


def tool_calls_of(chunks: list[Any]) -> dict[int, dict[str, str]]:
    """Accumulate streamed tool calls by index, the way clients do (strings concatenated)."""
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            for tc in choice.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                entry["id"] += tc.id or ""
                if tc.function is not None:
                    entry["name"] += tc.function.name or ""
                    entry["arguments"] += tc.function.arguments or ""
    return calls


# -- text ---------------------------------------------------------------------------------------------------------

HELLO = [{"role": "user", "content": "Hello there"}]


def test_sdk_stream_text(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="demo", messages=HELLO, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected_text(HELLO)
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].choices[0].delta.content is None
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
    # Chunks name the upstream model that answered (the simulated deployments' models are "sim-0", "sim-1").
    assert all(c.object == "chat.completion.chunk" and c.model in ("sim-0", "sim-1") and c.created > 0
               for c in chunks)
    assert all(c.usage is None for c in chunks)


def test_raw_stream_wire_shape(router: RouterThread) -> None:
    response, stream = post_chat_stream(router.base_url, {"model": "demo", "messages": HELLO})
    assert response.status_code == 200 and stream is not None and stream.done
    assert stream.text() == expected_text(HELLO)
    assert stream.chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("usage" not in c for c in stream.chunks)  # only with stream_options.include_usage


def test_sdk_non_stream_text(client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " there"}]}]
    completion = client.chat.completions.create(model="demo", messages=messages)
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    choice = completion.choices[0]
    assert choice.finish_reason == "stop" and choice.message.role == "assistant"
    assert choice.message.content == expected_text([{"role": "system", "content": "Be brief."},
                                                    {"role": "user", "content": "Hello there"}])
    assert choice.message.tool_calls is None
    usage = completion.usage
    assert usage is not None and usage.completion_tokens == 40
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_include_usage_puts_usage_in_a_final_chunk(client: openai.OpenAI, router: RouterThread) -> None:
    chunks = list(client.chat.completions.create(model="demo", messages=HELLO, stream=True,
                                                 stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 40
    assert last.usage.total_tokens == last.usage.prompt_tokens + 40
    assert last.usage.prompt_tokens_details is not None and last.usage.prompt_tokens_details.cached_tokens == 0
    assert last.usage.completion_tokens_details is not None
    assert last.usage.completion_tokens_details.reasoning_tokens == 0
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "stop"
    _, stream = post_chat_stream(router.base_url, {"model": "demo", "messages": HELLO,
                                                   "stream_options": {"include_usage": True}})
    assert stream is not None
    assert all(c["usage"] is None for c in stream.chunks[:-1]) and stream.chunks[-1]["choices"] == []


def test_max_tokens_finishes_with_length(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="demo", messages=HELLO, stream=True, max_tokens=5))
    assert chunks[-1].choices[0].finish_reason == "length"
    tokens = simulated_tokens("7", input_key_of(HELLO), 40)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "".join(tokens[:5])
    completion = client.chat.completions.create(model="demo", messages=HELLO, max_completion_tokens=5)
    assert completion.choices[0].finish_reason == "length"


def test_json_schema_response_format(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    completion = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "A person"}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}})
    content = completion.choices[0].message.content
    assert content is not None
    jsonschema.validate(json.loads(content), schema)


def test_heartbeat_comments_while_the_upstream_is_quiet(router: RouterThread) -> None:
    # 20 tokens/s upstream and a 20 ms heartbeat interval, as in the /v1/responses heartbeat test.
    _, stream = post_chat_stream(router.base_url, {"model": "slow", "messages": HELLO})
    assert stream is not None and stream.done
    assert stream.heartbeats >= 1
    assert stream.text() == expected_text(HELLO, length=10)


# -- tool calls ---------------------------------------------------------------------------------------------------

WEATHER_Q = [{"role": "user", "content": "Weather in Paris?"}]


def test_sdk_stream_tool_call(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="demo", messages=WEATHER_Q, tools=[WEATHER_TOOL],
                                                 tool_choice="required", stream=True))
    calls = tool_calls_of(chunks)
    assert list(calls) == [0]
    call = calls[0]
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    jsonschema.validate(json.loads(call["arguments"]), WEATHER_TOOL["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # The header chunk announces id, type and name with empty arguments; fragments follow at the same index.
    header = next(c for c in chunks if c.choices[0].delta.tool_calls)
    tc = header.choices[0].delta.tool_calls[0]  # type: ignore[index]
    assert tc.type == "function" and tc.function is not None and tc.function.arguments == ""


def test_sdk_stream_helper_accumulates_tool_calls(client: openai.OpenAI) -> None:
    # The SDK's own accumulator concatenates every string per index: a repeated header would corrupt the call.
    with client.chat.completions.stream(model="demo", messages=WEATHER_Q, tools=[WEATHER_TOOL],
                                        tool_choice={"type": "function", "function": {"name": "get_weather"}}) as s:
        final = s.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert calls is not None and len(calls) == 1
    assert calls[0].function.name == "get_weather"  # type: ignore[union-attr]
    jsonschema.validate(json.loads(calls[0].function.arguments),  # type: ignore[union-attr]
                        WEATHER_TOOL["function"]["parameters"])
    assert final.choices[0].finish_reason == "tool_calls"


def test_parallel_tool_calls_get_consecutive_indexes(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="demo", messages=WEATHER_Q, tools=[WEATHER_TOOL, TIME_TOOL],
                                                 tool_choice="required", stream=True,
                                                 metadata={"sim_parallel_tools": "true"}))
    calls = tool_calls_of(chunks)
    assert [calls[i]["name"] for i in sorted(calls)] == ["get_weather", "get_time"]
    assert all(json.loads(c["arguments"]) for c in calls.values())
    assert len({c["id"] for c in calls.values()}) == 2


def test_non_stream_tool_call_and_tool_result_round_trip(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model="demo", messages=WEATHER_Q, tools=[WEATHER_TOOL],
                                           tool_choice="required")
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert calls is not None and calls[0].function.name == "get_weather"  # type: ignore[union-attr]
    history = [*WEATHER_Q,
               {"role": "assistant", "content": None, "tool_calls": [calls[0].model_dump()]},
               {"role": "tool", "tool_call_id": calls[0].id, "content": "21C and sunny"}]
    second = client.chat.completions.create(model="demo", messages=history, tools=[WEATHER_TOOL])
    assert second.choices[0].finish_reason == "stop"
    # What the upstream saw is the same conversation: its answer quotes the result and is keyed on roles and texts.
    assert second.choices[0].message.content == 'The tool get_weather returned "21C and sunny". ' + expected_text([
        *WEATHER_Q, {"role": "assistant", "content": ""}, {"role": "tool", "content": "21C and sunny"}])


# -- errors -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "demo"}, "messages"),
    ({"messages": HELLO}, "model"),
    ({"model": "demo", "messages": HELLO, "n": 2}, "n"),
    ({"model": "demo", "messages": HELLO, "stop": ["\n"]}, "stop"),
    ({"model": "demo", "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"model": "demo", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "see"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     "messages[0].content[1].image_url.url"),
    ({"model": "demo", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
     "messages[0].content[0].type"),
    ({"model": "demo", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ({"model": "demo", "messages": HELLO, "temperature": 3}, "temperature"),
    ({"model": "demo", "messages": HELLO, "tool_choice": "required"}, "tool_choice"),
    ({"model": "demo", "messages": HELLO, "tools": [WEATHER_TOOL],
      "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
    ({"model": "demo", "messages": HELLO, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema"),
])
def test_bad_input_is_400_with_param(router: RouterThread, body: dict[str, Any], param: str) -> None:
    with httpx.Client(timeout=TIMEOUT) as c:
        r = c.post(f"{router.base_url}/chat/completions", json=body, headers=headers())
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def test_sdk_sees_400_401_404(router: RouterThread, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="demo", messages=HELLO, n=2)
    assert bad.value.status_code == 400 and bad.value.param == "n"
    with openai.OpenAI(base_url=router.base_url, api_key="sk-wrong", max_retries=0, timeout=30.0) as wrong, \
            pytest.raises(openai.AuthenticationError) as auth:
        wrong.chat.completions.create(model="demo", messages=HELLO, stream=True)
    assert auth.value.status_code == 401
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=HELLO, stream=True)
    assert missing.value.code == "model_not_found" and missing.value.param == "model"


def test_missing_key_is_401(router: RouterThread) -> None:
    with httpx.Client(timeout=TIMEOUT) as c:
        r = c.post(f"{router.base_url}/chat/completions", json={"model": "demo", "messages": HELLO})
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"


def test_upstream_error_before_output_is_an_http_error_when_nothing_can_answer(router: RouterThread) -> None:
    # One deployment, no retries: the 503 is all there is, and it is an honest HTTP status, not a broken stream.
    response, _ = post_chat_stream(router.base_url, {"model": "frail", "messages": HELLO,
                                                     "metadata": {"sim_fault": "http:503", "sim_fault_attempts": "9"}})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "upstream_unavailable"


# -- resilience ---------------------------------------------------------------------------------------------------


def test_failover_before_output_is_invisible(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="demo", messages=HELLO, stream=True,
                                                 metadata={"sim_fault": "http:503"}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected_text(HELLO)
    assert chunks[-1].choices[0].finish_reason == "stop"
    completion = client.chat.completions.create(model="demo", messages=HELLO, metadata={"sim_fault": "http:503"})
    assert completion.choices[0].message.content == expected_text(HELLO)


@pytest.mark.parametrize("fault", ["cut:5", "reset:12", "error:3"])
def test_mid_stream_failure_is_continued_seamlessly(client: openai.OpenAI, router: RouterThread, fault: str) -> None:
    chunks = list(client.chat.completions.create(model="demo", messages=HELLO, stream=True,
                                                 metadata={"sim_fault": fault}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected_text(HELLO)
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]
    _, stream = post_chat_stream(router.base_url, {"model": "demo", "messages": HELLO,
                                                   "metadata": {"sim_fault": fault}})
    assert stream is not None and stream.done and stream.text() == expected_text(HELLO)


def test_unrepairable_cut_ends_with_an_error_chunk_not_a_finish_reason(client: openai.OpenAI,
                                                                        router: RouterThread) -> None:
    body = {"model": "frail", "messages": HELLO, "metadata": {"sim_fault": "cut:5", "sim_fault_attempts": "9"}}
    _, stream = post_chat_stream(router.base_url, body)
    assert stream is not None and not stream.done and stream.error is not None
    assert stream.error["code"] == "upstream_unavailable" and stream.error["type"] == "server_error"
    assert stream.finish_reasons() == []
    assert expected_text(HELLO).startswith(stream.text()) and stream.text()
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(model="frail", messages=HELLO, stream=True,
                                                metadata=body["metadata"]):
            pass
    with pytest.raises(openai.InternalServerError) as exc:
        client.chat.completions.create(model="frail", messages=HELLO, metadata=body["metadata"])
    assert exc.value.status_code == 503


def test_cut_inside_a_tool_call_shows_one_complete_call(client: openai.OpenAI) -> None:
    # The upstream dies two argument fragments into the call; the attempt loop drops the half call and redoes it.
    # A chat client must see one call at index 0 with complete arguments, never the dropped one.
    chunks = list(client.chat.completions.create(model="demo", messages=WEATHER_Q, tools=[WEATHER_TOOL],
                                                 tool_choice="required", stream=True,
                                                 metadata={"sim_fault": "cut:2"}))
    calls = tool_calls_of(chunks)
    assert list(calls) == [0] and calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER_TOOL["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_arguments_stream_in_fragments_when_not_held() -> None:
    with RouterThread(base_config(sim_model("demo"), hold_tool_arguments=False)) as server, \
            openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=30.0) as c:
        chunks = list(c.chat.completions.create(model="demo", messages=WEATHER_Q, tools=[WEATHER_TOOL],
                                                tool_choice="required", stream=True))
    fragments = [tc.function.arguments for ch in chunks for tc in ch.choices[0].delta.tool_calls or []
                 if tc.function is not None and tc.function.arguments]
    assert len(fragments) > 1
    calls = tool_calls_of(chunks)
    assert list(calls) == [0] and json.loads(calls[0]["arguments"]) and calls[0]["arguments"] == "".join(fragments)


# -- every provider adapter, through the router, to a chat client ------------------------------------------------
#
# Each case replays one recorded stream from tests/fixtures through that provider's fake upstream (tests/fakes) and
# the router's adapter for it; a chat client must get exactly the recording's text and tool calls. Expected values
# are read from the recorded payloads here, by small parsers of each wire, never through the adapter.

LAYERS = Path(__file__).resolve().parents[2] / "layers" / "unbroken" / "providers"
FAKES = Path(__file__).resolve().parents[1] / "fakes"


@dataclass
class Recorded:
    text: str = ""
    calls: list[tuple[str | None, str, Any]] = field(default_factory=list)  # (call id, name, parsed arguments)


def _sse_payloads(frames: list[bytes]) -> list[dict[str, Any]]:
    out = []
    for frame in frames:
        data = [ln[5:].strip() for ln in frame.decode().split("\n") if ln.startswith("data:")]
        if data and data[0] != "[DONE]":
            out.append(json.loads("\n".join(data)))
    return out


def recorded_anthropic(payloads: list[dict[str, Any]]) -> Recorded:
    rec, args = Recorded(), {}
    for p in payloads:
        if p.get("type") == "content_block_start" and p["content_block"]["type"] == "tool_use":
            block = p["content_block"]
            rec.calls.append((block["id"], block["name"], None))
            args[len(rec.calls) - 1] = ""
        elif p.get("type") == "content_block_delta":
            delta = p["delta"]
            if delta["type"] == "text_delta":
                rec.text += delta["text"]
            elif delta["type"] == "input_json_delta":
                args[len(rec.calls) - 1] += delta["partial_json"]
    rec.calls = [(cid, name, json.loads(args[i] or "{}")) for i, (cid, name, _) in enumerate(rec.calls)]
    return rec


def recorded_bedrock(payloads: list[dict[str, Any]]) -> Recorded:
    rec, args = Recorded(), []
    for p in payloads:
        if "contentBlockStart" in p and "toolUse" in p["contentBlockStart"]["start"]:
            use = p["contentBlockStart"]["start"]["toolUse"]
            rec.calls.append((use["toolUseId"], use["name"], None))
            args.append("")
        elif "contentBlockDelta" in p:
            delta = p["contentBlockDelta"]["delta"]
            rec.text += delta.get("text", "")
            if "toolUse" in delta:
                args[-1] += delta["toolUse"]["input"]
    rec.calls = [(cid, name, json.loads(args[i] or "{}")) for i, (cid, name, _) in enumerate(rec.calls)]
    return rec


def recorded_gemini(payloads: list[dict[str, Any]]) -> Recorded:
    rec = Recorded()
    for p in payloads:
        for cand in p.get("candidates") or []:
            for part in (cand.get("content") or {}).get("parts") or []:
                if "text" in part and not part.get("thought"):
                    rec.text += part["text"]
                if "functionCall" in part:
                    rec.calls.append((None, part["functionCall"]["name"], part["functionCall"].get("args") or {}))
    return rec


def recorded_responses(payloads: list[dict[str, Any]]) -> Recorded:
    rec = Recorded()
    for p in payloads:
        if p.get("type") == "response.output_text.delta":
            rec.text += p["delta"]
        elif p.get("type") == "response.output_item.done" and p["item"]["type"] == "function_call":
            item = p["item"]
            rec.calls.append((item["call_id"], item["name"], json.loads(item["arguments"] or "{}")))
    return rec


def recorded_chat(payloads: list[dict[str, Any]]) -> Recorded:
    rec, calls = Recorded(), {}
    for p in payloads:
        for choice in p.get("choices") or []:
            delta = choice.get("delta") or {}
            rec.text += delta.get("content") or ""
            for tc in delta.get("tool_calls") or []:
                entry = calls.setdefault(tc["index"], {"id": "", "name": "", "arguments": ""})
                entry["id"] = entry["id"] or tc.get("id") or ""
                entry["name"] = entry["name"] or (tc.get("function") or {}).get("name") or ""
                entry["arguments"] += (tc.get("function") or {}).get("arguments") or ""
    rec.calls = [(c["id"], c["name"], json.loads(c["arguments"] or "{}")) for _, c in sorted(calls.items())]
    return rec


@dataclass
class ProviderCase:
    id: str
    provider: str  # config provider name
    module: str  # adapter module under layers/unbroken/providers
    fake_module: str  # tests/fakes module
    fixture: str


PROVIDER_CASES = [
    ProviderCase("anthropic-text", "anthropic", "anthropic", "anthropic", "anthropic-text.chunks.txt"),
    ProviderCase("anthropic-tool", "anthropic", "anthropic", "anthropic", "tool_use_response.txt"),
    ProviderCase("bedrock-text", "bedrock", "bedrock", "bedrock", "amazon-bedrock-text.chunks.txt"),
    ProviderCase("bedrock-tool", "bedrock", "bedrock", "bedrock", "amazon-bedrock-tool-call.1.chunks.txt"),
    ProviderCase("azure-chat-text", "azure", "azure", "azure", "azure-model-router.1.chunks.txt"),
    ProviderCase("azure-responses-text", "azure", "azure", "azure", "azure-text.1.chunks.txt"),
    ProviderCase("azure-responses-tool", "azure", "azure", "azure", "azure-tool-call.1.chunks.txt"),
    ProviderCase("gemini-text", "gemini", "gemini", "gemini", "google-text.chunks.txt"),
    ProviderCase("gemini-tool", "gemini", "gemini", "gemini", "google-tool-call.chunks.txt"),
    ProviderCase("openai-responses-text", "openai_responses", "openai_responses", "openai_responses",
                 "github-copilot-id-rotation.1.chunks.txt"),
    ProviderCase("openai-responses-tool", "openai_responses", "openai_responses", "openai_responses",
                 "test_openai_responses_stream.yaml#0"),
]


def _fake_and_deployment(case: ProviderCase) -> tuple[Any, dict[str, Any], Recorded]:
    """(a started-on-enter fake serving the recording, the deployment for it, what the recording holds)."""
    common = {"name": "d", "provider": case.provider, "api_key": "k", "options": {"max_retries": 0}}
    if case.provider == "anthropic":
        from tests.fakes.anthropic import ANTHROPIC_FIXTURES, FakeAnthropic, fixture_frames, stream_script

        frames = fixture_frames(ANTHROPIC_FIXTURES / case.fixture)
        fake: Any = FakeAnthropic(stream_script(frames))
        return fake, {**common, "model": "claude-test"}, recorded_anthropic(_sse_payloads(frames))
    if case.provider == "bedrock":
        from tests.fakes.bedrock import BEDROCK_FIXTURES, FakeBedrock
        from tests.fakes.bedrock import fixture_frames as bedrock_frames
        from tests.fakes.bedrock import stream_script as bedrock_script

        path = BEDROCK_FIXTURES / case.fixture
        fake = FakeBedrock(bedrock_script(bedrock_frames(path)))
        payloads = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
        # No api_key (a present but empty one switches a deployment off): SigV4 with the test environment's dummy
        # credentials (tests/conftest.py).
        keyless = {k: v for k, v in common.items() if k != "api_key"}
        return fake, {**keyless, "model": "us.anthropic.claude-test-v1:0", "region": "us-east-1"}, \
            recorded_bedrock(payloads)
    if case.provider == "azure":
        from tests.fakes.azure import AZURE_FIXTURES, AzureFake, is_responses

        frames = AzureFake.frames(case.fixture)
        responses = is_responses(AZURE_FIXTURES / case.fixture)
        fake = AzureFake()
        fake.serve(fake.replay(case.fixture))
        parse = recorded_responses if responses else recorded_chat
        return fake, {**common, "model": "my-gpt5", "options": {"max_retries": 0,
                                                                 "api": "responses" if responses else "chat"}}, \
            parse(_sse_payloads(frames))
    if case.provider == "gemini":
        from tests.fakes.gemini import GeminiFake

        frames = GeminiFake.frames(case.fixture)
        fake = GeminiFake()
        fake.serve(fake.replay(case.fixture))
        return fake, {**common, "model": "gemini-3-pro-preview"}, recorded_gemini(_sse_payloads(frames))
    from tests.fakes.openai_responses import ResponsesFake

    frames = ResponsesFake.frames(case.fixture)
    fake = ResponsesFake()
    fake.serve(fake.replay(case.fixture))
    return fake, {**common, "model": "gpt-5"}, recorded_responses(_sse_payloads(frames))


@pytest.mark.parametrize("case", PROVIDER_CASES, ids=[c.id for c in PROVIDER_CASES])
def test_chat_stream_through_each_provider_adapter(case: ProviderCase) -> None:
    if not (LAYERS / f"{case.module}.py").exists():
        pytest.skip(f"no {case.module} adapter under layers/unbroken/providers yet")
    if not (FAKES / f"{case.fake_module}.py").exists():
        pytest.skip(f"no fake upstream tests/fakes/{case.fake_module}.py yet")
    fake, deployment, recorded = _fake_and_deployment(case)
    assert recorded.text or recorded.calls, "the recording holds neither text nor tool calls"
    with fake:
        base = fake.base_url + ("/v1" if case.provider == "openai_responses" else "")
        model = {"name": "m", "deployments": [{**deployment, "base_url": base}]}
        tools = [{"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
                 for name in dict.fromkeys(name for _, name, _ in recorded.calls)]
        with RouterThread(base_config(model)) as server, \
                openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=30.0) as c:
            extra: dict[str, Any] = {"tools": tools} if tools else {}
            chunks = list(c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                    stream=True, **extra))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == recorded.text
    calls = tool_calls_of(chunks)
    assert sorted(calls) == list(range(len(recorded.calls)))
    for index, (call_id, name, arguments) in enumerate(recorded.calls):
        got = calls[index]
        assert got["name"] == name and json.loads(got["arguments"] or "{}") == arguments
        assert got["id"] == call_id if call_id else got["id"]
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == ["tool_calls" if recorded.calls else "stop"]


# -- the event → chunk translation on its own ----------------------------------------------------------------------


def _response(status: str, **extra: Any) -> dict[str, Any]:
    return {"status": status, "output": [], "usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5,
                                                      "input_tokens_details": {"cached_tokens": 1},
                                                      "output_tokens_details": {"reasoning_tokens": 1}}, **extra}


def _deltas(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c["choices"][0]["delta"] for c in chunks if c["choices"]]


def test_chunker_maps_refusal_reasoning_and_content_filter() -> None:
    chunker = ChatChunker("chatcmpl-x", 1, "m", include_usage=True)
    out: list[dict[str, Any]] = []
    for event in [{"type": "response.created"}, {"type": "response.reasoning.delta", "delta": "think"},
                  {"type": "response.reasoning_summary_text.delta", "delta": "sum"},
                  {"type": "response.refusal.delta", "delta": "no"},
                  {"type": "response.incomplete",
                   "response": _response("incomplete", incomplete_details={"reason": "content_filter"})}]:
        out += chunker.feed(event)
    assert _deltas(out) == [{"role": "assistant", "content": ""}, {"reasoning_content": "think"},
                            {"reasoning_content": "sum"}, {"refusal": "no"}, {}]
    assert out[-2]["choices"][0]["finish_reason"] == "content_filter" and out[-2]["usage"] is None
    assert out[-1]["choices"] == [] and out[-1]["usage"] == {
        "prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5, "prompt_tokens_details": {"cached_tokens": 1},
        "completion_tokens_details": {"reasoning_tokens": 1}}
    assert chunker.finished and chunker.error is None


def test_chunker_never_shows_a_dropped_call_and_numbers_shown_calls_densely() -> None:
    chunker = ChatChunker("chatcmpl-x", 1, "m")
    def item(item_id: str, call_id: str, status: str) -> dict[str, Any]:
        return {"id": item_id, "type": "function_call", "call_id": call_id, "name": "f", "arguments": "",
                "status": status}

    events = [
        {"type": "response.created"},
        {"type": "response.output_item.added", "item": item("fc_1", "c1", "in_progress")},
        {"type": "response.output_item.done", "item": item("fc_1", "c1", "incomplete")},
        {"type": "response.output_item.added", "item": item("fc_2", "c2", "in_progress")},
        {"type": "response.function_call_arguments.delta", "item_id": "fc_2", "delta": "{}"},
        {"type": "response.output_item.done", "item": item("fc_2", "c2", "completed")},
        {"type": "response.output_item.added", "item": item("fc_3", "c3", "in_progress")},
        {"type": "response.output_item.done", "item": item("fc_3", "c3", "completed")},
        {"type": "response.completed", "response": _response("completed")},
    ]
    out = [chunk for event in events for chunk in chunker.feed(event)]
    calls = [tc for d in _deltas(out) for tc in d.get("tool_calls", [])]
    assert calls == [
        {"index": 0, "id": "c2", "type": "function", "function": {"name": "f", "arguments": ""}},
        {"index": 0, "function": {"arguments": "{}"}},
        {"index": 1, "id": "c3", "type": "function", "function": {"name": "f", "arguments": ""}},
    ]
    assert out[-1]["choices"][0]["finish_reason"] == "tool_calls" and "usage" not in out[-1]


@pytest.mark.parametrize(("final", "code", "etype"), [
    (_response("failed", error={"code": "upstream_error", "message": "boom"}), "upstream_error", "server_error"),
    (_response("incomplete", incomplete_details={"reason": "stream_deadline"}), "stream_deadline", "server_error"),
])
def test_chunker_turns_a_bad_ending_into_an_error(final: dict[str, Any], code: str, etype: str) -> None:
    chunker = ChatChunker("chatcmpl-x", 1, "m", include_usage=True)
    chunker.feed({"type": "response.created"})
    chunker.feed({"type": "response.output_text.delta", "delta": "partial"})
    if final["status"] == "failed":
        chunker.feed({"type": "error", "error": {"type": etype, "code": code, "message": "boom", "param": None}})
    out = chunker.feed({"type": "response.failed" if final["status"] == "failed" else "response.incomplete",
                        "response": final})
    assert out == [] and chunker.finished
    assert chunker.error is not None and chunker.error["code"] == code and chunker.error["type"] == etype
    with pytest.raises(Failure) as exc:
        completion_from_response(final, "chatcmpl-x", 1, "m")
    assert exc.value.code == code and STATUS[exc.value.kind] >= 500
