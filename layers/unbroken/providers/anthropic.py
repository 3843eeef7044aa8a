"""Anthropic Messages API adapter (`POST /v1/messages`, SSE).

Request: IR -> Messages body (system prompt on top, strictly alternating user/assistant turns, tool_use /
tool_result blocks, thinking blocks for same-provider reasoning, JSON schema as a forced tool or natively).
Stream: message_start -> content_block_start/delta/stop ... -> message_delta -> message_stop. Only message_stop
marks a complete answer; anything that ends before it is `truncated`.

Options (deployment.options): max_tokens (default 4096), thinking (bool: map reasoning effort to extended
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

from unbroken.ir import (
    CONTINUE_INSTRUCTION,
    Delta,
    Finish,
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
    TextPart,
    ToolCallDelta,
    ToolCallStart,
    UpstreamModel,
    Usage,
)
from unbroken.providers._http import iter_sse, open_stream, parse_json
from unbroken.providers._shared import (
    DEFAULT_MAX_TOKENS,
    PrefixSkip,
    WhitespaceJoin,
    fit_thinking,
    json_tool_name,
    json_tool_schema,
    log,
    parse_arguments,
    split_prefill,
    thinking_budget,
    warn_dropped,
)
from unbroken.providers.base import Capabilities, ErrorKind, Provider, ProviderError

DEFAULT_BASE_URL = "https://api.anthropic.com"
API_VERSION = "2023-06-01"
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


def _content_blocks(msg: Message) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    for part in msg.content:
        if isinstance(part, TextPart):
            # Anthropic rejects empty text blocks.
            if part.text:
                blocks.append({"type": "text", "text": part.text})
        elif msg.role == "user":
            if part.detail != "auto":
                warn_dropped("input_image.detail", "Anthropic has no image detail setting")
            blocks.append(_image_block(part))
        else:
            warn_dropped("input_image", "Anthropic accepts images in user turns only")
    return blocks


class _Turns:
    """Builds strictly alternating turns: consecutive blocks of one role are merged into one message."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    def add(self, role: str, blocks: list[dict[str, Any]]) -> None:
        if not blocks:
            return
        if self.messages and self.messages[-1]["role"] == role:
            self.messages[-1]["content"].extend(blocks)
        else:
            self.messages.append({"role": role, "content": list(blocks)})

    def strip_last_assistant(self, block_types: set[str]) -> None:
        if self.messages and self.messages[-1]["role"] == "assistant":
            kept = [b for b in self.messages[-1]["content"] if b.get("type") not in block_types]
            if kept:
                self.messages[-1]["content"] = kept
            else:
                self.messages.pop()

    def finish(self) -> list[dict[str, Any]]:
        for msg in self.messages:
            if msg["role"] == "user":
                # tool_result blocks must open the user turn that answers the tool_use turn.
                msg["content"].sort(key=lambda b: b.get("type") != "tool_result")
        return self.messages


