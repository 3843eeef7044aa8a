"""One way to drive both client-facing endpoints in scenario and chaos tests: `/v1/responses` (strict SSE parser:
dense sequence numbers, spec-valid events, one terminal event, `[DONE]`) and `/v1/chat/completions` (strict raw
chunk reader), each boiled down to the same `Outcome` so a scenario can be written once and run over both.

The simulated upstream keys its fault counters and its recorded requests by `metadata.sim_request` (the router
sets it to the response id unless the request brings its own); `run` gives every request its own key, so a test can
list the upstream requests one client request caused, on either endpoint, even when it ended in an HTTP error."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.integration.test_chat_completions import read_chat_stream
from tests.support.client import TIMEOUT, headers
from tests.support.sse import Stream, assert_well_formed, parse_sse
from unbroken.simulator import SimulatedUpstream, input_key_of, simulated_tokens

ENDPOINTS = ("responses", "chat")
RECOVERY = {"x-unbroken-recovery-events": "true"}
# chat finish_reason -> the Open Responses status it stands for
_CHAT_STATUS = {"stop": "completed", "tool_calls": "completed", "length": "incomplete",
                "content_filter": "incomplete"}


@dataclass
class Outcome:
    """What a client got, whichever endpoint it used."""

    endpoint: str
    http_status: int
    status: str = ""  # completed | incomplete | failed (empty for an HTTP error)
    reason: str | None = None  # incomplete_details.reason, or the chat finish_reason
    text: str = ""
    trace_id: str = ""  # the `sim_request` key of the upstream requests made for this response
    response_id: str = ""
    model: str = ""
    usage: dict[str, Any] = field(default_factory=dict)
    accounting: dict[str, Any] | None = None  # the `router` field (responses, opted in)
    recovery_events: list[dict[str, Any]] = field(default_factory=list)
    tool_calls: list[dict[str, str]] = field(default_factory=list)
    messages: int = 0  # message items in the output (responses): a continued answer stays one item
    item_statuses: list[str] = field(default_factory=list)  # of the output items (responses)
    error: dict[str, Any] | None = None
    raw_error: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    last_sequence_number: int = -1


def user_messages(prompt: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": prompt}]


def reference_text(prompt: str, *, seed: str = "7", length: int) -> str:
    """The fault-free answer, from the simulated upstream's own generator (the router is what is under test)."""
    return "".join(simulated_tokens(seed, input_key_of(user_messages(prompt)), length))


def reference_tokens(prompt: str, *, seed: str = "7", length: int) -> list[str]:
    return simulated_tokens(seed, input_key_of(user_messages(prompt)), length)


def responses_body(model: str, prompt: str, metadata: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "input": prompt, **extra}
    if metadata:
        body["metadata"] = metadata
    return body


def chat_body(model: str, prompt: str, metadata: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": user_messages(prompt),
                            "stream_options": {"include_usage": True}, **extra}
    if metadata:
        body["metadata"] = metadata
    return body


def stream_responses(client: httpx.Client, base_url: str, body: dict[str, Any]) -> Outcome:
    with client.stream("POST", f"{base_url}/responses", json={**body, "stream": True},
                       headers=headers(**RECOVERY)) as response:
        raw = response.read()
    if response.status_code != 200:
        return _http_error("responses", response, raw)
    assert response.headers["content-type"].startswith("text/event-stream")
    return outcome_of_responses_stream(raw)


def outcome_of_responses_stream(raw: bytes) -> Outcome:
    """Strict: every event spec-valid, `event:` == type, sequence numbers dense from 0, one terminal event last,
    then `[DONE]`, item lifecycles well nested."""
    return outcome_of_stream(parse_sse(raw, allow_extensions=True))


def outcome_of_stream(stream: Stream) -> Outcome:
    """The outcome of a whole /v1/responses event stream (possibly put together from a first connection and a
    resumed one): checks it is well formed, dense from 0, and that the final object agrees with the deltas."""
    seqs = [e["sequence_number"] for e in stream.events]
    assert seqs == list(range(len(seqs))), f"sequence numbers not dense: {seqs[:60]}"
    if stream.events and stream.events[-1]["type"] == "error":
        raise AssertionError(f"the stream ended with an error event and no terminal event: {stream.events[-1]}")
    assert_well_formed(stream)
    response = stream.response
    out = Outcome("responses", 200, status=response["status"], text=stream.text(), response_id=response["id"],
                  model=response["model"], usage=response.get("usage") or {}, accounting=response.get("router"),
                  last_sequence_number=seqs[-1])
    out.reason = (response.get("incomplete_details") or {}).get("reason")
    out.error = response.get("error")
    out.recovery_events = [e for e in stream.events if e["type"].startswith("router:")]
    out.messages = sum(1 for i in response["output"] if i["type"] == "message")
    out.item_statuses = [str(i.get("status")) for i in response["output"]]
    out.tool_calls = [{"name": i["name"], "arguments": i["arguments"], "call_id": i["call_id"]}
                      for i in response["output"] if i["type"] == "function_call" and i["status"] == "completed"]
    if out.status == "completed":
        # the streamed deltas and the final object agree
        assert stream.output_text() == out.text
    return out


