"""Helpers for the Gemini / Azure / OpenAI Responses / OpenAI Chat adapter tests: run an adapter against a fake and
fold its deltas into a summary, and compute the same summary straight from a recorded Responses or Chat stream (the
expected values never come from the code under test)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.fakes.sse_replay import ScriptedFake, frame_payloads
from unbroken.config import Deployment
from unbroken.ir import (
    Delta,
    Finish,
    GenerationRequest,
    Message,
    ReasoningDelta,
    ReasoningSeal,
    RefusalDelta,
    TextDelta,
    TextPart,
    ToolCallDelta,
    ToolCallStart,
    UpstreamModel,
    Usage,
)
from unbroken.providers import provider_class
from unbroken.providers.base import Provider, ProviderError


@dataclass
class Summary:
    text: str = ""
    refusal: str = ""
    reasoning: str = ""
    summary: str = ""
    seals: list[str] = field(default_factory=list)  # signature or encrypted content, in order
    seal_providers: set[str] = field(default_factory=set)
    calls: list[tuple[str, str, str]] = field(default_factory=list)  # (call_id, name, arguments)
    finish: str | None = None
    usage: Usage | None = None
    usage_count: int = 0
    models: list[str] = field(default_factory=list)
    error: ProviderError | None = None
    deltas: list[Delta] = field(default_factory=list)


def fold(deltas: list[Delta]) -> Summary:
    s = Summary(deltas=list(deltas))
    args: dict[int, list[str]] = {}
    starts: dict[int, ToolCallStart] = {}
    for d in deltas:
        if isinstance(d, TextDelta):
            s.text += d.text
        elif isinstance(d, RefusalDelta):
            s.refusal += d.text
        elif isinstance(d, ReasoningDelta):
            if d.summary:
                s.summary += d.text
            else:
                s.reasoning += d.text
        elif isinstance(d, ReasoningSeal):
            s.seals.append(d.signature or d.encrypted_content or "")
            s.seal_providers.add(d.provider)
        elif isinstance(d, ToolCallStart):
            assert d.index not in starts, "a call index was started twice"
            starts[d.index] = d
            args[d.index] = []
        elif isinstance(d, ToolCallDelta):
            assert d.index in starts, "arguments before the call started"
            args[d.index].append(d.arguments)
        elif isinstance(d, Finish):
            s.finish = d.reason
        elif isinstance(d, Usage):
            s.usage = d
            s.usage_count += 1
        elif isinstance(d, UpstreamModel):
            s.models.append(d.name)
    s.calls = [(starts[i].call_id, starts[i].name, "".join(args[i])) for i in sorted(starts)]
    return s


async def run(provider: Provider, request: GenerationRequest) -> Summary:
    """All deltas of one stream; a ProviderError is kept in the summary with the deltas before it."""
    deltas: list[Delta] = []
    try:
        async for d in provider.stream(request):
            deltas.append(d)
    except ProviderError as exc:
        s = fold(deltas)
        s.error = exc
        return s
    return fold(deltas)


def make_provider(http: httpx.AsyncClient, provider: str, model: str, base_url: str | None, *,
                  api_key: str | None = "test-key", **options: Any) -> Provider:
    dep = Deployment(name=f"{provider}-test", provider=provider, model=model, base_url=base_url, api_key=api_key,
                     options=options)
    return provider_class(provider)(dep, http)


def simple_request(text: str = "Hello", **kw: Any) -> GenerationRequest:
    return GenerationRequest(model="public-model", items=[Message("user", [TextPart(text)])], **kw)


async def stall_then_reset(provider: Provider, fake: ScriptedFake, want_text: str) -> Summary:
    """`fake` is serving a script that stalls: the text sent before the stall arrives and then nothing, until the
    fake is closed and drops the connection, which must surface as a mid-stream connection error (stall timeouts
    belong to the attempt loop). Returns what arrived."""
    seen: list[Delta] = []
    got_all = asyncio.Event()

    async def consume() -> None:
        async for d in provider.stream(simple_request()):
            seen.append(d)
            if fold(seen).text == want_text:
                got_all.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_all.wait(), 10)
    assert not task.done()
    await asyncio.to_thread(fake.close)
    try:
        await asyncio.wait_for(task, 10)
    except ProviderError as exc:
        assert exc.kind == "connection" and exc.mid_stream, exc
    else:
        raise AssertionError("the stream ended without an error after the connection dropped")
    got = fold(seen)
    assert got.finish is None
    return got


async def drain(stream: AsyncIterator[Delta]) -> None:
    async for _ in stream:
        pass


# -- expected values computed from the recordings ---------------------------------------------------------------


@dataclass
class Expected:
    text: str = ""
    refusal: str = ""
    reasoning: str = ""
    summary: str = ""
    seals: list[str] = field(default_factory=list)
    calls: list[tuple[str, str, str]] = field(default_factory=list)
    finish: str | None = None
    usage: dict[str, int] | None = None
    model: str | None = None
    error_code: str | None = None


def expected_responses(frames: list[bytes]) -> Expected:
    """What a Responses stream holds, read directly from its events."""
    e = Expected()
    calls: dict[int, dict[str, Any]] = {}
    for payload in frame_payloads(frames):
        ev = json.loads(payload)
        t = ev.get("type")
        if e.model is None and isinstance(ev.get("response"), dict) and ev["response"].get("model"):
            e.model = ev["response"]["model"]
        if t == "response.output_text.delta":
            e.text += ev["delta"]
        elif t == "response.refusal.delta":
            e.refusal += ev["delta"]
        elif t == "response.reasoning_summary_text.delta":
            e.summary += ev["delta"]
        elif t in ("response.reasoning_text.delta", "response.reasoning.delta"):
            e.reasoning += ev["delta"]
        elif t == "response.output_item.done":
            item = ev["item"]
            if item["type"] == "reasoning" and item.get("encrypted_content"):
                e.seals.append(item["encrypted_content"])
            if item["type"] == "function_call":
                calls[ev["output_index"]] = item
        elif t == "error" and e.error_code is None:
            err = ev.get("error") if isinstance(ev.get("error"), dict) else ev
            e.error_code = err.get("code")
        elif t in ("response.completed", "response.incomplete", "response.failed"):
            resp = ev["response"]
            if t == "response.failed":
                e.error_code = e.error_code or resp["error"]["code"]
                break
            u = resp.get("usage")
            if u:
                e.usage = {"input": u["input_tokens"], "output": u["output_tokens"],
                           "cached": u.get("input_tokens_details", {}).get("cached_tokens", 0),
                           "reasoning": u.get("output_tokens_details", {}).get("reasoning_tokens", 0)}
            if t == "response.incomplete":
                reason = resp["incomplete_details"]["reason"]
                e.finish = "content_filter" if reason == "content_filter" else "length"
            else:
                e.finish = "tool_calls" if calls else "stop"
            break
    e.calls = [(c["call_id"], c["name"], c["arguments"]) for _, c in sorted(calls.items())]
    return e


def expected_chat(frames: list[bytes]) -> Expected:
    """What a Chat Completions stream holds, read directly from its chunks (reasoning as OpenAI-compatible servers
    send it: `reasoning_content` or `reasoning`; Groq's usage inside `x_groq`). Reading stops at an error chunk."""
    e = Expected()
    names: dict[int, tuple[str, str]] = {}
    args: dict[int, str] = {}
    for payload in frame_payloads(frames):
        if payload == "[DONE]":
            break
        chunk = json.loads(payload)
        if e.model is None and chunk.get("model"):
            e.model = chunk["model"]
        if chunk.get("error"):
            err = chunk["error"]
            e.error_code = str(err.get("code") or err.get("type")) if isinstance(err, dict) else "error"
            break
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            e.text += delta.get("content") or ""
            e.refusal += delta.get("refusal") or ""
            e.reasoning += delta.get("reasoning_content") or delta.get("reasoning") or ""
            for tc in delta.get("tool_calls") or []:
                if tc.get("id"):
                    names[tc["index"]] = (tc["id"], tc["function"]["name"])
                args[tc["index"]] = args.get(tc["index"], "") + (tc.get("function", {}).get("arguments") or "")
            if choice.get("finish_reason"):
                e.finish = {"tool_calls": "tool_calls", "length": "length", "content_filter": "content_filter"}.get(
                    choice["finish_reason"], "stop")
        u = chunk.get("usage") or (chunk.get("x_groq") or {}).get("usage")
        if u:
            e.usage = {"input": u["prompt_tokens"], "output": u["completion_tokens"],
                       "cached": (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
                       "reasoning": (u.get("completion_tokens_details") or {}).get("reasoning_tokens", 0)}
    e.calls = [(names[i][0], names[i][1], args.get(i, "")) for i in sorted(names)]
    return e


def usage_dict(u: Usage | None) -> dict[str, int] | None:
    if u is None:
        return None
    return {"input": u.input_tokens, "output": u.output_tokens, "cached": u.cached_input_tokens,
            "reasoning": u.reasoning_tokens}
