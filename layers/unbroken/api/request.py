"""`POST /v1/responses` bodies: validation (pydantic), conversion to the Conversation IR, and the response object
skeleton that echoes the request (all 31 required keys of `ResponseResource`)."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from unbroken.api.errors import APIError
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
from unbroken.protocol.reasoning_codec import decode_reasoning

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
    input: str | list[ItemParam] | None = None
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

    @field_validator("input", mode="before")
    @classmethod
    def _shorthand_messages(cls, value: Any) -> Any:
        # OpenAI's shorthand `{role, content}` (used in the spec's own examples) is a message item.
        if isinstance(value, list):
            return [{"type": "message", **v} if isinstance(v, dict) and "type" not in v and "role" in v else v
                    for v in value]
        return value

    @field_validator("input")
    @classmethod
    def _input_size(cls, value: Any) -> Any:
        if isinstance(value, str) and len(value) > MAX_INPUT_STRING:
            raise ValueError("input string is longer than 10 MiB")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_size(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and len(value) > 16:
            raise ValueError("metadata may have at most 16 keys")
        return value


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "none", "list"}


def most_specific(errors: list[Any]) -> Any:
    """Of a union's errors, the one that got deepest into the value is the one that says what is wrong."""
    return max(errors, key=lambda e: len(e["loc"]))


def _param_path(loc: tuple[Any, ...]) -> str:
    """`input[0].content` from pydantic's loc, without its union-member tags (`str`, `list[...]`, the
    discriminator value after an index, model class names)."""
    out = ""
    previous: Any = None
    for part in loc:
        skip = isinstance(part, str) and (
            part in _TYPE_TAGS or "[" in part or part[:1].isupper() or "-" in part
            or (isinstance(previous, int) and part in _ITEM_TAGS)
        )
        previous = part
        if skip:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


_ITEM_TAGS = {"message", "function_call", "function_call_output", "reasoning", "item_reference", "compaction",
              "function", "allowed_tools", "input_text", "output_text", "text", "input_image", "refusal",
              "input_file", "summary_text", "reasoning_text"}


def parse_body(raw: Any, model_cls: type[BaseModel] = CreateResponseBody) -> Any:
    """Validate a JSON body; a bad one is a 400 naming the first offending parameter."""
    if not isinstance(raw, dict):
        raise APIError(400, "The request body must be a JSON object.", param="body")
    try:
        return model_cls.model_validate(raw)
    except ValidationError as exc:
        err = most_specific(exc.errors())
        param = _param_path(tuple(err["loc"]))
        msg = err["msg"].removeprefix("Value error, ")
        raise APIError(400, f"Invalid value for '{param}': {msg}.", param=param) from None


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
                raise APIError(400, "input_image.image_url must be a data URL or an https URL.",
                               param=f"{param}[{i}].image_url")
            parts.append(ImagePart(url, p.detail or "auto"))
        else:
            raise APIError(400, f"Content part type '{p.type}' is not supported by this router.",
                           param=f"{param}[{i}].type")
    return parts


def _output_text(output: str | list[ContentPartParam]) -> str:
    if isinstance(output, str):
        return output
    return "".join(p.text or "" for p in output if p.text)


def items_from_input(value: str | list[Any] | None, expand_compaction: Any = None) -> list[Item]:
    if value is None:
        return []
    if isinstance(value, str):
        return [Message("user", [TextPart(value)])]
    items: list[Item] = []
    for i, it in enumerate(value):
        param = f"input[{i}]"
        if isinstance(it, MessageParam):
            items.append(Message(it.role, _parts(it.content, f"{param}.content")))
        elif isinstance(it, FunctionCallParam):
            items.append(FunctionCall(it.call_id, it.name, it.arguments))
        elif isinstance(it, FunctionCallOutputParam):
            items.append(FunctionCallOutput(it.call_id, _output_text(it.output)))
        elif isinstance(it, ReasoningParam):
            sealed = decode_reasoning(it.encrypted_content) if it.encrypted_content else Reasoning()
            items.append(Reasoning(summary=[s.text for s in it.summary], encrypted_content=sealed.encrypted_content,
                                   signature=sealed.signature, provider=sealed.provider))
        elif isinstance(it, CompactionParam):
            if expand_compaction is None:
                raise APIError(400, "compaction items are not supported here.", param=f"{param}.type")
            items.extend(expand_compaction(it.encrypted_content, param))
        elif isinstance(it, ItemReferenceParam):
            raise APIError(400, "item_reference inputs are not supported; send the item itself.", param=param)
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
            raise APIError(400, f"tool_choice names function '{tc.name}', which is not in tools.",
                           param="tool_choice.name")
        choice = ToolChoice(mode="required", name=tc.name)
    elif isinstance(tc, AllowedToolsParam):
        allowed = [t.name for t in tc.tools]
        unknown = [n for n in allowed if n not in names]
        if unknown:
            raise APIError(400, f"allowed_tools names unknown functions: {', '.join(unknown)}.",
                           param="tool_choice.tools")
        choice = ToolChoice(mode=tc.mode, allowed=allowed)
    if choice.requires_call and not tools:
        raise APIError(400, "tool_choice requires a tool call but no tools were given.", param="tool_choice")
    text_format = None
    fmt = body.text.format if body.text else None
    if fmt is not None and fmt.type == "json_schema":
        if not fmt.schema_:
            raise APIError(400, "text.format.schema is required for json_schema.", param="text.format.schema")
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
