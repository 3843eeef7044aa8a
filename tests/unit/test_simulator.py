"""The simulator, exercised over real HTTP on 127.0.0.1 with httpx and the official openai SDK."""

from __future__ import annotations

import ast
import asyncio
import json
import random
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import jsonschema
import pytest
import pytest_asyncio

from unbroken.ir import CONTINUE_INSTRUCTION
from unbroken.simulator import (
    PREFILL_REJECTED_MESSAGE,
    SimulatedUpstream,
    close_shared_upstream,
    example_for_schema,
    input_key_of,
    parse_faults,
    shared_upstream,
    simulated_tokens,
)
from unbroken.simulator.conversation import CONTINUE_INSTRUCTION as SIMULATORS_CONTINUE_INSTRUCTION

USER = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "tell me a story"}]


@pytest_asyncio.fixture
async def sim() -> AsyncIterator[SimulatedUpstream]:
    async with SimulatedUpstream() as upstream:
        yield upstream


@pytest_asyncio.fixture
async def client(sim: SimulatedUpstream) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sim.base_url, timeout=httpx.Timeout(10.0)) as c:
        yield c


def body(messages: list[dict[str, Any]] | None = None, stream: bool = True, **meta: str) -> dict[str, Any]:
    return {"model": "sim-model", "messages": messages or USER, "stream": stream,
            "metadata": {k: str(v) for k, v in meta.items()}}


@dataclass
class Streamed:
    status: int
    headers: httpx.Headers
    data: list[str] = field(default_factory=list)  # every `data:` payload, in order
    error: Exception | None = None  # a transport error that ended the stream
    raw: bytes = b""

    @property
    def chunks(self) -> list[dict[str, Any]]:
        return [json.loads(d) for d in self.data if d != "[DONE]"]

    @property
    def contents(self) -> list[str]:
        return [c["choices"][0]["delta"]["content"] for c in self.chunks
                if c.get("choices") and c["choices"][0]["delta"].get("content")]

    @property
    def text(self) -> str:
        return "".join(self.contents)

    @property
    def finish_reason(self) -> str | None:
        reasons = [c["choices"][0]["finish_reason"] for c in self.chunks if c.get("choices")]
        return next((r for r in reasons if r), None)

    @property
    def done(self) -> bool:
        return bool(self.data) and self.data[-1] == "[DONE]"


async def stream(client: httpx.AsyncClient, payload: dict[str, Any],
                 timeout: httpx.Timeout | None = None) -> Streamed:
    """POST and read the whole SSE body; a transport error is recorded, not raised, with what came before it."""
    kwargs: dict[str, Any] = {"timeout": timeout} if timeout is not None else {}
    async with client.stream("POST", "/chat/completions", json=payload, **kwargs) as response:
        out = Streamed(response.status_code, response.headers)
        buffer = b""
        try:
            async for piece in response.aiter_raw():
                out.raw += piece
                buffer += piece
                while b"\n\n" in buffer:
                    frame, buffer = buffer.split(b"\n\n", 1)
                    for line in frame.decode().split("\n"):
                        if line.startswith("data: "):
                            out.data.append(line[len("data: "):])
        except httpx.TransportError as exc:
            out.error = exc
        return out


def full_text(seed: str = "0", messages: list[dict[str, Any]] | None = None, length: int = 64) -> list[str]:
    return simulated_tokens(seed, input_key_of(messages or USER), length)


# ---------------------------------------------------------------------------------------------------------------
# Deterministic text
# ---------------------------------------------------------------------------------------------------------------


def test_tokens_are_pure_and_read_like_text() -> None:
    a = simulated_tokens("s", "key", 80)
    assert a == simulated_tokens("s", "key", 80)
    assert a != simulated_tokens("t", "key", 80)
    assert a != simulated_tokens("s", "other", 80)
    assert len(a) == 80
    assert a[0][0].isupper() and not a[0].startswith(" ")
    assert all(t.startswith(" ") and not t[1:].isspace() and " " not in t[1:] for t in a[1:])
    assert "".join(a).endswith((".", "?"))
    assert simulated_tokens("s", "key", 0) == []