def stream_chat(client: httpx.Client, base_url: str, body: dict[str, Any]) -> Outcome:
    with client.stream("POST", f"{base_url}/chat/completions", json={**body, "stream": True},
                       headers=headers()) as response:
        raw = response.read()
    if response.status_code != 200:
        return _http_error("chat", response, raw)
    assert response.headers["content-type"].startswith("text/event-stream")
    stream = read_chat_stream(raw)  # strict: data-only frames, one id, [DONE] xor an error last
    assert stream.chunks, "a 200 chat stream without a chunk"
    completion_id = stream.chunks[0]["id"]
    out = Outcome("chat", 200, text=stream.text(), response_id="resp_" + completion_id.removeprefix("chatcmpl-"),
                  model=stream.chunks[-1]["model"])
    if stream.error is not None:
        out.status, out.error = "failed", stream.error
        return out
    finishes = stream.finish_reasons()
    assert len(finishes) == 1, f"expected one finish_reason, got {finishes}"
    out.reason = finishes[0]
    out.status = _CHAT_STATUS[finishes[0]]
    usage_chunks = [c for c in stream.chunks if c.get("usage")]
    if usage_chunks:
        assert usage_chunks == [stream.chunks[-1]], "usage comes once, in the last chunk"
        out.usage = usage_chunks[0]["usage"]
    calls: dict[int, dict[str, str]] = {}
    for chunk in stream.chunks:
        for choice in chunk["choices"]:
            for tc in choice["delta"].get("tool_calls") or []:
                entry = calls.setdefault(tc["index"], {"name": "", "arguments": "", "call_id": ""})
                entry["call_id"] += tc.get("id") or ""
                fn = tc.get("function") or {}
                entry["name"] += fn.get("name") or ""
                entry["arguments"] += fn.get("arguments") or ""
    out.tool_calls = [calls[i] for i in sorted(calls)]
    return out


def _http_error(endpoint: str, response: httpx.Response, raw: bytes) -> Outcome:
    out = Outcome(endpoint, response.status_code, raw_error=raw.decode(errors="replace"),
                  headers=dict(response.headers))
    try:
        out.error = json.loads(raw).get("error")
    except (ValueError, AttributeError):
        pass
    return out


def run(endpoint: str, client: httpx.Client, base_url: str, model: str, prompt: str,
        metadata: dict[str, str] | None = None, **extra: Any) -> Outcome:
    """One streamed request on `endpoint` ("responses" or "chat"); `extra` is added to the body as is.

    The request carries its own `sim_request` key, so the upstream requests it caused can be found even when the
    client only got an HTTP error (no response id)."""
    key = f"scn_{uuid.uuid4().hex}"
    metadata = {"sim_request": key, **(metadata or {})}
    if endpoint == "responses":
        out = stream_responses(client, base_url, responses_body(model, prompt, metadata, **extra))
    else:
        out = stream_chat(client, base_url, chat_body(model, prompt, metadata, **extra))
    out.trace_id = metadata["sim_request"]
    return out


def new_client() -> httpx.Client:
    return httpx.Client(timeout=TIMEOUT)


def upstream_requests(upstream: SimulatedUpstream, trace_id: str) -> list[dict[str, Any]]:
    """The request bodies the simulated upstream received for one response, in order (the recorded window is the
    last 256 requests: enough for one test's requests)."""
    for _ in range(100):
        try:
            recorded = list(upstream.received)  # appended to by the upstream's thread
            break
        except RuntimeError:  # "deque mutated during iteration": take the copy again
            continue
    else:
        raise AssertionError("could not copy the upstream's recorded requests")
    return [b for b in recorded if (b.get("metadata") or {}).get("sim_request") == trace_id]


def served_models(upstream: SimulatedUpstream, trace_id: str) -> list[str]:
    """Which upstream models were asked, in order, for one response (deployment `model`s are unique in tests)."""
    return [b["model"] for b in upstream_requests(upstream, trace_id)]


def fault_free_answer(upstream_url: str, prompt: str, *, seed: str = "7", length: int,
                      **chat_fields: Any) -> tuple[str, list[dict[str, str]]]:
    """(content, tool calls) of the simulated upstream's answer to `prompt`, asked directly, without the router:
    the reference for shapes whose text is not plain prose (json_schema output, tool arguments). `chat_fields`
    are Chat Completions request fields (tools, tool_choice, response_format)."""
    body = {"model": "reference", "messages": user_messages(prompt), "stream": False,
            "metadata": {"sim_seed": seed, "sim_length": str(length)}, **chat_fields}
    with httpx.Client(timeout=TIMEOUT) as client:
        response = client.post(f"{upstream_url}/chat/completions", json=body)
    assert response.status_code == 200, response.text
    message = response.json()["choices"][0]["message"]
    calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"], "call_id": c["id"]}
             for c in message.get("tool_calls") or []]
    return message.get("content") or "", calls