class AnthropicProvider(Provider):
    name: ClassVar[str] = PROVIDER

    # Claude <= 4.5 continues a prefill literally; set `literal_continuation: false` for 4.6+.
    default_capabilities = Capabilities(literal_continuation=True, image_urls=True, native_json_schema=False)

    def url(self) -> str:
        return (self.deployment.base_url or DEFAULT_BASE_URL).rstrip("/") + "/v1/messages"

    def headers(self) -> dict[str, str]:
        headers = {
            "x-api-key": self.deployment.api_key or "",
            "anthropic-version": str(self.deployment.option("anthropic_version", API_VERSION)),
            "content-type": "application/json",
            "accept": "text/event-stream",
        }
        beta = self.deployment.option("beta")
        if beta:
            headers["anthropic-beta"] = beta if isinstance(beta, str) else ",".join(beta)
        return headers

    def build(self, request: GenerationRequest) -> _Plan:
        """The native body plus what the stream parser needs to undo (forced JSON tool, stripped whitespace)."""
        opts = self.deployment.options
        plan = _Plan()
        body: dict[str, Any] = {"model": self.deployment.model, "stream": True}
        plan.body = body

        system: list[str] = [request.instructions] if request.instructions else []
        turns = _Turns()
        for item in request.items:
            if isinstance(item, Message):
                if item.role in ("system", "developer"):
                    # Anthropic has one system prompt; in-conversation system text joins it, in order.
                    if item.text():
                        system.append(item.text())
                    if any(isinstance(p, ImagePart) for p in item.content):
                        warn_dropped("input_image", "images in system messages are not supported")
                else:
                    turns.add(item.role, _content_blocks(item))
            elif isinstance(item, FunctionCall):
                turns.add("assistant", [{"type": "tool_use", "id": item.call_id, "name": item.name,
                                         "input": parse_arguments(item.arguments)}])
            elif isinstance(item, FunctionCallOutput):
                turns.add("user", [{"type": "tool_result", "tool_use_id": item.call_id, "content": item.output}])
            elif isinstance(item, Reasoning):
                # Signed thinking only goes back where it came from; everything else is dropped quietly.
                if item.provider != PROVIDER:
                    continue
                if item.signature:
                    turns.add("assistant", [{"type": "thinking", "thinking": item.text,
                                             "signature": item.signature}])
                elif item.encrypted_content:
                    turns.add("assistant", [{"type": "redacted_thinking", "data": item.encrypted_content}])

        # Structured output: native, or a forced tool whose input is the document.
        fmt = request.text_format
        native_json = opts.get("native_json_schema")
        tools = [
            {"name": t.name, "input_schema": t.parameters or {"type": "object", "properties": {}},
             **({"description": t.description} if t.description else {})}
            for t in request.tools
            if request.tool_choice.allowed is None or t.name in request.tool_choice.allowed
        ]
        if any(t.strict for t in request.tools):
            warn_dropped("tools[].strict", "not sent to Anthropic")
        tool_choice: dict[str, Any] | None = None
        if tools:
            choice = request.tool_choice
            if choice.name:
                tool_choice = {"type": "tool", "name": choice.name}
            elif choice.mode == "required":
                tool_choice = {"type": "any"}
            elif choice.mode == "none":
                tool_choice = {"type": "none"}
            else:
                tool_choice = {"type": "auto"}
        if fmt is not None and native_json:
            schema_format = {"type": "json_schema", "schema": fmt.schema}
            if native_json == "output_format":
                body["output_format"] = schema_format
            else:
                body["output_config"] = {"format": schema_format}
        elif fmt is not None:
            plan.json_tool = json_tool_name(fmt)
            json_tool: dict[str, Any] = {"name": plan.json_tool, "input_schema": json_tool_schema(fmt),
                                         "description": fmt.description or "Respond with this JSON document."}
            if tool_choice is None or tool_choice["type"] == "none":
                tools, tool_choice = [json_tool], {"type": "tool", "name": plan.json_tool}
            elif tool_choice["type"] in ("auto", "any"):
                # The model must answer through a tool: one of the caller's or the JSON one.
                tools, tool_choice = [*tools, json_tool], {"type": "any"}
        if tools:
            body["tools"] = tools
            assert tool_choice is not None
            if request.parallel_tool_calls is False and tool_choice["type"] != "none":
                tool_choice["disable_parallel_tool_use"] = True
            body["tool_choice"] = tool_choice

        # Continuation of a cut answer.
        cont = request.continuation
        if cont is not None:
            kept, stripped = split_prefill(cont)
            if plan.json_tool is not None:
                # A tool input cannot be prefilled: the document is generated again and the sent part skipped.
                plan.skip = PrefixSkip(cont.text)
            elif cont.literal:
                # Prefill and thinking exclude each other: the prefilled turn keeps no thinking blocks.
                turns.strip_last_assistant({"thinking", "redacted_thinking"})
                # Anthropic 400s on a final assistant turn ending in whitespace; the client already has it.
                turns.add("assistant", [{"type": "text", "text": kept}] if kept else [])
                plan.join = WhitespaceJoin(stripped if kept else "")
            else:
                turns.add("assistant", [{"type": "text", "text": kept}] if kept else [])
                turns.add("user", [{"type": "text", "text": CONTINUE_INSTRUCTION}])

        body["messages"] = turns.finish()
        if system:
            body["system"] = "\n\n".join(system)

        # max_tokens is required; thinking must fit under it.
        budget = thinking_budget(request.reasoning_effort, opts) if opts.get("thinking") else None
        if budget is not None and plan.join is not None:
            warn_dropped("reasoning.effort", "extended thinking cannot be combined with assistant prefill")
            budget = None
        if budget is not None and tool_choice is not None and tool_choice["type"] in ("any", "tool"):
            warn_dropped("reasoning.effort", "extended thinking cannot be combined with a forced tool choice")
            budget = None
        if budget is not None and _unsigned_tool_turn(body["messages"]):
            # With thinking on, Claude requires the last tool-calling turn to open with its (signed) thinking;
            # history from another provider has none to give.
            warn_dropped("reasoning.effort", "the last tool-calling turn carries no Anthropic thinking block")
            budget = None
        if request.reasoning_effort and request.reasoning_effort != "none" and not opts.get("thinking"):
            log.debug("reasoning effort ignored: thinking is not enabled for this deployment")
        default_max = int(opts.get("max_tokens", DEFAULT_MAX_TOKENS))
        budget, max_tokens = fit_thinking(budget, request.max_output_tokens, default_max)
        body["max_tokens"] = max_tokens
        if budget is not None:
            body["thinking"] = {"type": "enabled", "budget_tokens": budget}
            # With thinking, temperature must stay 1 and top_p >= 0.95: leave both to the upstream.
            if request.temperature is not None:
                warn_dropped("temperature", "not adjustable with extended thinking")
            if request.top_p is not None:
                warn_dropped("top_p", "not adjustable with extended thinking")
        else:
            if request.temperature is not None:
                body["temperature"] = request.temperature
            if request.top_p is not None:
                body["top_p"] = request.top_p
        return plan

    # -- stream --------------------------------------------------------------------------------------------------

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        plan = self.build(request)
        async with open_stream(self.http, "POST", self.url(), headers=self.headers(), json_body=plan.body,
                               refine=_refine) as response:
            async for delta in parse_stream(iter_sse(response), plan):
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
            if not started or kind is None:
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
            yield Usage(
                input_tokens=usage.get("input_tokens", 0) + usage.get("cache_read_input_tokens", 0)
                + usage.get("cache_creation_input_tokens", 0),
                output_tokens=usage.get("output_tokens", 0),
                cached_input_tokens=usage.get("cache_read_input_tokens", 0),
            )
            reason = STOP_REASONS.get(stop_reason or "", "stop")
            if reason == "tool_calls" and real_tool_calls == 0:
                reason = "stop"  # only the JSON-output tool was called: to the client that is a message
            yield Finish(reason, raw=stop_reason)
            return
        elif etype == "error":
            raise stream_error(data)
        # Unknown event types are ignored, as the SDKs do.
    raise ProviderError("truncated", "upstream stream ended before message_stop", mid_stream=True)


def _unsigned_tool_turn(messages: list[dict[str, Any]]) -> bool:
    """The last assistant turn calls a tool but does not start with a thinking block."""
    last = next((m for m in reversed(messages) if m["role"] == "assistant"), None)
    if last is None or not any(b.get("type") == "tool_use" for b in last["content"]):
        return False
    return last["content"][0].get("type") not in ("thinking", "redacted_thinking")


def _take_usage(acc: dict[str, int], usage: Any) -> None:
    """Usage in message_start and message_delta is cumulative: the last value of each field wins."""
    if not isinstance(usage, dict):
        return
    for key in ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"):
        value = usage.get(key)
        if isinstance(value, int):
            acc[key] = value