def test_the_simulator_imports_nothing_of_the_router() -> None:
    code = ("import sys, unbroken.simulator, unbroken.simulator.__main__; "
            "print(sorted(m for m in sys.modules if m.startswith('unbroken')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert all(m == "unbroken" or m.startswith("unbroken.simulator") for m in ast.literal_eval(loaded)), loaded


def test_the_continue_instruction_is_the_routers() -> None:
    assert SIMULATORS_CONTINUE_INSTRUCTION == CONTINUE_INSTRUCTION


def test_input_key_ignores_prefill_continue_pair_and_tools() -> None:
    key = input_key_of(USER)
    assert input_key_of([*USER, {"role": "assistant", "content": "Partial"}]) == key
    pair = [{"role": "assistant", "content": "Partial"}, {"role": "user", "content": CONTINUE_INSTRUCTION}]
    assert input_key_of([*USER, *pair]) == key
    parts = [{"role": "system", "content": [{"type": "text", "text": "be brief"}]},
             {"role": "user", "content": [{"type": "text", "text": "tell me a story"}]}]
    assert input_key_of(parts) == key
    assert input_key_of([*USER, {"role": "user", "content": "more"}]) != key


async def test_same_seed_same_text_other_seed_other_text(client: httpx.AsyncClient) -> None:
    first = await stream(client, body(sim_seed="7"))
    again = await stream(client, body(sim_seed="7"))
    other = await stream(client, body(sim_seed="8"))
    assert first.text == again.text == "".join(full_text("7"))
    assert other.text != first.text
    assert len(first.contents) == 64  # one token per chunk
    assert first.done and first.finish_reason == "stop"


async def test_chunk_shapes_match_openai(client: httpx.AsyncClient) -> None:
    out = await stream(client, body(sim_length="3"))
    assert out.status == 200 and out.headers["content-type"] == "text/event-stream"
    chunks = out.chunks
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"] for c in chunks[1:4]] == [{"content": t} for t in full_text(length=3)]
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-sim-")
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "sim-model" for c in chunks)
    assert all("usage" not in c for c in chunks)
    assert b"\r" not in out.raw.replace(b"\r\n", b"")  # SSE lines end in \n; \r\n is only chunked framing
    assert out.data[-1] == "[DONE]"


async def test_include_usage(client: httpx.AsyncClient) -> None:
    payload = {**body(sim_length="5"), "stream_options": {"include_usage": True}}
    out = await stream(client, payload)
    *rest, last = out.chunks
    assert all(c["usage"] is None for c in rest)
    assert last["choices"] == []
    usage = last["usage"]
    assert usage["completion_tokens"] == 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + 5
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 0}
    assert out.done


@pytest.mark.parametrize("cap_key", ["max_tokens", "max_completion_tokens"])
async def test_max_tokens_stops_with_length(client: httpx.AsyncClient, cap_key: str) -> None:
    out = await stream(client, {**body(), cap_key: 10})
    assert out.contents == full_text()[:10]
    assert out.finish_reason == "length"


async def test_pacing_controls_keep_the_text(client: httpx.AsyncClient) -> None:
    out = await stream(client, body(sim_ttft_ms="1", sim_tps="5000", sim_length="12"))
    assert out.text == "".join(full_text(length=12))


# ---------------------------------------------------------------------------------------------------------------
# Continuation
# ---------------------------------------------------------------------------------------------------------------


async def test_literal_continuation_at_every_cut_point(client: httpx.AsyncClient) -> None:
    tokens = full_text(length=16)
    full = "".join(tokens)
    for cut in range(len(full) + 1):
        for partial in {full[:cut], full[:cut].rstrip()}:
            out = await stream(client, body([*USER, {"role": "assistant", "content": partial}], sim_length="16"))
            assert partial + out.text == full, (cut, partial)
            assert out.finish_reason == "stop"
            if out.contents:  # split at the token boundary: the later pieces are whole tokens
                assert out.contents[1:] == tokens[len(tokens) - len(out.contents) + 1:]


