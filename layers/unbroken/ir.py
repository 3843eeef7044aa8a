"""Conversation IR: the provider-neutral shape of a request and of a streamed answer.

The API layer turns an Open Responses (or Chat Completions) body into a `GenerationRequest`; a provider adapter
turns it into its native request and turns the native stream back into `Delta`s; the protocol layer turns deltas
into Open Responses events. Nothing here knows about any provider or about HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "developer", "user", "assistant"]


# ---------------------------------------------------------------------------------------------------------------
# Input side
# ---------------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class TextPart:
    text: str
    type: Literal["text"] = "text"


@dataclass(slots=True)
class ImagePart:
    """An image given as a data URL (``data:image/png;base64,...``) or an ``https`` URL."""

    url: str
    detail: str = "auto"
    type: Literal["image"] = "image"

    @property
    def is_data_url(self) -> bool:
        return self.url.startswith("data:")

    def data(self) -> tuple[str, bytes]:
        """(media type, raw bytes) of a data URL; raises ValueError for anything else."""
        import base64

        if not self.is_data_url or ";base64," not in self.url:
            raise ValueError("not a base64 data URL")
        head, b64 = self.url[5:].split(";base64,", 1)
        return head or "application/octet-stream", base64.b64decode(b64)


ContentPart = TextPart | ImagePart


@dataclass(slots=True)
class Message:
    role: Role
    content: list[ContentPart]
    type: Literal["message"] = "message"

    def text(self) -> str:
        return "".join(p.text for p in self.content if isinstance(p, TextPart))


@dataclass(slots=True)
class FunctionCall:
    call_id: str
    name: str
    arguments: str  # a JSON document as a string, exactly as the model produced it
    type: Literal["function_call"] = "function_call"


@dataclass(slots=True)
class FunctionCallOutput:
    call_id: str
    output: str
    type: Literal["function_call_output"] = "function_call_output"


@dataclass(slots=True)
class Reasoning:
    """A reasoning item. `provider` names the wire protocol whose signatures / encrypted content it carries:
    such reasoning can only be sent back to that provider (DESIGN: drop foreign reasoning on a switch)."""

    text: str = ""
    summary: list[str] = field(default_factory=list)
    encrypted_content: str | None = None
    signature: str | None = None
    provider: str | None = None
    type: Literal["reasoning"] = "reasoning"


Item = Message | FunctionCall | FunctionCallOutput | Reasoning


@dataclass(slots=True)
class FunctionTool:
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


@dataclass(slots=True)
class ToolChoice:
    """`mode` is auto | none | required; `name` forces one function; `allowed` restricts to a subset."""

    mode: Literal["auto", "none", "required"] = "auto"
    name: str | None = None
    allowed: list[str] | None = None

    @property
    def requires_call(self) -> bool:
        return self.mode == "required" or self.name is not None


@dataclass(slots=True)
class JsonSchemaFormat:
    name: str
    schema: dict[str, Any]
    description: str | None = None
    strict: bool | None = None


@dataclass(slots=True)
class Continuation:
    """Set when an attempt continues an answer that was cut: `text` is exactly what the client already saw of
    the assistant message being continued. The adapter sends it as a prefill or with a continue-instruction,
    depending on `literal`."""

    text: str
    literal: bool


@dataclass(slots=True)
class GenerationRequest:
    model: str  # the public model name the caller asked for
    items: list[Item]
    instructions: str | None = None
    tools: list[FunctionTool] = field(default_factory=list)
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    text_format: JsonSchemaFormat | None = None
    reasoning_effort: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    continuation: Continuation | None = None
    # The router's response id: stable across the attempts of one response (logs, upstream idempotency keys).
    trace_id: str | None = None


# ---------------------------------------------------------------------------------------------------------------
# Output side: what an adapter yields while streaming
# ---------------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class TextDelta:
    text: str
    kind: Literal["delta_text"] = "delta_text"


@dataclass(slots=True)
class RefusalDelta:
    text: str
    kind: Literal["delta_refusal"] = "delta_refusal"


@dataclass(slots=True)
class ReasoningDelta:
    """Raw reasoning text (`summary=False`) or reasoning-summary text (`summary=True`)."""

    text: str
    summary: bool = False
    kind: Literal["delta_reasoning"] = "delta_reasoning"


@dataclass(slots=True)
class ReasoningSeal:
    """Provider-bound material that closes a reasoning block: a signature or encrypted content."""

    provider: str
    signature: str | None = None
    encrypted_content: str | None = None
    kind: Literal["reasoning_seal"] = "reasoning_seal"


@dataclass(slots=True)
class ToolCallStart:
    """A new function call. `index` identifies the call among parallel calls of one answer."""

    index: int
    call_id: str
    name: str
    kind: Literal["tool_start"] = "tool_start"


@dataclass(slots=True)
class ToolCallDelta:
    index: int
    arguments: str
    kind: Literal["tool_delta"] = "tool_delta"


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    reasoning_tokens: int = 0
    kind: Literal["usage"] = "usage"

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cached_input_tokens + other.cached_input_tokens,
            self.reasoning_tokens + other.reasoning_tokens,
        )


FinishReason = Literal["stop", "tool_calls", "length", "content_filter"]


@dataclass(slots=True)
class Finish:
    """The upstream said the answer is over. `raw` is the provider's own word, kept for logs."""

    reason: FinishReason
    raw: str | None = None
    kind: Literal["finish"] = "finish"


@dataclass(slots=True)
class UpstreamModel:
    """The model name the upstream reports it actually used (may differ from the configured one)."""

    name: str
    kind: Literal["upstream_model"] = "upstream_model"


Delta = (
    TextDelta
    | RefusalDelta
    | ReasoningDelta
    | ReasoningSeal
    | ToolCallStart
    | ToolCallDelta
    | Usage
    | Finish
    | UpstreamModel
)


# The user turn the router appends when it continues a cut answer on a model without literal continuation
# (no assistant prefill). The overlap the model repeats anyway is stripped by the router.
CONTINUE_INSTRUCTION = (
    "Your previous answer was cut off after the text above. Continue from exactly that point; "
    "do not repeat anything and do not add any preamble."
)
