"""OpenAI Responses API as an upstream (`POST /v1/responses`, `stream: true`, stateless with `store: false`).

Also the base of Azure OpenAI's Responses style (`providers/azure.py`), which speaks the same wire. Upstream
`sequence_number`s are ignored (the router re-sequences) and items are correlated by `output_index`, never by
`item_id`: some proxies rotate item ids on every event.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from unbroken.config import OpenAIResponsesOptions
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
    RefusalDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
    UpstreamModel,
    Usage,
)
from unbroken.providers._http import open_sse, parse_json
from unbroken.providers.base import Capabilities, ErrorKind, Provider, ProviderError

log = logging.getLogger("unbroken.providers.openai_responses")

# In-band error codes (the `error` event / `response.failed`) → what the attempt loop should do.
_ERROR_CODES: dict[str, ErrorKind] = {
    "insufficient_quota": "quota",
    "server_is_overloaded": "overloaded",
    "slow_down": "overloaded",
    "rate_limit_exceeded": "rate_limited",
    "context_length_exceeded": "context_length",
    "content_filter": "content_filter",
}
_CONTEXT_CODES = {"context_length_exceeded", "string_above_max_length"}
_TERMINAL = {"response.completed", "response.incomplete", "response.failed"}


def refine_http_error(status: int, body: Any, err: ProviderError) -> ProviderError | None:
    """Pre-stream error bodies `{"error": {"message", "type", "code"}}`: quota, context length and content
    filter hide behind 400 / 429."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return None
    code = str(error.get("code") or error.get("type") or "")
    message = str(error.get("message") or err.message)
    if code == "insufficient_quota":
        return ProviderError("quota", message, status=status, code=code)
    if code in _CONTEXT_CODES or "context window" in message or "maximum context length" in message:
        return ProviderError("context_length", message, status=status, code=code)
    if code in ("content_filter", "content_policy_violation"):
        return ProviderError("content_filter", message, status=status, code=code)
    return None


def stream_error(error: Any, fallback: str = "upstream reported an error mid-stream") -> ProviderError:
    """An in-band error: the `error` event (flat `{code, message}` or nested `{error: {...}}`) or the
    `response.error` of `response.failed`."""
    if isinstance(error, dict) and isinstance(error.get("error"), dict):
        error = error["error"]
    if not isinstance(error, dict):
        return ProviderError("server_error", fallback, mid_stream=True)
    code = str(error.get("code") or error.get("type") or "") or None
    message = str(error.get("message") or fallback)
    kind: ErrorKind = _ERROR_CODES.get(code or "", "server_error")
    return ProviderError(kind, message, code=code, mid_stream=True)