async def test_literal_continuation_usage_counts_this_attempt(client: httpx.AsyncClient) -> None:
    tokens = full_text(length=20)
    partial = "".join(tokens[:15])
    payload = {**body([*USER, {"role": "assistant", "content": partial}], sim_length="20"),
               "stream_options": {"include_usage": True}}
    out = await stream(client, payload)
    assert out.chunks[-1]["usage"]["completion_tokens"] == 5


async def test_prefill_that_is_not_a_prefix_restarts(client: httpx.AsyncClient) -> None:
    out = await stream(client, body([*USER, {"role": "assistant", "content": "Something else"}]))
    assert out.text == "".join(full_text())


async def test_literal_mode_continue_pair_has_no_overlap(client: httpx.AsyncClient) -> None:
    full = "".join(full_text())
    partial = full[:101]
    msgs = [*USER, {"role": "assistant", "content": partial}, {"role": "user", "content": CONTINUE_INSTRUCTION}]
    out = await stream(client, body(msgs))
    assert partial + out.text == full


def strip_overlap(partial: str, new: str) -> str:
    """What the router does: drop the longest suffix of the partial text that the new output starts with."""
    for size in range(min(len(partial), len(new)), 0, -1):
        if partial.endswith(new[:size]):
            return new[size:]
    return new


async def test_continue_instruction_repeats_up_to_three_tokens(client: httpx.AsyncClient) -> None:
    tokens = full_text()
    full = "".join(tokens)
    for cut in [0, 2, len(tokens[0]), len("".join(tokens[:2])) + 2, len("".join(tokens[:10])),
                len("".join(tokens[:10])) + 3, len(full) - 1]:
        partial = full[:cut]
        msgs = [*USER, {"role": "assistant", "content": partial}, {"role": "user", "content": CONTINUE_INSTRUCTION}]
        out = await stream(client, body(msgs, sim_literal_continuation="false"))
        whole = [i for i in range(len(tokens)) if len("".join(tokens[: i + 1])) <= cut]
        restart = len("".join(tokens[: max(0, len(whole) - 3)])) if whole else 0
        assert out.text == full[restart:], cut
        assert partial + strip_overlap(partial, out.text) == full, cut
        if len(whole) >= 3:
            assert out.contents[:3] == tokens[len(whole) - 3 : len(whole)]  # a real overlap to strip


async def test_non_literal_model_restarts_on_prefill(client: httpx.AsyncClient) -> None:
    full = "".join(full_text())
    out = await stream(client, body([*USER, {"role": "assistant", "content": full[:50]}],
                                    sim_literal_continuation="false"))
    assert out.text == full


async def test_prefill_rejection(client: httpx.AsyncClient) -> None:
    response = await client.post("/chat/completions", json=body(
        [*USER, {"role": "assistant", "content": "Par"}], sim_reject_prefill="true"))
    assert response.status_code == 400
    err = response.json()["error"]
    assert err["message"] == PREFILL_REJECTED_MESSAGE
    assert set(err) == {"message", "type", "param", "code"}
    # The continue-instruction form ends with a user message: accepted.
    msgs = [*USER, {"role": "assistant", "content": "Par"}, {"role": "user", "content": CONTINUE_INSTRUCTION}]
    ok = await stream(client, body(msgs, sim_reject_prefill="true", sim_literal_continuation="false"))
    assert ok.status == 200 and ok.done


# ---------------------------------------------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "status", "type_"), [
    ("http:503", 503, "server_error"), ("http:500", 500, "server_error"), ("http:400", 400, "invalid_request_error"),
    ("http:429", 429, "rate_limit_exceeded"),
])
async def test_http_faults(client: httpx.AsyncClient, spec: str, status: int, type_: str) -> None:
    for stream_flag in (True, False):
        response = await client.post("/chat/completions", json=body(stream=stream_flag, sim_fault=spec))
        assert response.status_code == status
        assert response.json()["error"]["type"] == type_
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        if status == 429:
            assert response.headers["retry-after"] == "0"
            assert response.headers["retry-after-ms"] == "0"
        else:
            assert "retry-after" not in response.headers


