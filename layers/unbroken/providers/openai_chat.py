"""OpenAI Chat Completions as an upstream: OpenAI itself and any OpenAI-compatible server (vLLM, Ollama, Groq,
OpenRouter, DeepSeek...). Subclasses override `url`, `headers` and `build_body` for their dialect."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from unbroken.config import OpenAIChatOptions, OpenAICompatibleOptions
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
    ReasoningDelta,
    RefusalDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
    UpstreamModel,
    Usage,
)
from unbroken.providers._http import open_sse, parse_json
from unbroken.providers.base import Capabilities, ErrorKind, Provider, ProviderError

log = logging.getLogger("unbroken.providers.openai_chat")

_FINISH: dict[str, FinishReason] = {
    "stop": "stop",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "length": "length",
    "content_filter": "content_filter",
}

_CONTEXT_CODES = {"context_length_exceeded", "string_above_max_length"}


def _refine(status: int, body: Any, err: ProviderError) -> ProviderError | None:
    """Chat-dialect error bodies: context length, quota and content filter hide behind 400 / 429."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return None
    code = str(error.get("code") or error.get("type") or "")
    message = str(error.get("message") or "")
    if code in _CONTEXT_CODES or "maximum context length" in message or "context window" in message:
        return ProviderError("context_length", message, status=status, code=code)
    if code == "insufficient_quota":
        return ProviderError("quota", message, status=status, code=code)
    if code == "content_filter" or code == "content_policy_violation":
        return ProviderError("content_filter", message, status=status, code=code)
    if "prefill" in message and status == 400:
        return ProviderError("prefill_rejected", message, status=status, code=code)
    return None


