"""What one request answers, decided before anything is sent: text (deterministic prose, or a JSON document for
structured output), or tool calls, cut to the part still missing when the router asks for a continuation. A pure
function of the request body and its controls; how the answer is sent, and how it fails, is `completions.py`."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from unbroken.simulator.controls import Controls
from unbroken.simulator.conversation import count_prompt_tokens, input_key_of, role_of, split_tail
from unbroken.simulator.errors import ApiError
from unbroken.simulator.schema_examples import example_for_schema
from unbroken.simulator.tokens import chunks_of, overlap_start, seeded_rng, simulated_tokens, tokens_from

JSON_PIECE_CHARS = 8  # structured output is streamed in pieces of this many characters

PREFILL_REJECTED_MESSAGE = (
    "This model does not support assistant message prefill. The conversation must end with a user message."
)


_JSON_OBJECT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"answer": {"type": "string"}, "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
    "required": ["answer", "confidence"],
}


@dataclass(slots=True)
class ToolCall:
    index: int
    call_id: str
    name: str
    arguments: str


@dataclass(slots=True)
class Plan:
    """A request's whole answer, decided before anything is sent."""

    pieces: list[str] = field(default_factory=list)  # content chunks, in order
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str = "stop"
    prompt_tokens: int = 0


def _tool_functions(body: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for tool in body.get("tools") or []:
        if isinstance(tool, dict) and tool.get("type", "function") == "function":
            fn = tool.get("function")
            if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                out.append(fn)
    return out


def plan_answer(body: dict[str, Any], controls: Controls) -> Plan:
    """What this request answers (README "How the simulator decides")."""
    messages: list[Any] = body["messages"]
    _, mode, partial = split_tail(messages)
    if mode == "prefill" and controls.reject_prefill:
        raise ApiError(400, PREFILL_REJECTED_MESSAGE, param="messages")
    key = input_key_of(messages)
    plan = Plan(prompt_tokens=count_prompt_tokens(body))

    functions = _tool_functions(body)
    choice = body.get("tool_choice")
    forced: str | None = None
    if isinstance(choice, dict):
        fn = choice.get("function")
        forced = fn.get("name") if isinstance(fn, dict) else None
        if forced is not None and not any(f["name"] == forced for f in functions):
            raise ApiError(400, f"Invalid value for 'tool_choice': no function named {forced!r} in 'tools'.",
                           param="tool_choice")
    wants_call = bool(functions) and (choice == "required" or forced is not None)
    if wants_call and mode is None and role_of(messages[-1]) != "tool":
        if forced is not None:
            chosen = [f for f in functions if f["name"] == forced]
        elif controls.parallel_tools and body.get("parallel_tool_calls") is not False:
            chosen = functions
        else:
            chosen = functions[:1]
        for index, fn in enumerate(chosen):
            rng = seeded_rng("tool", controls.seed, key, fn["name"], str(index))
            params = fn.get("parameters")
            arguments = json.dumps(example_for_schema(params, rng, root=params))
            digest = hashlib.sha256(f"{controls.seed}\x00{key}\x00{index}\x00{fn['name']}".encode()).hexdigest()
            plan.tool_calls.append(ToolCall(index, f"call_{digest[:24]}", fn["name"], arguments))
        plan.finish_reason = "tool_calls"
        return plan

    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") in ("json_schema", "json_object"):
        spec = fmt.get("json_schema") if isinstance(fmt.get("json_schema"), dict) else {}
        schema = spec.get("schema") if fmt["type"] == "json_schema" else _JSON_OBJECT_SCHEMA
        document = json.dumps(example_for_schema(schema, seeded_rng("json", controls.seed, key), root=schema))
        tokens = chunks_of(document, JSON_PIECE_CHARS)
    else:
        tokens = simulated_tokens(controls.seed, key, controls.length)

    full = "".join(tokens)
    out = tokens
    if mode is not None and partial and full.startswith(partial):
        if mode == "instruction" and not controls.literal_continuation:
            out = tokens_from(tokens, overlap_start(tokens, len(partial)))  # repeats a little, like a real model
        elif mode == "instruction" or controls.literal_continuation:
            out = tokens_from(tokens, len(partial))
        # else: a trailing assistant message on a model without prefill restarts the answer (OpenAI behaviour).

    cap = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(cap, int) and len(out) > cap:
        out = out[:cap]
        plan.finish_reason = "length"
    plan.pieces = out
    return plan