async def test_http_fault_retry_after(client: httpx.AsyncClient) -> None:
    response = await client.post("/chat/completions", json=body(sim_fault="http:429:0.2"))
    assert response.status_code == 429
    assert response.headers["retry-after"] == "0.2" and response.headers["retry-after-ms"] == "200"
    response = await client.post("/chat/completions", json=body(sim_fault="http:503:3"))
    assert response.headers["retry-after"] == "3" and response.headers["retry-after-ms"] == "3000"


@pytest.mark.parametrize(("spec", "status", "code"), [
    ("auth", 401, "invalid_api_key"), ("context_length", 400, "context_length_exceeded"),
    ("quota", 429, "insufficient_quota"),
])
async def test_request_faults(client: httpx.AsyncClient, spec: str, status: int, code: str) -> None:
    response = await client.post("/chat/completions", json=body(sim_fault=spec))
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    if spec == "context_length":
        assert response.json()["error"]["message"].startswith("This model's maximum context length is ")


async def test_error_mid_stream(client: httpx.AsyncClient) -> None:
    out = await stream(client, body(sim_fault="error:4"))
    assert out.error is None and not out.done
    assert out.contents == full_text()[:4]
    assert json.loads(out.data[-1]) == {"error": {
        "message": "The server had an error while processing your request.", "type": "server_error"}}


@pytest.mark.parametrize("kind", ["cut", "reset"])
async def test_cut_is_a_transport_error(client: httpx.AsyncClient, sim: SimulatedUpstream, kind: str) -> None:
    out = await stream(client, body(sim_fault=f"{kind}:5"))
    assert isinstance(out.error, httpx.TransportError)
    assert not out.done and out.finish_reason is None
    if kind == "cut":  # a FIN after the flushed chunks: the client has every chunk sent before the cut
        assert out.contents == full_text()[:5]
    # The server lives on, and the pool replaces the dropped connection.
    again = await stream(client, body())
    assert again.done


async def test_cut_beyond_the_answer_still_cuts_before_finish(client: httpx.AsyncClient) -> None:
    out = await stream(client, body(sim_fault="cut:1000", sim_length="5"))
    assert isinstance(out.error, httpx.TransportError)
    assert out.contents == full_text(length=5) and out.finish_reason is None


async def test_stall_is_detected_by_a_read_timeout(client: httpx.AsyncClient, sim: SimulatedUpstream) -> None:
    out = await stream(client, body(sim_fault="stall:3"), timeout=httpx.Timeout(10.0, read=0.3))
    assert isinstance(out.error, httpx.ReadTimeout)
    assert out.contents == full_text()[:3]
    assert (await stream(client, body())).done  # still serving


async def test_timeout_sends_nothing(client: httpx.AsyncClient) -> None:
    with pytest.raises(httpx.ReadTimeout):
        await client.post("/chat/completions", json=body(sim_fault="timeout"),
                          timeout=httpx.Timeout(10.0, read=0.3))
    with pytest.raises(httpx.ReadTimeout):
        await client.post("/chat/completions", json=body(stream=False, sim_fault="timeout"),
                          timeout=httpx.Timeout(10.0, read=0.3))
    assert (await stream(client, body())).done


async def test_malformed_chunk(client: httpx.AsyncClient) -> None:
    out = await stream(client, body(sim_fault="malformed:2"))
    assert out.data[-1] == '{"choices": ['
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.data[-1])
    assert [json.loads(d)["choices"][0]["delta"].get("content") for d in out.data[1:-1]] == full_text()[:2]
    assert out.error is None


async def test_no_done(client: httpx.AsyncClient) -> None:
    out = await stream(client, body(sim_fault="no_done", sim_length="4"))
    assert out.error is None and out.finish_reason == "stop" and "[DONE]" not in out.data
    assert out.contents == full_text(length=4)


async def test_content_filter(client: httpx.AsyncClient) -> None:
    out = await stream(client, body(sim_fault="content_filter:3"))
    assert out.contents == full_text()[:3] and out.finish_reason == "content_filter" and out.done