class OpenAIChatProvider(Provider):
    name = "openai"
    default_base_url = "https://api.openai.com/v1"

    # OpenAI restarts rather than continues a trailing assistant message; compatible servers may differ.
    default_capabilities = Capabilities(literal_continuation=False, image_urls=True, native_json_schema=True)

    # -- request -------------------------------------------------------------------------------------------------

    @property
    def options(self) -> OpenAIChatOptions:
        return self.deployment.options_as(OpenAIChatOptions)

    def url(self) -> str:
        base = (self.deployment.base_url or self.default_base_url).rstrip("/")
        return f"{base}/chat/completions"

    def headers(self) -> dict[str, str]:
        headers = {"content-type": "application/json", "accept": "text/event-stream"}
        if self.deployment.api_key:
            headers["authorization"] = f"Bearer {self.deployment.api_key}"
        return headers

    def build_messages(self, request: GenerationRequest) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        system_role = self.options.system_role
        if request.instructions:
            messages.append({"role": system_role, "content": request.instructions})
        for item in request.items:
            if isinstance(item, Message):
                messages.append(self._message(item, system_role))
            elif isinstance(item, FunctionCall):
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}
                last = messages[-1] if messages else None
                # Parallel calls of one turn share one assistant message.
                if last and last["role"] == "assistant" and last.get("tool_calls") and not last.get("content"):
                    last["tool_calls"].append(call)
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif isinstance(item, FunctionCallOutput):
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
            # Reasoning items: Chat Completions has no way to send reasoning back; dropped.
        if request.continuation is not None:
            cont = request.continuation
            if cont.literal:
                messages.append({"role": "assistant", "content": cont.text})
            else:
                messages.append({"role": "assistant", "content": cont.text})
                messages.append({"role": "user", "content": CONTINUE_INSTRUCTION})
        return messages

    def _message(self, msg: Message, system_role: str) -> dict[str, Any]:
        role = system_role if msg.role in ("system", "developer") and system_role != "developer" else msg.role
        if all(not isinstance(p, ImagePart) for p in msg.content):
            return {"role": role, "content": msg.text()}
        parts: list[dict[str, Any]] = []
        for p in msg.content:
            if isinstance(p, ImagePart):
                if not p.is_data_url and not self.capabilities.image_urls:
                    raise ProviderError("bad_request", f"deployment {self.deployment.name} accepts images only as "
                                        "data URLs; the router does not fetch image URLs")
                parts.append({"type": "image_url", "image_url": {"url": p.url, "detail": p.detail}})
            else:
                parts.append({"type": "text", "text": p.text})
        return {"role": role, "content": parts}

    def build_body(self, request: GenerationRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.deployment.model,
            "messages": self.build_messages(request),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.tools:
            body["tools"] = [
                {"type": "function", "function": {k: v for k, v in (
                    ("name", t.name), ("description", t.description),
                    ("parameters", t.parameters or {"type": "object", "properties": {}}), ("strict", t.strict),
                ) if v is not None}}
                for t in request.tools
                if request.tool_choice.allowed is None or t.name in request.tool_choice.allowed
            ]
            tc = request.tool_choice
            if tc.name:
                body["tool_choice"] = {"type": "function", "function": {"name": tc.name}}
            else:
                body["tool_choice"] = tc.mode
            if request.parallel_tool_calls is not None:
                body["parallel_tool_calls"] = request.parallel_tool_calls
        if request.max_output_tokens is not None:
            key = self.options.max_tokens_field
            body[key] = request.max_output_tokens
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.top_p is not None:
            body["top_p"] = request.top_p
        if request.text_format is not None:
            fmt = request.text_format
            schema: dict[str, Any] = {"name": fmt.name, "schema": fmt.schema}
            if fmt.strict is not None:
                schema["strict"] = fmt.strict
            if fmt.description:
                schema["description"] = fmt.description
            body["response_format"] = {"type": "json_schema", "json_schema": schema}
        if request.reasoning_effort and self.options.reasoning_effort:
            body["reasoning_effort"] = request.reasoning_effort
        if request.continuation is not None and request.continuation.literal:
            body.update(self.options.continuation_body)
        body.update(self.options.extra_body)
        return body

    # -- stream --------------------------------------------------------------------------------------------------

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        body = self.build_body(request)
        async with open_sse(self.http, "POST", self.url(), headers=self.headers(), json_body=body,
                            refine=_refine) as events:
            async for delta in self.parse_stream(events):
                yield delta

    async def parse_stream(self, events: AsyncIterator[Any]) -> AsyncIterator[Delta]:
        """Chat chunks → deltas. Healthy: a chunk with `finish_reason`, then optionally a usage chunk, then [DONE]
        (whose absence after the finish reason is tolerated). Anything ending before the finish reason fails."""
        finish: Finish | None = None
        usage_seen = False
        model_reported = False
        # Parallel calls are keyed by the chunk's `index`; ids/names can arrive after the first fragment.
        open_calls: dict[int, bool] = {}
        async for event in events:
            data = event.data
            if data == "[DONE]":
                break
            if not data.strip():
                continue
            chunk = parse_json(data)
            if not isinstance(chunk, dict):
                raise ProviderError("malformed", "upstream chunk is not a JSON object", mid_stream=True)
            if chunk.get("error"):
                raise self._stream_error(chunk["error"])
            if not model_reported and chunk.get("model"):
                model_reported = True
                yield UpstreamModel(str(chunk["model"]))
            for choice in chunk.get("choices") or []:
                if choice.get("index", 0) != 0:
                    continue
                delta = choice.get("delta") or {}
                reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                if isinstance(reasoning, str) and reasoning:
                    yield ReasoningDelta(reasoning)
                content = delta.get("content")
                if content:
                    yield TextDelta(content)
                refusal = delta.get("refusal")
                if refusal:
                    yield RefusalDelta(refusal)
                for call in delta.get("tool_calls") or []:
                    idx = int(call.get("index", 0))
                    fn = call.get("function") or {}
                    if idx not in open_calls:
                        open_calls[idx] = True
                        yield ToolCallStart(idx, str(call.get("id") or f"call_{idx}"), str(fn.get("name") or ""))
                    args = fn.get("arguments")
                    if args:
                        yield ToolCallDelta(idx, args)
                reason = choice.get("finish_reason")
                if reason:
                    if reason == "error":
                        raise ProviderError("server_error", "upstream reported finish_reason error",
                                            mid_stream=True)
                    finish = Finish(_FINISH.get(reason, "stop"), raw=reason)
            usage = chunk.get("usage") or (chunk.get("x_groq") or {}).get("usage")
            if isinstance(usage, dict) and not usage_seen:
                usage_seen = True
                yield Usage(
                    input_tokens=int(usage.get("prompt_tokens") or 0),
                    output_tokens=int(usage.get("completion_tokens") or 0),
                    cached_input_tokens=int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0),
                    reasoning_tokens=int(
                        (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0),
                )
        if finish is None:
            raise ProviderError("truncated", "upstream stream ended before a finish reason", mid_stream=True)
        yield finish

    def _stream_error(self, error: Any) -> ProviderError:
        if not isinstance(error, dict):
            return ProviderError("server_error", str(error), mid_stream=True)
        message = str(error.get("message") or "upstream error")
        code = error.get("code")
        etype = str(error.get("type") or "")
        status = code if isinstance(code, int) else None
        kind: ErrorKind
        if etype in ("rate_limit_exceeded", "rate_limit_error") or status == 429:
            kind = "rate_limited"
        elif status is not None and 400 <= status < 500 and status != 408:
            kind = "bad_request"
            if "token limit" in message.lower() or "context" in message.lower():
                kind = "context_length"
        elif etype == "overloaded_error" or status in (503, 529):
            kind = "overloaded"
        else:
            kind = "server_error"
        return ProviderError(kind, message, status=status, code=str(code or etype or "") or None,
                             mid_stream=True)


class OpenAICompatibleProvider(OpenAIChatProvider):
    """vLLM, Ollama, LM Studio, Groq, OpenRouter, DeepSeek...: same wire, a base_url, often no key.

    Options: `literal_continuation` (vLLM with `continuation_body: {continue_final_message: true,
    add_generation_prompt: false}`, Ollama, DeepSeek beta with a `prefix` flag), `max_tokens_field: max_tokens` for
    servers that do not know `max_completion_tokens`, `extra_body` merged into every request."""

    name = "openai_compatible"

    def url(self) -> str:
        if not self.deployment.base_url:  # the config refuses it too: api.openai.com must not get these prompts
            raise ProviderError("bad_request", f"deployment {self.deployment.name} (openai_compatible) needs a "
                                "base_url")
        return super().url()

    def build_body(self, request: GenerationRequest) -> dict[str, Any]:
        body = super().build_body(request)
        if (request.continuation is not None and request.continuation.literal
                and self.deployment.options_as(OpenAICompatibleOptions).prefix_flag):
            # DeepSeek's chat prefix completion marks the trailing assistant message instead of a body flag.
            body["messages"][-1]["prefix"] = True
        return body