class OpenAIResponsesProvider(Provider):
    name = "openai_responses"
    default_base_url = "https://api.openai.com/v1"
    # Tag on reasoning seals: encrypted content can only go back to an upstream of the same tag.
    reasoning_provider = "openai_responses"

    # A trailing assistant message is accepted but restarted, not continued (providers.md §3).
    default_capabilities = Capabilities(literal_continuation=False, image_urls=True, native_json_schema=True)

    # -- request -------------------------------------------------------------------------------------------------

    @property
    def options(self) -> OpenAIResponsesOptions:
        return self.deployment.options_as(OpenAIResponsesOptions)

    def url(self) -> str:
        base = (self.deployment.base_url or self.default_base_url).rstrip("/")
        return f"{base}/responses"

    def params(self) -> dict[str, str] | None:
        return None

    def headers(self) -> dict[str, str]:
        headers = {"content-type": "application/json", "accept": "text/event-stream"}
        if self.deployment.api_key:
            headers["authorization"] = f"Bearer {self.deployment.api_key}"
        return headers

    def build_input(self, request: GenerationRequest) -> tuple[list[dict[str, Any]], bool]:
        """(input items, whether own reasoning is being round-tripped)."""
        items: list[dict[str, Any]] = []
        has_reasoning = False
        for item in request.items:
            if isinstance(item, Message):
                items.append(self._message(item))
            elif isinstance(item, FunctionCall):
                items.append({"type": "function_call", "call_id": item.call_id, "name": item.name,
                              "arguments": item.arguments})
            elif isinstance(item, FunctionCallOutput):
                items.append({"type": "function_call_output", "call_id": item.call_id, "output": item.output})
            elif isinstance(item, Reasoning):
                mapped = self._reasoning(item)
                if mapped is not None:
                    items.append(mapped)
                    has_reasoning = True
        cont = request.continuation
        if cont is not None and cont.text:
            items.append({"type": "message", "role": "assistant",
                          "content": [{"type": "output_text", "text": cont.text}]})
            if not cont.literal:
                items.append({"type": "message", "role": "user",
                              "content": [{"type": "input_text", "text": CONTINUE_INSTRUCTION}]})
        return items, has_reasoning

    def _message(self, msg: Message) -> dict[str, Any]:
        assistant = msg.role == "assistant"
        parts: list[dict[str, Any]] = []
        for p in msg.content:
            if isinstance(p, ImagePart):
                if assistant:
                    log.warning("dropped field: image in an assistant message (deployment %s)",
                                self.deployment.name)
                    continue
                if not p.is_data_url and not self.capabilities.image_urls:
                    raise ProviderError("bad_request", f"deployment {self.deployment.name} accepts images only as "
                                        "data URLs; the router does not fetch image URLs")
                parts.append({"type": "input_image", "image_url": p.url, "detail": p.detail})
            else:
                parts.append({"type": "output_text" if assistant else "input_text", "text": p.text})
        return {"type": "message", "role": msg.role, "content": parts}

    def _reasoning(self, item: Reasoning) -> dict[str, Any] | None:
        # Foreign reasoning (another provider's signatures or text) cannot be verified here: dropped. Own
        # reasoning without encrypted content cannot be resolved with store=false: dropped too.
        if item.provider != self.reasoning_provider or not item.encrypted_content:
            return None
        # No `id`: with store=false an id makes the API look the item up and fail with 404.
        return {"type": "reasoning", "encrypted_content": item.encrypted_content,
                "summary": [{"type": "summary_text", "text": s} for s in item.summary]}

    def build_body(self, request: GenerationRequest) -> dict[str, Any]:
        items, has_reasoning = self.build_input(request)
        body: dict[str, Any] = {"model": self.deployment.model, "input": items, "stream": True, "store": False}
        if request.instructions:
            body["instructions"] = request.instructions
        if request.tools:
            body["tools"] = [
                {k: v for k, v in (
                    ("type", "function"), ("name", t.name), ("description", t.description),
                    ("parameters", t.parameters or {"type": "object", "properties": {}}), ("strict", t.strict),
                ) if v is not None}
                for t in request.tools
            ]
            tc = request.tool_choice
            if tc.name:
                body["tool_choice"] = {"type": "function", "name": tc.name}
            elif tc.allowed is not None:
                body["tool_choice"] = {"type": "allowed_tools", "mode": "required" if tc.mode == "required" else
                                       "auto", "tools": [{"type": "function", "name": n} for n in tc.allowed]}
            else:
                body["tool_choice"] = tc.mode
            if request.parallel_tool_calls is not None:
                body["parallel_tool_calls"] = request.parallel_tool_calls
        if request.max_output_tokens is not None:
            body["max_output_tokens"] = request.max_output_tokens
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.top_p is not None:
            body["top_p"] = request.top_p
        if request.text_format is not None:
            fmt = request.text_format
            spec: dict[str, Any] = {"type": "json_schema", "name": fmt.name, "schema": fmt.schema}
            if fmt.strict is not None:
                spec["strict"] = fmt.strict
            if fmt.description:
                spec["description"] = fmt.description
            body["text"] = {"format": spec}
        if request.reasoning_effort:
            reasoning: dict[str, Any] = {"effort": request.reasoning_effort}
            if request.reasoning_effort != "none":
                reasoning["summary"] = self.options.reasoning_summary
            body["reasoning"] = reasoning
        if request.reasoning_effort or has_reasoning or self.options.include_reasoning:
            # Stateless round trip of reasoning: ask for its encrypted content.
            body["include"] = ["reasoning.encrypted_content"]
        body.update(self.options.extra_body)
        return body

    # -- stream --------------------------------------------------------------------------------------------------

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        body = self.build_body(request)
        async with open_sse(self.http, "POST", self.url(), headers=self.headers(), json_body=body,
                            params=self.params(), refine=refine_http_error) as events:
            async for delta in self.parse_stream(events):
                yield delta

    async def parse_stream(self, events: AsyncIterator[Any]) -> AsyncIterator[Delta]:
        """Responses events → deltas. Healthy: ends with `response.completed` / `response.incomplete`."""
        # output_index → IR call index; output_index → whether any argument text was forwarded.
        calls: dict[int, int] = {}
        args_sent: dict[int, bool] = {}
        warned: set[str] = set()
        model_reported = False
        async for event in events:
            data = event.data
            if not data or not data.strip() or data == "[DONE]":
                continue
            ev = parse_json(data)
            if not isinstance(ev, dict):
                raise ProviderError("malformed", "upstream event is not a JSON object", mid_stream=True)
            etype = ev.get("type") or event.event
            if etype == "response.output_text.delta":
                if ev.get("delta"):
                    yield TextDelta(str(ev["delta"]))
            elif etype == "response.function_call_arguments.delta":
                idx = ev.get("output_index")
                if idx not in calls:
                    raise ProviderError("malformed", "function call arguments for an unknown output item",
                                        mid_stream=True)
                if ev.get("delta"):
                    args_sent[idx] = True
                    yield ToolCallDelta(calls[idx], str(ev["delta"]))
            elif etype in ("response.reasoning_summary_text.delta",):
                if ev.get("delta"):
                    yield ReasoningDelta(str(ev["delta"]), summary=True)
            elif etype in ("response.reasoning_text.delta", "response.reasoning.delta"):
                if ev.get("delta"):
                    yield ReasoningDelta(str(ev["delta"]))
            elif etype == "response.refusal.delta":
                if ev.get("delta"):
                    yield RefusalDelta(str(ev["delta"]))
            elif etype == "response.output_item.added":
                item = ev.get("item") or {}
                itype = item.get("type")
                if itype == "function_call":
                    idx = ev.get("output_index")
                    if not isinstance(idx, int):
                        raise ProviderError("malformed", "function call item without output_index",
                                            mid_stream=True)
                    calls[idx] = len(calls)
                    yield ToolCallStart(calls[idx], str(item.get("call_id") or item.get("id") or ""),
                                        str(item.get("name") or ""))
                    if item.get("arguments"):
                        args_sent[idx] = True
                        yield ToolCallDelta(calls[idx], str(item["arguments"]))
                elif itype not in ("message", "reasoning") and itype not in warned:
                    warned.add(str(itype))
                    log.warning("ignored unsupported output item type %s (deployment %s)", itype,
                                self.deployment.name)
            elif etype in ("response.function_call_arguments.done", "response.output_item.done"):
                async for delta in self._item_done(ev, etype, calls, args_sent):
                    yield delta
            elif etype in ("response.created", "response.in_progress", "response.queued"):
                model = (ev.get("response") or {}).get("model")
                if model and not model_reported:
                    model_reported = True
                    yield UpstreamModel(str(model))
            elif etype == "error":
                raise stream_error(ev)
            elif etype in _TERMINAL:
                resp = ev.get("response") or {}
                if etype == "response.failed":
                    raise stream_error(resp.get("error"), "upstream response failed")
                if resp.get("model") and not model_reported:
                    yield UpstreamModel(str(resp["model"]))
                usage = resp.get("usage")
                if isinstance(usage, dict):
                    yield _usage(usage)
                yield _finish(etype, resp, bool(calls))
                return
            elif etype == "response.custom_tool_call_input.delta":
                if "custom_tool_call_input" not in warned:
                    warned.add("custom_tool_call_input")
                    log.warning("ignored custom tool call input (unsupported item type custom_tool_call), "
                                "deployment %s", self.deployment.name)
            # Anything else (content_part.*, *.done text events, annotations, in_progress...) carries nothing
            # the deltas above have not already given.
        raise ProviderError("truncated", "upstream stream ended without response.completed", mid_stream=True)

    async def _item_done(self, ev: dict[str, Any], etype: str, calls: dict[int, int],
                         args_sent: dict[int, bool]) -> AsyncIterator[Delta]:
        """Close-out events: fill in what a terse upstream only sent at the end (arguments without deltas, a
        call without `output_item.added`), and seal reasoning with its encrypted content."""
        idx = ev.get("output_index")
        if etype == "response.function_call_arguments.done":
            if isinstance(idx, int) and idx in calls and not args_sent.get(idx) and ev.get("arguments"):
                args_sent[idx] = True
                yield ToolCallDelta(calls[idx], str(ev["arguments"]))
            return
        item = ev.get("item") or {}
        if item.get("type") == "function_call" and isinstance(idx, int):
            if idx not in calls:
                calls[idx] = len(calls)
                yield ToolCallStart(calls[idx], str(item.get("call_id") or item.get("id") or ""),
                                    str(item.get("name") or ""))
            if not args_sent.get(idx) and item.get("arguments"):
                args_sent[idx] = True
                yield ToolCallDelta(calls[idx], str(item["arguments"]))
        elif item.get("type") == "reasoning" and item.get("encrypted_content"):
            yield ReasoningSeal(self.reasoning_provider, encrypted_content=str(item["encrypted_content"]))


def _usage(usage: dict[str, Any]) -> Usage:
    return Usage(
        input_tokens=int(usage.get("input_tokens") or 0),
        output_tokens=int(usage.get("output_tokens") or 0),
        cached_input_tokens=int((usage.get("input_tokens_details") or {}).get("cached_tokens") or 0),
        reasoning_tokens=int((usage.get("output_tokens_details") or {}).get("reasoning_tokens") or 0),
    )


def _finish(etype: str, resp: dict[str, Any], made_calls: bool) -> Finish:
    if etype == "response.incomplete" or resp.get("status") == "incomplete":
        reason = str((resp.get("incomplete_details") or {}).get("reason") or "")
        mapped: FinishReason = "content_filter" if reason == "content_filter" else "length"
        return Finish(mapped, raw=reason or "incomplete")
    return Finish("tool_calls" if made_calls else "stop", raw=str(resp.get("status") or "completed"))