async def test_fault_attempts_counted_per_request_key(client: httpx.AsyncClient, sim: SimulatedUpstream) -> None:
    statuses = []
    for _ in range(4):
        r = await client.post("/chat/completions", json=body(stream=False, sim_fault="http:503",
                                                             sim_fault_attempts="2", sim_request="resp-1"))
        statuses.append(r.status_code)
    assert statuses == [503, 503, 200, 200]
    assert sim.attempts("resp-1") == 4
    # Another key starts its own count; without a key every request faults.
    other = await client.post("/chat/completions", json=body(stream=False, sim_fault="http:503", sim_request="x"))
    assert other.status_code == 503
    for _ in range(2):
        r = await client.post("/chat/completions", json=body(stream=False, sim_fault="http:503"))
        assert r.status_code == 503


async def test_fault_list_applies_to_successive_attempts(client: httpx.AsyncClient) -> None:
    meta = {"sim_fault": "cut:3,http:429:0.1,error:2,none,stall:0", "sim_fault_attempts": "9", "sim_request": "r"}
    first = await stream(client, body(**meta))
    assert isinstance(first.error, httpx.TransportError)
    second = await stream(client, body(**meta))
    assert second.status == 429 and second.headers["retry-after-ms"] == "100"
    third = await stream(client, body(**meta))
    assert "error" in json.loads(third.data[-1])
    fourth = await stream(client, body(**meta))
    assert fourth.done
    fifth = await stream(client, body(**meta), timeout=httpx.Timeout(10.0, read=0.3))
    assert isinstance(fifth.error, httpx.ReadTimeout)
    sixth = await stream(client, body(**meta))
    assert sixth.done and sixth.text == "".join(full_text())


def test_parse_faults_rejects_unknown() -> None:
    assert [f.kind for f in parse_faults("cut:1, http:503 ,no_done")] == ["cut", "http", "no_done"]
    for bad in ("explode", "http:200", "cut:-1", "auth:3", "http:abc"):
        with pytest.raises(ValueError):
            parse_faults(bad)


async def test_bad_requests(client: httpx.AsyncClient) -> None:
    bad_json = await client.post("/chat/completions", content=b"{not json",
                                 headers={"content-type": "application/json"})
    assert bad_json.status_code == 400
    assert set(bad_json.json()["error"]) == {"message", "type", "param", "code"}
    assert bad_json.json()["error"]["type"] == "invalid_request_error"
    no_messages = await client.post("/chat/completions", json={"model": "m", "messages": []})
    assert no_messages.status_code == 400 and no_messages.json()["error"]["param"] == "messages"
    bad_fault = await client.post("/chat/completions", json=body(sim_fault="explode"))
    assert bad_fault.status_code == 400 and bad_fault.json()["error"]["param"] == "metadata.sim_fault"
    bad_tps = await client.post("/chat/completions", json=body(sim_tps="fast"))
    assert bad_tps.status_code == 400
    missing = await client.get("/nothing/here")
    assert missing.status_code == 404 and "error" in missing.json()


async def test_models(client: httpx.AsyncClient) -> None:
    response = await client.get("/models")
    assert response.status_code == 200
    assert response.json()["object"] == "list" and response.json()["data"][0]["id"] == "simulated"


# ---------------------------------------------------------------------------------------------------------------
# Connections
# ---------------------------------------------------------------------------------------------------------------


async def test_keep_alive_reuses_one_connection(client: httpx.AsyncClient, sim: SimulatedUpstream) -> None:
    for _ in range(5):
        assert (await stream(client, body(sim_length="3"))).done
        assert (await client.post("/chat/completions", json=body(stream=False, sim_length="3"))).status_code == 200
    assert sim.connections_accepted == 1


async def test_client_disconnect_mid_stream_leaks_nothing() -> None:
    sim = SimulatedUpstream()
    await sim.start()
    async with httpx.AsyncClient(base_url=sim.base_url, timeout=10.0) as c:
        async with c.stream("POST", "/chat/completions", json=body(sim_fault="stall:2")) as response:
            async for _line in response.aiter_lines():
                break  # leave while the server holds the stream open
        assert (await stream(c, body())).done
    await sim.close()
    assert not sim._connections


# ---------------------------------------------------------------------------------------------------------------
# Tools and structured output
# ---------------------------------------------------------------------------------------------------------------

