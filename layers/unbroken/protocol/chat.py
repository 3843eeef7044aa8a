"""OpenAI Chat Completions for clients: request bodies (pydantic) → Conversation IR, and the Open Responses events the
attempt loop emits → Chat Completions chunks (streaming) or one `chat.completion` object.

Chat clients ride the same IR, routing and attempt loop as Open Responses clients, so failover and mid-stream
continuation apply to them unchanged: the translation happens after the loop, on its events.

Decisions (what a chat client should know):
- `n` must be 1 (one choice per request: the attempt loop continues one answer, not several).
- `stop` is rejected with 400 when non-empty: no adapter enforces stop sequences on every provider, and a sequence
  could straddle the seam of a continued answer; silently ignoring it would change the output's meaning.
- `logprobs: true` and the deprecated `functions` / `function_call` are rejected with 400; other unknown fields are
  accepted and ignored (as OpenAI-compatible servers do).
- A stream that cannot be finished honestly (a failure after output, or a cut the loop could not repair) ends with a
  `data: {"error": {...}}` chunk and no `[DONE]`, which is what OpenAI sends and what makes the SDK raise: a truncated
  answer is never passed off with a `finish_reason`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from unbroken.errors import Failure, FailureKind, invalid
from unbroken.ir import (
    ContentPart,
    FunctionCall,
    FunctionCallOutput,
    FunctionTool,
    GenerationRequest,
    ImagePart,
    Item,
    JsonSchemaFormat,
    Message,
    TextPart,
    ToolChoice,
)

Chunk = dict[str, Any]


class _Lenient(BaseModel):
    # Unknown fields are accepted and ignored, like OpenAI-compatible servers do (clients send vendor extras).
    model_config = ConfigDict(extra="allow")


class ImageURL(_Lenient):
    url: str = Field(max_length=20 * 1024 * 1024 + 100)
    detail: Literal["low", "high", "auto"] | None = None


class ChatContentPart(_Lenient):
    # One flat model rather than a discriminated union: pydantic's union tags would end up in error `param`s.
    type: Literal["text", "image_url", "input_audio", "file", "refusal"]
    text: str | None = None
    image_url: ImageURL | None = None
    refusal: str | None = None


class ChatFunctionCall(_Lenient):
    name: str = Field(min_length=1)
    arguments: str


class ChatToolCall(_Lenient):
    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: ChatFunctionCall


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ChatContentPart] | None = None
    name: str | None = None
    tool_calls: list[ChatToolCall] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None


class ChatFunction(_Lenient):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(_Lenient):
    type: Literal["function"]
    function: ChatFunction


class NamedFunction(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"]
    function: NamedFunction


class AllowedTools(_Lenient):
    mode: Literal["auto", "required"] = "auto"
    tools: list[NamedToolChoice]


class AllowedToolsChoice(_Lenient):
    type: Literal["allowed_tools"]
    allowed_tools: AllowedTools


class JsonSchemaSpec(_Lenient):
    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class StreamOptions(_Lenient):
    include_usage: bool | None = None


class ChatCompletionBody(_Lenient):
    model: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | AllowedToolsChoice | None = None
    parallel_tool_calls: bool | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    response_format: ResponseFormat | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    logprobs: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None

    @field_validator("metadata")
    @classmethod
    def _metadata_size(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and len(value) > 16:
            raise ValueError("metadata may have at most 16 keys")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


# ---------------------------------------------------------------------------------------------------------------
# Request → IR
# ---------------------------------------------------------------------------------------------------------------


def _unsupported(param: str, what: str) -> Failure:
    return invalid(f"{what} is not supported by this router.", param=param, code="unsupported_parameter")


def _text_of(content: str | list[ChatContentPart] | None, param: str, *, allow_refusal: bool = False) -> str:
    """The text of a content that may only hold text (system, developer, assistant, tool)."""
    if content is None or isinstance(content, str):
        return content or ""
    out = []
    for j, part in enumerate(content):
        if part.type == "text":
            out.append(part.text or "")
        elif part.type == "refusal" and allow_refusal:
            out.append(part.refusal or "")
        else:
            raise invalid(f"Content parts of type '{part.type}' are not allowed here.",
                           param=f"{param}[{j}].type")
    return "".join(out)


def _user_parts(content: str | list[ChatContentPart] | None, param: str) -> list[ContentPart]:
    if content is None:
        raise invalid("A user message needs content.", param=param)
    if isinstance(content, str):
        return [TextPart(content)]
    parts: list[ContentPart] = []
    for j, part in enumerate(content):
        if part.type == "text":
            parts.append(TextPart(part.text or ""))
        elif part.type == "image_url":
            if part.image_url is None:
                raise invalid("image_url parts need an image_url object.", param=f"{param}[{j}].image_url")
            url = part.image_url.url
            # Same rule as Open Responses input_image: the router never fetches plain-http URLs.
            if not (url.startswith("data:") or url.startswith("https://")):
                raise invalid("image_url.url must be a data URL or an https URL.",
                               param=f"{param}[{j}].image_url.url")
            parts.append(ImagePart(url, part.image_url.detail or "auto"))
        else:
            raise _unsupported(f"{param}[{j}].type", f"Content part type '{part.type}'")
    return parts


def items_from_messages(messages: list[ChatMessage]) -> list[Item]:
    items: list[Item] = []
    for i, msg in enumerate(messages):
        param = f"messages[{i}]"
        if msg.role in ("system", "developer"):
            items.append(Message(msg.role, [TextPart(_text_of(msg.content, f"{param}.content"))]))
        elif msg.role == "user":
            items.append(Message("user", _user_parts(msg.content, f"{param}.content")))
        elif msg.role == "assistant":
            text = _text_of(msg.content, f"{param}.content", allow_refusal=True)
            if msg.refusal and not text:
                text = msg.refusal
            if not text and not msg.tool_calls:
                raise invalid("An assistant message needs content or tool_calls.", param=f"{param}.content")
            if text:
                items.append(Message("assistant", [TextPart(text)]))
            for call in msg.tool_calls or []:
                items.append(FunctionCall(call.id, call.function.name, call.function.arguments))
        elif msg.role == "tool":
            if not msg.tool_call_id:
                raise invalid("A tool message needs tool_call_id.", param=f"{param}.tool_call_id",
                               code="missing_required_parameter")
            items.append(FunctionCallOutput(msg.tool_call_id, _text_of(msg.content, f"{param}.content")))
        else:
            raise _unsupported(f"{param}.role", "The deprecated 'function' role (use 'tool')")
    return items


def _tool_choice(body: ChatCompletionBody, names: set[str]) -> ToolChoice:
    tc = body.tool_choice
    if isinstance(tc, str):
        choice = ToolChoice(mode=tc)
    elif isinstance(tc, NamedToolChoice):
        if tc.function.name not in names:
            raise invalid(f"tool_choice names function '{tc.function.name}', which is not in tools.",
                           param="tool_choice.function.name")
        choice = ToolChoice(mode="required", name=tc.function.name)
    elif isinstance(tc, AllowedToolsChoice):
        allowed = [t.function.name for t in tc.allowed_tools.tools]
        unknown = [n for n in allowed if n not in names]
        if unknown:
            raise invalid(f"allowed_tools names unknown functions: {', '.join(unknown)}.",
                           param="tool_choice.allowed_tools.tools")
        choice = ToolChoice(mode=tc.allowed_tools.mode, allowed=allowed)
    else:
        choice = ToolChoice()
    if choice.requires_call and not names:
        raise invalid("tool_choice requires a tool call but no tools were given.", param="tool_choice")
    return choice


def generation_request(body: ChatCompletionBody) -> GenerationRequest:
    """The IR request for a validated body; 400 for what the router does not do."""
    if body.n is not None and body.n != 1:
        raise invalid("Only n=1 is supported.", param="n", code="unsupported_parameter")
    if body.stop:
        raise _unsupported("stop", "'stop'")
    if body.logprobs:
        raise _unsupported("logprobs", "'logprobs'")
    if body.functions is not None or body.function_call is not None:
        raise _unsupported("functions" if body.functions is not None else "function_call",
                           "The deprecated 'functions' API (use 'tools')")
    if not body.messages:
        raise invalid("Missing required parameter: 'messages'.", param="messages",
                       code="missing_required_parameter")
    items = items_from_messages(body.messages)
    tools = [FunctionTool(t.function.name, t.function.description, t.function.parameters, t.function.strict)
             for t in body.tools or []]
    choice = _tool_choice(body, {t.name for t in tools})
    text_format = None
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_schema":
        spec = fmt.json_schema
        if spec is None or not spec.schema_:
            raise invalid("response_format.json_schema.schema is required for json_schema.",
                           param="response_format.json_schema.schema")
        text_format = JsonSchemaFormat(spec.name, spec.schema_, spec.description, spec.strict)
    elif fmt is not None and fmt.type == "json_object":
        text_format = JsonSchemaFormat("json_object", {"type": "object"}, None, False)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return GenerationRequest(
        model=body.model or "",
        items=items,
        tools=tools,
        tool_choice=choice,
        parallel_tool_calls=body.parallel_tool_calls,
        max_output_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        text_format=text_format,
        reasoning_effort=body.reasoning_effort if body.reasoning_effort != "none" else None,
        metadata=dict(body.metadata or {}),
    )


# ---------------------------------------------------------------------------------------------------------------
# Open Responses events → Chat Completions
# ---------------------------------------------------------------------------------------------------------------


def chat_usage(usage: dict[str, Any] | None) -> dict[str, Any]:
    u = usage or {}
    return {
        "prompt_tokens": u.get("input_tokens", 0),
        "completion_tokens": u.get("output_tokens", 0),
        "total_tokens": u.get("total_tokens", 0),
        "prompt_tokens_details": {"cached_tokens": (u.get("input_tokens_details") or {}).get("cached_tokens", 0)},
        "completion_tokens_details": {
            "reasoning_tokens": (u.get("output_tokens_details") or {}).get("reasoning_tokens", 0)},
    }


# Status for a non-stream answer that failed after the upstream started (the stream form is an error chunk).
_FAILURE_KIND: dict[str, FailureKind] = {"upstream_unavailable": "unavailable", "stream_deadline": "deadline",
                                         "rate_limit_exceeded": "rate_limited", "server_error": "internal"}


def _incomplete_finish(response: dict[str, Any]) -> str | None:
    """finish_reason for an incomplete response, or None when it is a failure (cut, deadline, cancelled)."""
    reason = (response.get("incomplete_details") or {}).get("reason")
    return {"max_output_tokens": "length", "content_filter": "content_filter"}.get(str(reason))


def _failure(response: dict[str, Any], error_event: dict[str, Any] | None) -> dict[str, Any]:
    """The `{message, type, param, code}` of a response that did not end well."""
    if response.get("status") == "failed":
        err = response.get("error") or {}
        etype = (error_event or {}).get("type") or "server_error"
        return {"message": err.get("message") or "The response failed.", "type": etype, "param": None,
                "code": err.get("code") or "server_error"}
    reason = str((response.get("incomplete_details") or {}).get("reason") or "incomplete")
    return {"message": f"The answer was cut short and could not be completed ({reason}).", "type": "server_error",
            "param": None, "code": reason}


@dataclass(slots=True)
class _Call:
    call_id: str
    name: str
    index: int | None = None  # the chat `index`, assigned when the call is first shown


class ChatChunker:
    """Translates one response's Open Responses events into Chat Completions chunks, in order.

    A function call is shown (its `id`/`name` chunk) only when its first argument fragment arrives or when it is
    complete: a call the attempt loop drops after a cut (closed `incomplete` with nothing sent but its
    `output_item.added`) never reaches the chat client, whose SDK would otherwise concatenate two ids at one index.
    """

    def __init__(self, completion_id: str, created: int, model: str, *, include_usage: bool = False,
                 answering_model: Callable[[], str | None] | None = None) -> None:
        self.completion_id = completion_id
        self.created = created
        self.public_model = model
        # Chunks name the upstream model that is answering (failover accounting), once it is known.
        self._answering_model = answering_model
        self.include_usage = include_usage
        self.calls: dict[str, _Call] = {}  # item id -> call
        self.shown_calls = 0
        self.error: dict[str, Any] | None = None  # set when the stream must end with an error chunk
        self.finished = False
        self._role_sent = False
        self._error_event: dict[str, Any] | None = None

    @property
    def model(self) -> str:
        answering = self._answering_model() if self._answering_model is not None else None
        return answering or self.public_model

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> Chunk:
        out: Chunk = {"id": self.completion_id, "object": "chat.completion.chunk", "created": self.created,
                      "model": self.model,
                      "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
        if self.include_usage:
            out["usage"] = None  # OpenAI's shape: null on every chunk but the last
        return out

    def feed(self, event: dict[str, Any]) -> list[Chunk]:
        etype = event["type"]
        if etype == "response.created":
            return self._role()
        if etype == "response.output_text.delta":
            return [*self._role(), self.chunk({"content": event["delta"]})]
        if etype == "response.refusal.delta":
            return [*self._role(), self.chunk({"refusal": event["delta"]})]
        if etype in ("response.reasoning.delta", "response.reasoning_summary_text.delta"):
            # The de-facto field (DeepSeek, vLLM) for reasoning text in chat streams.
            return [*self._role(), self.chunk({"reasoning_content": event["delta"]})]
        if etype == "response.output_item.added" and event["item"]["type"] == "function_call":
            item = event["item"]
            self.calls[item["id"]] = _Call(item["call_id"], item["name"])
            return []
        if etype == "response.function_call_arguments.delta":
            call = self.calls.get(event["item_id"])
            if call is None:
                return []
            out = self._show(call)
            out.append(self.chunk({"tool_calls": [{"index": call.index, "function": {"arguments": event["delta"]}}]}))
            return out
        if etype == "response.output_item.done" and event["item"]["type"] == "function_call":
            call = self.calls.get(event["item"]["id"])
            if call is not None and call.index is None and event["item"].get("status") == "completed":
                return self._show(call)  # a call without arguments still has to be announced
            return []
        if etype == "error":
            self._error_event = event.get("error")
            return []
        if etype in ("response.completed", "response.incomplete", "response.failed"):
            return self._end(event["response"])
        return []  # lifecycle events, part boundaries, `router:` extensions: nothing to say in chat

    def _role(self) -> list[Chunk]:
        if self._role_sent:
            return []
        self._role_sent = True
        return [self.chunk({"role": "assistant", "content": ""})]

    def _show(self, call: _Call) -> list[Chunk]:
        if call.index is not None:
            return []
        call.index = self.shown_calls
        self.shown_calls += 1
        header = {"index": call.index, "id": call.call_id, "type": "function",
                  "function": {"name": call.name, "arguments": ""}}
        return [*self._role(), self.chunk({"tool_calls": [header]})]

    def _end(self, response: dict[str, Any]) -> list[Chunk]:
        self.finished = True
        out = self._role()
        status = response.get("status")
        if status == "completed":
            finish: str | None = "tool_calls" if self.shown_calls else "stop"
        elif status == "incomplete":
            finish = _incomplete_finish(response)
        else:
            finish = None
        if finish is None:
            self.error = _failure(response, self._error_event)
            return out
        out.append(self.chunk({}, finish))
        if self.include_usage:
            out.append({"id": self.completion_id, "object": "chat.completion.chunk", "created": self.created,
                        "model": self.model, "choices": [], "usage": chat_usage(response.get("usage"))})
        return out


def completion_from_response(response: dict[str, Any], completion_id: str, created: int, model: str,
                             error_event: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `chat.completion` object for a finished response; a `Failure` for one that did not end well."""
    status = response.get("status")
    finish: str | None
    if status == "completed":
        finish = "stop"
    elif status == "incomplete":
        finish = _incomplete_finish(response)
    else:
        finish = None
    if finish is None:
        err = _failure(response, error_event)
        raise Failure(_FAILURE_KIND.get(err["code"], "upstream_error"), err["message"], code=err["code"])
    text: list[str] = []
    refusal: list[str] = []
    reasoning: list[str] = []
    tool_calls = []
    for item in response.get("output") or []:
        if item["type"] == "message":
            for part in item["content"]:
                if part["type"] == "output_text":
                    text.append(part["text"])
                elif part["type"] == "refusal":
                    refusal.append(part["refusal"])
        elif item["type"] == "function_call" and item.get("status") == "completed":
            tool_calls.append({"id": item["call_id"], "type": "function",
                               "function": {"name": item["name"], "arguments": item["arguments"]}})
        elif item["type"] == "reasoning":
            reasoning.extend(p.get("text", "") for p in item.get("content") or [])
    if tool_calls and finish == "stop":
        finish = "tool_calls"
    message: dict[str, Any] = {"role": "assistant",
                               "content": "".join(text) if text or not tool_calls else None,
                               "refusal": "".join(refusal) if refusal else None, "annotations": []}
    if tool_calls:
        message["tool_calls"] = tool_calls
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": chat_usage(response.get("usage")),
    }
