"""What routing knows of one request before any attempt: its counted input tokens, its output bound, the
capabilities it needs and the prompt prefix that identifies its conversation."""

from __future__ import annotations

from dataclasses import dataclass

from unbroken.config import CapabilityName
from unbroken.ir import GenerationRequest, ImagePart, Message
from unbroken.routing.tokens import estimate_input_tokens, prefix_key

# Where each need comes from in the request, for the error that says no deployment has it.
NEED_PARAMS: dict[CapabilityName, str] = {"tools": "tools", "images": "input", "json_schema": "text.format",
                                          "reasoning": "reasoning", "assistant_prefill": "input"}


@dataclass(frozen=True, slots=True)
class RequestProfile:
    input_tokens: int
    max_output_tokens: int | None
    needs: tuple[CapabilityName, ...]  # in NEED_PARAMS order
    prefix_key: str | None

    @classmethod
    def of(cls, request: GenerationRequest, *, cache_affinity: bool) -> RequestProfile:
        """`cache_affinity` off (the model's routing): no prefix key, the prompt is not hashed."""
        return cls(input_tokens=estimate_input_tokens(request), max_output_tokens=request.max_output_tokens,
                   needs=needs_of(request), prefix_key=prefix_key(request) if cache_affinity else None)


def needs_of(request: GenerationRequest) -> tuple[CapabilityName, ...]:
    """The capabilities a deployment must have to serve the request: function tools it may call, image input,
    structured output, a reasoning effort."""
    needs: list[CapabilityName] = []
    if request.tools and request.tool_choice.mode != "none":
        needs.append("tools")
    if any(isinstance(part, ImagePart) for item in request.items if isinstance(item, Message)
           for part in item.content):
        needs.append("images")
    if request.text_format is not None:
        needs.append("json_schema")
    if request.reasoning_effort not in (None, "none"):
        needs.append("reasoning")
    return tuple(needs)