NESTED_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 3, "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "threshold": {"type": "number", "exclusiveMinimum": 0, "maximum": 1.5},
        "options": {
            "type": "object",
            "properties": {
                "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "minItems": 1},
                "verbose": {"type": "boolean"},
                "note": {"anyOf": [{"type": "string", "maxLength": 5}, {"type": "null"}]},
            },
            "required": ["tags", "verbose"],
            "additionalProperties": False,
        },
        "location": {"$ref": "#/$defs/location"},
        "kind": {"const": "forecast"},
    },
    "required": ["city", "unit", "days", "options", "location"],
    "additionalProperties": False,
    "$defs": {
        "location": {
            "type": "object",
            "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90},
                           "lon": {"type": "number", "minimum": -180, "maximum": 180},
                           "alt": {"type": ["integer", "null"], "multipleOf": 5, "minimum": 0}},
            "required": ["lat", "lon"],
        }
    },
}

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": NESTED_SCHEMA}},
    {"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"q": {"type": "string"}, "ids": {"type": "array", "items": {
            "$ref": "#/definitions/id"}}}, "required": ["q", "ids"], "definitions": {"id": {"type": "integer"}}}}},
    {"type": "function", "function": {"name": "ping"}},
]


def tool_calls_of(out: Streamed) -> dict[int, dict[str, str]]:
    calls: dict[int, dict[str, str]] = {}
    for chunk in out.chunks:
        for tc in chunk["choices"][0]["delta"].get("tool_calls") or [] if chunk.get("choices") else []:
            call = calls.setdefault(tc["index"], {"id": "", "name": "", "arguments": ""})
            call["id"] += tc.get("id") or ""
            call["name"] += tc.get("function", {}).get("name") or ""
            call["arguments"] += tc.get("function", {}).get("arguments") or ""
    return calls


def schema_of(name: str) -> dict[str, Any]:
    return next(t["function"].get("parameters") or {} for t in TOOLS if t["function"]["name"] == name)


async def test_required_tool_call_streams_valid_arguments(client: httpx.AsyncClient) -> None:
    out = await stream(client, {**body(), "tools": TOOLS, "tool_choice": "required"})
    first = out.chunks[0]["choices"][0]["delta"]
    assert first["role"] == "assistant" and first["content"] is None
    assert first["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert first["tool_calls"][0]["id"].startswith("call_") and first["tool_calls"][0]["type"] == "function"
    calls = tool_calls_of(out)
    assert list(calls) == [0]
    args = json.loads(calls[0]["arguments"])
    jsonschema.Draft202012Validator(NESTED_SCHEMA).validate(args)
    assert len(out.chunks) > 4  # arguments arrive in several fragments
    assert out.finish_reason == "tool_calls" and out.done
    again = tool_calls_of(await stream(client, {**body(), "tools": TOOLS, "tool_choice": "required"}))
    assert again == calls  # deterministic, including the call id


async def test_named_tool_choice(client: httpx.AsyncClient) -> None:
    choice = {"type": "function", "function": {"name": "lookup"}}
    calls = tool_calls_of(await stream(client, {**body(), "tools": TOOLS, "tool_choice": choice}))
    assert [c["name"] for c in calls.values()] == ["lookup"]
    jsonschema.Draft7Validator(schema_of("lookup")).validate(json.loads(calls[0]["arguments"]))
    bad = await client.post("/chat/completions", json={**body(), "tools": TOOLS, "tool_choice": {
        "type": "function", "function": {"name": "missing"}}})
    assert bad.status_code == 400


async def test_parallel_tool_calls(client: httpx.AsyncClient) -> None:
    payload = {**body(sim_parallel_tools="true"), "tools": TOOLS, "tool_choice": "required"}
    calls = tool_calls_of(await stream(client, payload))
    assert sorted(calls) == [0, 1, 2]
    assert [calls[i]["name"] for i in range(3)] == ["get_weather", "lookup", "ping"]
    assert len({c["id"] for c in calls.values()}) == 3
    for call in calls.values():
        jsonschema.Draft202012Validator(schema_of(call["name"])).validate(json.loads(call["arguments"]))
    assert json.loads(calls[2]["arguments"]) == {}
    single = tool_calls_of(await stream(client, {**payload, "parallel_tool_calls": False}))
    assert list(single) == [0]


async def test_auto_tool_choice_calls_the_first_tool_then_answers_its_result(client: httpx.AsyncClient) -> None:
    auto = await stream(client, {**body(), "tools": TOOLS, "tool_choice": "auto"})
    calls = tool_calls_of(auto)
    assert [c["name"] for c in calls.values()] == ["get_weather"] and auto.finish_reason == "tool_calls"
    jsonschema.Draft202012Validator(NESTED_SCHEMA).validate(json.loads(calls[0]["arguments"]))
    none = await stream(client, {**body(), "tools": TOOLS, "tool_choice": "none"})
    assert none.text == "".join(full_text()) and not tool_calls_of(none)
    msgs = [*USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "ping", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "pong"}]
    for choice in ("auto", "required"):
        after = await stream(client, {**body(msgs), "tools": TOOLS, "tool_choice": choice})
        assert after.text == 'The tool ping returned "pong". ' + "".join(full_text(messages=msgs))
        assert after.finish_reason == "stop" and not tool_calls_of(after)


