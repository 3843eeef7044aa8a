"""Anthropic Messages API adapter (`POST /v1/messages`, SSE).

Request: IR -> Messages body (system prompt on top, strictly alternating user/assistant turns, tool_use /
tool_result blocks, thinking blocks for same-provider reasoning, JSON schema as a forced tool or natively).
Stream: message_start -> content_block_start/delta/stop ... -> message_delta -> message_stop. Only message_stop
marks a complete answer; anything that ends before it is `truncated`.

Options (`config.AnthropicOptions`): max_tokens (default 4096), thinking (bool: map reasoning effort to extended
thinking), thinking_budgets ({effort: tokens}), literal_continuation (default true; false for Claude 4.6+, which
rejects assistant prefill), native_json_schema (true: `output_config.format`; "output_format": the older beta
field), beta (value of the `anthropic-beta` header), anthropic_version.
See docs/providers/anthropic.md.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from unbroken.config import AnthropicOptions
from unbroken.ir import (
    Delta,
    FinishReason,
    FunctionCall,
    FunctionCallOutput,
    GenerationRequest,
    ImagePart,
    Message,
    Reasoning,
    ReasoningDelta,
    ReasoningSeal,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
    UpstreamModel,
)
from unbroken.providers import claude
from unbroken.providers._http import open_sse, parse_json
from unbroken.providers._shared import DEFAULT_MAX_TOKENS, PrefixSkip, WhitespaceJoin, parse_arguments, warn_dropped
from unbroken.providers.base import Capabilities, ErrorKind, Provider, ProviderError

DEFAULT_BASE_URL = "https://api.anthropic.com"
PROVIDER = "anthropic"

# providers.md §9: stop_reason -> finish reason.
STOP_REASONS: dict[str, FinishReason] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "compaction": "stop",
    "tool_use": "tool_calls",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "refusal": "content_filter",
}

# `error.type` of an error body or an in-stream `event: error` -> kind.
ERROR_TYPES: dict[str, ErrorKind] = {
    "overloaded_error": "overloaded",
    "api_error": "server_error",
    "rate_limit_error": "rate_limited",
    "invalid_request_error": "bad_request",
    "authentication_error": "auth",
    "permission_error": "auth",
    "not_found_error": "not_found",
    "request_too_large": "context_length",
    "timeout_error": "timeout",
    "billing_error": "quota",
}

_CONTEXT_MARKERS = ("prompt is too long", "exceed context limit", "context window")


def _refine_message(kind: ErrorKind, message: str) -> ErrorKind:
    """Body text that means more than its HTTP status / error type."""
    low = message.lower()
    if kind == "bad_request":
        if any(m in low for m in _CONTEXT_MARKERS):
            return "context_length"
        if "prefill" in low:
            return "prefill_rejected"
        if "credit balance" in low:
            return "quota"
    return kind


def _refine(status: int, body: Any, err: ProviderError) -> ProviderError | None:
    error = body.get("error") if isinstance(body, dict) else None
    etype = error.get("type") if isinstance(error, dict) else None
    kind: ErrorKind = err.kind
    if etype == "overloaded_error":
        kind = "overloaded"
    kind = _refine_message(kind, err.message)
    if kind == err.kind:
        return None
    return ProviderError(kind, err.message, status=status, retry_after=err.retry_after, code=err.code)


def stream_error(data: Any) -> ProviderError:
    """An in-band `event: error` after HTTP 200."""
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return ProviderError("server_error", "upstream sent an error event", mid_stream=True)
    etype = str(error.get("type") or "")
    message = str(error.get("message") or etype or "upstream error")
    kind = _refine_message(ERROR_TYPES.get(etype, "server_error"), message)
    return ProviderError(kind, message, code=etype or None, mid_stream=True)


# ---------------------------------------------------------------------------------------------------------------
# Request
# ---------------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Plan:
    """What the stream parser must know about how the request was built."""

    json_tool: str | None = None  # forced tool carrying the JSON document; its input is streamed as text
    join: WhitespaceJoin | None = None  # literal continuation: whitespace bookkeeping
    skip: PrefixSkip | None = None  # JSON continuation: drop the re-generated prefix
    body: dict[str, Any] = field(default_factory=dict)


def _image_block(part: ImagePart) -> dict[str, Any]:
    if part.is_data_url:
        head, sep, data = part.url[5:].partition(";base64,")
        if not sep:
            raise ProviderError("bad_request", "image data URLs must be base64 encoded")
        return {"type": "image", "source": {"type": "base64", "media_type": head or "image/png", "data": data}}
    if part.url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": part.url}}
    raise ProviderError("bad_request", "image URLs must be https:// or data: URLs")


_BLOCK_KINDS: dict[str, claude.BlockKind] = {"text": "text", "tool_use": "tool_call", "tool_result": "tool_result",
                                            "thinking": "reasoning", "redacted_thinking": "reasoning"}


def _block_kind(block: dict[str, Any]) -> claude.BlockKind:
    return _BLOCK_KINDS.get(block.get("type", ""), "other")


def _text_block(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


class AnthropicProvider(Provider):
    name: ClassVar[str] = PROVIDER

    # Claude <= 4.5 continues a prefill literally; set `literal_continuation: false` for 4.6+.
    default_capabilities = Capabilities(literal_continuation=True, image_urls=True, native_json_schema=False)

    @property
    def options(self) -> AnthropicOptions:
        return self.deployment.options_as(AnthropicOptions)

    def url(self) -> str:
        return (self.deployment.base_url or DEFAULT_BASE_URL).rstrip("/") + "/v1/messages"

    def headers(self) -> dict[str, str]:
        headers = {
            "x-api-key": self.deployment.api_key or "",
            "anthropic-version": self.options.anthropic_version,
            "content-type": "application/json",
            "accept": "text/event-stream",
        }
        beta = self.options.beta
        if beta:
            headers["anthropic-beta"] = beta if isinstance(beta, str) else ",".join(beta)
        return headers

    def build(self, request: GenerationRequest) -> _Plan:
        """The native body plus what the stream parser needs to undo (forced JSON tool, stripped whitespace)."""
        opts = self.options
        plan = _Plan()
        body: dict[str, Any] = {"model": self.deployment.model, "stream": True}
        plan.body = body

        turns = claude.Turns(_block_kind, _text_block)
        for item in request.items:
            if isinstance(item, Message):
                if item.role not in ("system", "developer"):  # those go into the system prompt
                    turns.add(item.role, claude.content_blocks(item, text=_text_block, image=_image_block))
            elif isinstance(item, FunctionCall):
                turns.add("assistant", [{"type": "tool_use", "id": item.call_id, "name": item.name,
                                         "input": parse_arguments(item.arguments)}])
            elif isinstance(item, FunctionCallOutput):
                turns.add("user", [{"type": "tool_result", "tool_use_id": item.call_id, "content": item.output}])
            elif isinstance(item, Reasoning):
                form = claude.reasoning_form(item, PROVIDER)
                if form == "signed":
                    turns.add("assistant", [{"type": "thinking", "thinking": item.text,
                                             "signature": item.signature}])
                elif form == "redacted":
                    turns.add("assistant", [{"type": "redacted_thinking", "data": item.encrypted_content}])

        # Tools; structured output natively or as a forced tool whose input is the document.
        fmt = request.text_format
        native_json = opts.native_json_schema
        tp = claude.tool_plan(request, native_json=bool(native_json))
        plan.json_tool = tp.json_tool
        if any(t.strict for t in request.tools):
            warn_dropped("tools[].strict", "not sent to Anthropic")
        tools: list[dict[str, Any]] = [
            {"name": t.name, "input_schema": t.parameters or {"type": "object", "properties": {}},
             **({"description": t.description} if t.description else {})}
            for t in tp.tools
        ]
        if tp.json_offered:
            tools.append({"name": tp.json_tool, "input_schema": tp.json_schema, "description": tp.json_description})
        if fmt is not None and native_json:
            schema_format = {"type": "json_schema", "schema": fmt.schema}
            if native_json == "output_format":
                body["output_format"] = schema_format
            else:
                body["output_config"] = {"format": schema_format}
        if tools:
            assert tp.mode is not None
            tool_choice: dict[str, Any] = {"type": tp.mode, **({"name": tp.name} if tp.name else {})}
            if request.parallel_tool_calls is False and tp.mode != "none":
                tool_choice["disable_parallel_tool_use"] = True
            body["tools"] = tools
            body["tool_choice"] = tool_choice

        # Continuation of a cut answer.
        if request.continuation is not None:
            resume = claude.resume(request.continuation, json_tool=plan.json_tool is not None)
            turns.continue_answer(resume)
            plan.join, plan.skip = resume.join, resume.skip

        body["messages"] = turns.finish()
        system = claude.system_texts(request)
        if system:
            body["system"] = "\n\n".join(system)

        # max_tokens is required; thinking must fit under it.
        settings = claude.sampling(request, opts, prefill=plan.join is not None, forced_tool=tp.forced,
                                   unsigned_tool_turn=turns.unsigned_tool_turn(),
                                   default_max_tokens=DEFAULT_MAX_TOKENS)
        body["max_tokens"] = settings.max_tokens
        if settings.thinking_budget is not None:
            body["thinking"] = {"type": "enabled", "budget_tokens": settings.thinking_budget}
        if settings.temperature is not None:
            body["temperature"] = settings.temperature
        if settings.top_p is not None:
            body["top_p"] = settings.top_p
        return plan

    # -- stream --------------------------------------------------------------------------------------------------

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        plan = self.build(request)
        async with open_sse(self.http, "POST", self.url(), headers=self.headers(), json_body=plan.body,
                            refine=_refine) as events:
            async for delta in parse_stream(events, plan):
                yield delta


async def parse_stream(events: AsyncIterator[Any], plan: _Plan | None = None) -> AsyncIterator[Delta]:
    """SSE events -> deltas. Ends with Usage then Finish on message_stop; raises on anything else."""
    plan = plan or _Plan()
    started = False
    message_id: str | None = None
    blocks: dict[int, str] = {}  # content block index -> "text" | "tool" | "json" | "thinking" | "other"
    tool_index: dict[int, int] = {}  # content block index -> tool call index (0, 1, ... in order of appearance)
    usage: dict[str, int] = {}
    stop_reason: str | None = None
    real_tool_calls = 0

    def text(value: str) -> str:
        if plan.join is not None:
            value = plan.join(value)
        return value

    async for event in events:
        if not event.data.strip():
            continue
        data = parse_json(event.data)
        if not isinstance(data, dict):
            raise ProviderError("malformed", "upstream event is not a JSON object", mid_stream=True)
        etype = data.get("type") or event.event

        if etype == "content_block_delta":  # the hot path first
            index = data.get("index")
            delta = data.get("delta") or {}
            dtype = delta.get("type")
            kind = blocks.get(index) if isinstance(index, int) else None
            if not started or kind is None or not isinstance(index, int):
                raise ProviderError("malformed", "content_block_delta outside an open content block",
                                    mid_stream=True)
            if dtype == "text_delta":
                piece = delta.get("text") or ""
                if kind == "text" and piece:
                    piece = text(piece)
                    if piece:
                        yield TextDelta(piece)
            elif dtype == "input_json_delta":
                piece = delta.get("partial_json") or ""
                if not piece:
                    continue
                if kind == "tool":
                    yield ToolCallDelta(tool_index[index], piece)
                elif kind == "json":
                    if plan.skip is not None:
                        piece = plan.skip(piece)
                    if piece:
                        yield TextDelta(piece)
                else:
                    raise ProviderError("malformed", "input_json_delta for a block that is not a tool call",
                                        mid_stream=True)
            elif dtype == "thinking_delta":
                piece = delta.get("thinking") or ""
                if piece:
                    yield ReasoningDelta(piece)
            elif dtype == "signature_delta":
                if delta.get("signature"):
                    yield ReasoningSeal(PROVIDER, signature=str(delta["signature"]))
            # citations_delta and future delta types carry nothing the IR has a place for.
        elif etype == "content_block_start":
            index = data.get("index")
            block = data.get("content_block") or {}
            btype = block.get("type")
            if not started or not isinstance(index, int):
                raise ProviderError("malformed", "content_block_start before message_start", mid_stream=True)
            if btype == "text":
                blocks[index] = "text"
                if block.get("text"):
                    piece = text(str(block["text"]))
                    if piece:
                        yield TextDelta(piece)
            elif btype == "tool_use":
                name = str(block.get("name") or "")
                if plan.json_tool is not None and name == plan.json_tool:
                    blocks[index] = "json"
                else:
                    blocks[index] = "tool"
                    tool_index[index] = real_tool_calls
                    real_tool_calls += 1
                    yield ToolCallStart(tool_index[index], str(block.get("id") or ""), name)
                    if block.get("input"):
                        # Some gateways deliver the whole input here instead of as deltas.
                        yield ToolCallDelta(tool_index[index], json.dumps(block["input"]))
            elif btype == "thinking":
                blocks[index] = "thinking"
                if block.get("thinking"):
                    yield ReasoningDelta(str(block["thinking"]))
            elif btype == "redacted_thinking":
                blocks[index] = "other"
                yield ReasoningSeal(PROVIDER, encrypted_content=str(block.get("data") or ""))
            else:
                blocks[index] = "other"  # server tools and future block types: nothing to forward
        elif etype == "content_block_stop" or etype == "ping":
            continue
        elif etype == "message_start":
            message = data.get("message") or {}
            if started:
                # An identical repeat before any content is harmless (seen behind some proxies); a second
                # message spliced into an open one is a retrying proxy mixing two answers: never join those.
                if message.get("id") == message_id and not blocks:
                    continue
                raise ProviderError("malformed", "a second message_start arrived inside an open message",
                                    mid_stream=True)
            started = True
            message_id = message.get("id")
            if message.get("model"):
                yield UpstreamModel(str(message["model"]))
            _take_usage(usage, message.get("usage"))
        elif etype == "message_delta":
            if not started:
                raise ProviderError("malformed", "message_delta before message_start", mid_stream=True)
            reason = (data.get("delta") or {}).get("stop_reason")
            if reason:
                stop_reason = str(reason)
            _take_usage(usage, data.get("usage"))
        elif etype == "message_stop":
            if not started:
                raise ProviderError("malformed", "message_stop before message_start", mid_stream=True)
            yield claude.usage(usage.get("input_tokens", 0), usage.get("output_tokens", 0),
                               usage.get("cache_read_input_tokens", 0), usage.get("cache_creation_input_tokens", 0))
            yield claude.finish(STOP_REASONS.get(stop_reason or "", "stop"), stop_reason, tool_calls=real_tool_calls)
            return
        elif etype == "error":
            raise stream_error(data)
        # Unknown event types are ignored, as the SDKs do.
    raise ProviderError("truncated", "upstream stream ended before message_stop", mid_stream=True)


def _take_usage(acc: dict[str, int], usage: Any) -> None:
    """Usage in message_start and message_delta is cumulative: the last value of each field wins."""
    if not isinstance(usage, dict):
        return
    for key in ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"):
        value = usage.get(key)
        if isinstance(value, int):
            acc[key] = value
