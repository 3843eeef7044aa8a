"""`POST /v1/responses` bodies: validation (pydantic), conversion to the Conversation IR, and the response object
skeleton that echoes the request (all 31 required keys of `ResponseResource`).

`ResponsesRequest` is the one way a body becomes the IR, for a POST, a `previous_response_id` chain, a takeover and
the background worker alike."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from unbroken.errors import invalid
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
    Reasoning,
    TextPart,
    ToolChoice,
)
from unbroken.protocol.body import validate
from unbroken.protocol.reasoning_codec import MalformedReasoning, decode_reasoning
from unbroken.protocol.responses import new_id

MAX_INPUT_STRING = 10 * 1024 * 1024


class _Lenient(BaseModel):
    # Unknown fields are allowed (the spec lets implementers add extensions) and ignored.
    model_config = ConfigDict(extra="allow")


class ContentPartParam(_Lenient):
    type: Literal["input_text", "output_text", "text", "input_image", "refusal", "input_file",
                  "summary_text", "reasoning_text"]
    text: str | None = None
    image_url: str | None = Field(default=None, max_length=20 * 1024 * 1024 + 100)
    detail: Literal["low", "high", "auto"] | None = None
    refusal: str | None = None


class MessageParam(_Lenient):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPartParam]
    id: str | None = None
    status: str | None = None
    phase: Literal["commentary", "final_answer"] | None = None


class FunctionCallParam(_Lenient):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=64)
    name: str = Field(min_length=1, max_length=64)
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputParam(_Lenient):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=64)
    output: str | list[ContentPartParam]
    id: str | None = None
    status: str | None = None


class SummaryPart(_Lenient):
    type: Literal["summary_text"] = "summary_text"
    text: str


class ReasoningParam(_Lenient):
    type: Literal["reasoning"]
    summary: list[SummaryPart] = Field(default_factory=list)
    content: None = None
    encrypted_content: str | None = None
    id: str | None = None


class ItemReferenceParam(_Lenient):
    type: Literal["item_reference"]
    id: str


class CompactionParam(_Lenient):
    type: Literal["compaction"]
    encrypted_content: str = Field(max_length=10 * 1024 * 1024)
    id: str | None = None


ItemParam = Annotated[
    MessageParam | FunctionCallParam | FunctionCallOutputParam | ReasoningParam | ItemReferenceParam
    | CompactionParam,
    Field(discriminator="type"),
]


def _shorthand_messages(value: Any) -> Any:
    # OpenAI's shorthand `{role, content}` (used in the spec's own examples) is a message item.
    if isinstance(value, list):
        return [{"type": "message", **v} if isinstance(v, dict) and "type" not in v and "role" in v else v
                for v in value]
    return value


def _input_size(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_INPUT_STRING:
        raise ValueError("input string is longer than 10 MiB")
    return value


# A body's `input`, as /v1/responses and /v1/responses/compact both take it.
InputParam = Annotated[str | list[ItemParam] | None, BeforeValidator(_shorthand_messages),
                       AfterValidator(_input_size)]


class FunctionToolParam(_Lenient):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionToolChoiceParam(_Lenient):
    type: Literal["function"]
    name: str


class AllowedToolsParam(_Lenient):
    type: Literal["allowed_tools"]
    tools: list[FunctionToolChoiceParam]
    mode: Literal["none", "auto", "required"] = "auto"


class TextFormatParam(_Lenient):
    type: Literal["text", "json_schema", "json_object"]
    name: str | None = Field(default=None, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextParam(_Lenient):
    format: TextFormatParam | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfigParam(_Lenient):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["concise", "detailed", "auto"] | None = None


class CreateResponseBody(_Lenient):
    model: str | None = None
    input: InputParam = None
    instructions: str | None = None
    previous_response_id: str | None = None
    tools: list[FunctionToolParam] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionToolChoiceParam | AllowedToolsParam | None = None
    parallel_tool_calls: bool | None = None
    max_tool_calls: int | None = Field(default=None, ge=1)
    max_output_tokens: int | None = Field(default=None, ge=16)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    text: TextParam | None = None
    reasoning: ReasoningConfigParam | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    background: bool = False
    store: bool = True
    truncation: Literal["auto", "disabled"] | None = None
    service_tier: Literal["auto", "default", "flex", "priority"] | None = None
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = None
    safety_identifier: str | None = Field(default=None, max_length=64)
    prompt_cache_key: str | None = Field(default=None, max_length=64)
    include: list[str] | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata_size(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and len(value) > 16:
            raise ValueError("metadata may have at most 16 keys")
        return value


# -- to the IR -----------------------------------------------------------------------------------------------------


def _parts(content: str | list[ContentPartParam], param: str) -> list[ContentPart]:
    if isinstance(content, str):
        return [TextPart(content)]
    parts: list[ContentPart] = []
    for i, p in enumerate(content):
        if p.type in ("input_text", "output_text", "text", "summary_text", "reasoning_text"):
            parts.append(TextPart(p.text or ""))
        elif p.type == "refusal":
            parts.append(TextPart(p.refusal or ""))
        elif p.type == "input_image":
            url = p.image_url or ""
            if not (url.startswith("data:") or url.startswith("https://")):
                raise invalid("input_image.image_url must be a data URL or an https URL.",
                               param=f"{param}[{i}].image_url")
            parts.append(ImagePart(url, p.detail or "auto"))
        else:
            raise invalid(f"Content part type '{p.type}' is not supported by this router.",
                           param=f"{param}[{i}].type")
    return parts


def _output_text(output: str | list[ContentPartParam]) -> str:
    if isinstance(output, str):
        return output
    return "".join(p.text or "" for p in output if p.text)


# Opens a compaction item made for the caller: (encrypted_content, param) -> the items it holds, or a Failure.
ExpandCompaction = Callable[[str, str], list[Item]]


def items_from_input(value: str | Sequence[ItemParamModel] | None, expand_compaction: ExpandCompaction | None = None,
                     *, param_of: Callable[[int], str] = "input[{}]".format) -> list[Item]:
    if value is None:
        return []
    if isinstance(value, str):
        return [Message("user", [TextPart(value)])]
    items: list[Item] = []
    for i, it in enumerate(value):
        param = param_of(i)
        if isinstance(it, MessageParam):
            items.append(Message(it.role, _parts(it.content, f"{param}.content")))
        elif isinstance(it, FunctionCallParam):
            items.append(FunctionCall(it.call_id, it.name, it.arguments))
        elif isinstance(it, FunctionCallOutputParam):
            items.append(FunctionCallOutput(it.call_id, _output_text(it.output)))
        elif isinstance(it, ReasoningParam):
            try:
                sealed = decode_reasoning(it.encrypted_content) if it.encrypted_content else Reasoning()
            except MalformedReasoning as exc:
                raise invalid(f"The reasoning item's encrypted_content is {exc}: send it back as the router "
                              "returned it, or leave the item out.", param=f"{param}.encrypted_content",
                              code="invalid_encrypted_content") from None
            items.append(Reasoning(summary=[s.text for s in it.summary], encrypted_content=sealed.encrypted_content,
                                   signature=sealed.signature, provider=sealed.provider))
        elif isinstance(it, CompactionParam):
            if expand_compaction is None:
                raise invalid("compaction items are not supported here.", param=f"{param}.type")
            items.extend(expand_compaction(it.encrypted_content, param))
        elif isinstance(it, ItemReferenceParam):
            raise invalid("item_reference inputs are not supported; send the item itself.", param=param)
    return items


ItemParamModel = (MessageParam | FunctionCallParam | FunctionCallOutputParam | ReasoningParam | ItemReferenceParam
                  | CompactionParam)
_STORED_ITEMS: TypeAdapter[list[ItemParamModel]] = TypeAdapter(list[ItemParam])


# -- the one pipeline: a body → the IR ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResponsesRequest:
    """A `POST /v1/responses` body, parsed once: the validated `body` and the JSON object it came from (`raw`),
    which is what the journal keeps and what an Idempotency-Key retry is compared by."""

    body: CreateResponseBody
    raw: dict[str, Any]

    @classmethod
    def parse(cls, raw: Any) -> ResponsesRequest:
        return cls(validate(CreateResponseBody, raw), raw)

    def stored(self, context: list[dict[str, Any]]) -> dict[str, Any]:
        """What the journal keeps: the body as sent, with `input` resolved to the full context (a previous
        response's included), enough to continue the generation in another process (`from_stored`). The request's
        own input items get ids (`GET .../input_items` lists them) and are told apart from the context by
        `CONTEXT_ITEMS`, the number of context items before them."""
        own = [_with_id(item) for item in input_items(self.raw.get("input"))]
        return {**self.raw, "input": context + own, CONTEXT_ITEMS: len(context)}

    @classmethod
    def from_stored(cls, stored: dict[str, Any]) -> ResponsesRequest:
        return cls.parse(stored)

    def to_ir(self, *, context: list[dict[str, Any]] | None = None,
              expand_compaction: ExpandCompaction | None = None) -> GenerationRequest:
        """The IR of this request, after the `context` items (a previous response's input and output, as stored).
        A request with no input at all is a 400."""
        items: list[Item] = []
        if context:
            try:
                previous = _STORED_ITEMS.validate_python(context)
            except ValidationError:
                raise invalid("The previous response cannot be continued: its stored items are not valid.",
                              param="previous_response_id") from None
            items = items_from_input(previous, expand_compaction, param_of=lambda i: "previous_response_id")
        items += items_from_input(self.body.input, expand_compaction)
        if not items:
            raise invalid("Missing required parameter: 'input'.", param="input", code="missing_required_parameter")
        return generation_request(self.body, items)


def input_items(raw_input: Any) -> list[dict[str, Any]]:
    """A body's `input` as a list of JSON items (a string is one user message)."""
    if raw_input is None:
        return []
    if isinstance(raw_input, str):
        return [{"type": "message", "role": "user", "content": raw_input}]
    return list(raw_input)


# In a stored request: how many items of its `input` came from the previous_response_id chain.
CONTEXT_ITEMS = "_context_items"
# The id prefix of each input item type the router names (an item sent with an id keeps it).
_ITEM_ID_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs",
                   "compaction": "cmp"}


def _with_id(item: Any) -> Any:
    if not isinstance(item, dict) or item.get("id"):
        return item
    type_ = item.get("type", "message")
    return {**item, "type": type_, "id": new_id(_ITEM_ID_PREFIX.get(type_, "item"))}


def own_input(stored: dict[str, Any]) -> list[dict[str, Any]]:
    """The input items a stored request sent itself, without the previous_response_id chain before them."""
    return input_items(stored.get("input"))[int(stored.get(CONTEXT_ITEMS, 0)):]


def input_item_resource(item: dict[str, Any], fallback_id: str, *, encrypted_reasoning: bool) -> dict[str, Any]:
    """An input item as the API lists it: with an id (`fallback_id`, derived stably, for an item stored without
    one), a status, and a message's string content as a content part. `encrypted_reasoning`: keep a reasoning
    item's encrypted_content (the `reasoning.encrypted_content` include)."""
    out = {k: v for k, v in item.items() if v is not None}
    type_ = out.setdefault("type", "message")
    if not out.get("id"):
        digest = hashlib.sha256(fallback_id.encode()).hexdigest()[:32]
        out["id"] = f"{_ITEM_ID_PREFIX.get(type_, 'item')}_{digest}"
    if type_ == "message":
        assistant = out.get("role") == "assistant"
        content = out.get("content")
        if isinstance(content, str):
            content = [{"type": "output_text", "text": content} if assistant
                       else {"type": "input_text", "text": content}]
        out["content"] = [dict(p, annotations=p.get("annotations", [])) if p.get("type") == "output_text" else p
                          for p in content or []]
    if type_ in ("message", "function_call", "function_call_output"):
        out.setdefault("status", "completed")
    if type_ == "reasoning":
        out.setdefault("summary", [])
        if not encrypted_reasoning:
            out.pop("encrypted_content", None)
    return out


def output_as_input(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A stored response's output items as input items of a follow-up request (`previous_response_id`)."""
    items = []
    for item in output:
        if item["type"] == "reasoning":
            items.append({k: v for k, v in item.items() if k in ("type", "id", "summary", "encrypted_content")})
        elif item["type"] in ("message", "function_call", "function_call_output"):
            items.append({k: v for k, v in item.items() if k != "status"})
    return items


def generation_request(body: CreateResponseBody, items: list[Item]) -> GenerationRequest:
    tools = [FunctionTool(t.name, t.description, t.parameters, t.strict) for t in body.tools or []]
    names = {t.name for t in tools}
    choice = ToolChoice()
    tc = body.tool_choice
    if isinstance(tc, str):
        choice = ToolChoice(mode=tc)
    elif isinstance(tc, FunctionToolChoiceParam):
        if tc.name not in names:
            raise invalid(f"tool_choice names function '{tc.name}', which is not in tools.",
                           param="tool_choice.name")
        choice = ToolChoice(mode="required", name=tc.name)
    elif isinstance(tc, AllowedToolsParam):
        allowed = [t.name for t in tc.tools]
        unknown = [n for n in allowed if n not in names]
        if unknown:
            raise invalid(f"allowed_tools names unknown functions: {', '.join(unknown)}.",
                           param="tool_choice.tools")
        choice = ToolChoice(mode=tc.mode, allowed=allowed)
    if choice.requires_call and not tools:
        raise invalid("tool_choice requires a tool call but no tools were given.", param="tool_choice")
    text_format = None
    fmt = body.text.format if body.text else None
    if fmt is not None and fmt.type == "json_schema":
        if not fmt.schema_:
            raise invalid("text.format.schema is required for json_schema.", param="text.format.schema")
        text_format = JsonSchemaFormat(fmt.name or "response", fmt.schema_, fmt.description, fmt.strict)
    elif fmt is not None and fmt.type == "json_object":
        text_format = JsonSchemaFormat("json_object", {"type": "object"}, None, False)
    effort = body.reasoning.effort if body.reasoning else None
    return GenerationRequest(
        model=body.model or "",
        items=items,
        instructions=body.instructions,
        tools=tools,
        tool_choice=choice,
        parallel_tool_calls=body.parallel_tool_calls,
        max_output_tokens=body.max_output_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        text_format=text_format,
        reasoning_effort=effort if effort != "none" else None,
        metadata=dict(body.metadata or {}),
    )


def response_skeleton(body: CreateResponseBody, response_id: str, model: str) -> dict[str, Any]:
    """The response object before any output: every required key present, optional non-nullable keys omitted."""
    fmt = body.text.format if body.text else None
    if fmt is None or fmt.type == "text":
        text_format: dict[str, Any] = {"type": "text"}
    elif fmt.type == "json_object":
        text_format = {"type": "json_object"}
    else:
        # The spec types the echoed schema as null (a known spec bug): echo the rest, never the schema itself.
        text_format = {"type": "json_schema", "name": fmt.name or "response", "description": fmt.description,
                       "schema": None, "strict": bool(fmt.strict)}
    text: dict[str, Any] = {"format": text_format}
    if body.text and body.text.verbosity:
        text["verbosity"] = body.text.verbosity
    tc = body.tool_choice
    tool_choice: Any = tc.model_dump(exclude_none=True) if isinstance(tc, BaseModel) else (tc or "auto")
    reasoning = None
    if body.reasoning is not None:
        reasoning = {"effort": body.reasoning.effort, "summary": body.reasoning.summary}
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "completed_at": None,
        "status": "queued" if body.background else "in_progress",
        "incomplete_details": None,
        "model": model,
        "previous_response_id": body.previous_response_id,
        "instructions": body.instructions,
        "output": [],
        "error": None,
        "tools": [{"type": "function", "name": t.name, "description": t.description, "parameters": t.parameters,
                   "strict": t.strict} for t in body.tools or []],
        "tool_choice": tool_choice,
        "truncation": body.truncation or "disabled",
        "parallel_tool_calls": body.parallel_tool_calls if body.parallel_tool_calls is not None else True,
        "text": text,
        "top_p": body.top_p if body.top_p is not None else 1.0,
        "presence_penalty": body.presence_penalty or 0.0,
        "frequency_penalty": body.frequency_penalty or 0.0,
        "top_logprobs": body.top_logprobs or 0,
        "temperature": body.temperature if body.temperature is not None else 1.0,
        "reasoning": reasoning,
        "usage": None,
        "max_output_tokens": body.max_output_tokens,
        "max_tool_calls": body.max_tool_calls,
        "store": body.store,
        "background": body.background,
        "service_tier": body.service_tier or "default",
        "metadata": dict(body.metadata or {}),
        "safety_identifier": body.safety_identifier,
        "prompt_cache_key": body.prompt_cache_key,
    }