async def test_json_schema_output(client: httpx.AsyncClient) -> None:
    payload = {**body(), "response_format": {"type": "json_schema", "json_schema": {
        "name": "forecast", "strict": True, "schema": NESTED_SCHEMA}}}
    out = await stream(client, payload)
    assert len(out.contents) > 3
    jsonschema.Draft202012Validator(NESTED_SCHEMA).validate(json.loads(out.text))
    # Structured output continues literally too.
    partial = out.text[:17]
    cont = await stream(client, {**payload, "messages": [*USER, {"role": "assistant", "content": partial}]})
    assert partial + cont.text == out.text


SCHEMAS: list[dict[str, Any]] = [
    NESTED_SCHEMA,
    {"type": "object", "properties": {"when": {"type": "string", "format": "date-time"},
                                      "mail": {"type": "string", "format": "email"},
                                      "id": {"type": "string", "format": "uuid"},
                                      "n": {"type": "integer", "exclusiveMinimum": 3, "exclusiveMaximum": 6},
                                      "step": {"type": "number", "multipleOf": 0.5, "minimum": 1, "maximum": 4},
                                      "even": {"type": "integer", "multipleOf": 2, "minimum": 5, "maximum": 9}},
     "required": ["when", "n"]},
    {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "minItems": 2, "maxItems": 2},
    {"type": "array", "items": {"enum": ["x", "y"]}, "uniqueItems": True, "minItems": 2},
    {"allOf": [{"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
               {"properties": {"b": {"type": "boolean"}}, "required": ["b"]}]},
    {"oneOf": [{"type": "object", "properties": {"t": {"const": 1}}, "required": ["t"]}, {"type": "string"}]},
    {"$ref": "#/$defs/node", "$defs": {"node": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 2}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
        "required": ["name"]}}},
    {"type": "null"},
    {"type": "string", "minLength": 30, "maxLength": 31},
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_example_for_schema_validates(schema: dict[str, Any]) -> None:
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    for seed in range(25):
        value = example_for_schema(schema, random.Random(seed))
        validator.validate(value)
        assert value == example_for_schema(schema, random.Random(seed))


# ---------------------------------------------------------------------------------------------------------------
# Non-stream, SDK, thread, shared instance
# ---------------------------------------------------------------------------------------------------------------


async def test_non_stream_matches_stream(client: httpx.AsyncClient) -> None:
    response = await client.post("/chat/completions", json={**body(stream=False), "max_tokens": 9})
    data = response.json()
    assert data["object"] == "chat.completion" and data["model"] == "sim-model"
    assert data["choices"][0]["message"]["content"] == "".join(full_text()[:9])
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 9
    tools = await client.post("/chat/completions", json={**body(stream=False), "tools": TOOLS,
                                                         "tool_choice": "required"})
    message = tools.json()["choices"][0]["message"]
    assert message["content"] is None and tools.json()["choices"][0]["finish_reason"] == "tool_calls"
    jsonschema.validate(json.loads(message["tool_calls"][0]["function"]["arguments"]), NESTED_SCHEMA)
    literal = await client.post("/chat/completions", json=body(
        [*USER, {"role": "assistant", "content": "".join(full_text()[:4])}], stream=False))
    assert literal.json()["choices"][0]["message"]["content"] == "".join(full_text()[4:])


def test_openai_sdk_stream_and_thread_lifecycle() -> None:
    from openai import OpenAI

    handle = SimulatedUpstream.start_in_thread()
    try:
        sdk = OpenAI(base_url=handle.base_url, api_key="x", max_retries=0)
        events = sdk.chat.completions.create(model="sim-model", messages=USER, stream=True,  # type: ignore[arg-type]
                                             stream_options={"include_usage": True},
                                             metadata={"sim_length": "12"})
        text, finish, usage = "", None, None
        for event in events:
            if event.choices:
                text += event.choices[0].delta.content or ""
                finish = event.choices[0].finish_reason or finish
            if event.usage:
                usage = event.usage
        assert text == "".join(full_text(length=12)) and finish == "stop"
        assert usage is not None and usage.completion_tokens == 12
        completion = sdk.chat.completions.create(model="sim-model", messages=USER,  # type: ignore[arg-type]
                                                 metadata={"sim_length": "12"})
        assert completion.choices[0].message.content == text
        base_url = handle.base_url
    finally:
        handle.stop()
    handle.stop()  # idempotent
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base_url}/models", timeout=5.0)


async def test_shared_upstream_is_one_per_loop() -> None:
    first, second = await asyncio.gather(shared_upstream(), shared_upstream())
    assert first is second and first is await shared_upstream()
    async with httpx.AsyncClient(base_url=first.base_url, timeout=10.0) as c:
        assert (await c.get("/models")).status_code == 200
    await close_shared_upstream()
    fresh = await shared_upstream()
    assert fresh is not first
    await close_shared_upstream()


# ---------------------------------------------------------------------------------------------------------------
# Failure rate, prompt cache and server-side overrides (what the routing benchmark drives)
# ---------------------------------------------------------------------------------------------------------------

async def test_fail_rate_refuses_that_share_with_503(client: httpx.AsyncClient) -> None:
    statuses = [(await stream(client, body(sim_length="2", sim_fail_rate="0.3"))).status for _ in range(60)]
    refused = statuses.count(503)
    assert set(statuses) <= {200, 503}
    assert 6 <= refused <= 30  # 0.3 of 60 = 18, drawn from a seeded generator: the same every run
    assert all(s == 200 for s in [(await stream(client, body(sim_length="2", sim_fail_rate="0"))).status
                                  for _ in range(10)])


async def test_prompt_cache_reports_the_longest_prefix_seen(client: httpx.AsyncClient) -> None:
    long_system = {"role": "system", "content": "policy " * 400}
    first = [long_system, {"role": "user", "content": "question one"}]
    second = [*first, {"role": "assistant", "content": "answer one"}, {"role": "user", "content": "question two"}]

    async def cached(messages: list[dict[str, Any]], **meta: str) -> tuple[int, int]:
        payload = {**body(messages, sim_length="3", **meta), "stream_options": {"include_usage": True}}
        usage = (await stream(client, payload)).chunks[-1]["usage"]
        return usage["prompt_tokens_details"]["cached_tokens"], usage["prompt_tokens"]

    assert (await cached(first, sim_prompt_cache="true"))[0] == 0  # nothing seen yet
    hit, prompt = await cached(second, sim_prompt_cache="true")
    assert 0 < hit < prompt  # the first turn's two messages, not the new ones
    assert hit >= 600  # the long system message is most of it
    assert (await cached(second))[0] == 0  # without the control: no cache


async def test_overrides_apply_over_request_metadata(sim: SimulatedUpstream, client: httpx.AsyncClient) -> None:
    sim.overrides["sim_fault"] = "http:500"
    assert (await stream(client, body(sim_length="2", sim_fault="none"))).status == 500
    sim.overrides.clear()
    assert (await stream(client, body(sim_length="2"))).status == 200
