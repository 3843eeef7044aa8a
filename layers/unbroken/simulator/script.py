"""What one request answers, decided before anything is sent: text (deterministic prose, or a JSON document for
structured output), or tool calls, cut to the part still missing when the router asks for a continuation. A pure
function of the request body and its controls; how the answer is sent, and how it fails, is `completions.py`."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from unbroken.simulator.controls import Controls
from unbroken.simulator.conversation import count_prompt_tokens, input_key_of, role_of, split_tail, text_of
from unbroken.simulator.errors import ApiError
from unbroken.simulator.schema_examples import example_for_schema
from unbroken.simulator.tokens import chunks_of, overlap_start, seeded_rng, simulated_tokens, tokens_from

JSON_PIECE_CHARS = 8  # structured output is streamed in pieces of this many characters
TOOL_RESULT_QUOTE_CHARS = 80  # how much of a tool result the answer after it quotes

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


def _functions_to_call(body: dict[str, Any], functions: list[dict[str, Any]], forced: str | None,
                       controls: Controls) -> list[dict[str, Any]]:
    """The functions this turn calls, [] for a text answer. `required` or a named function: call, unless the
    conversation ends with tool results (then answer them). `auto`, or no `tool_choice` (OpenAI's default when tools
    are offered): call when the user spoke last, so that a client trying tools sees them work. `none`: never.
    The call is to the named function, or to every offered one with `sim_parallel_tools`, or to the first one."""
    last = role_of(body["messages"][-1])
    choice = body.get("tool_choice")
    if not functions:
        return []
    if forced is not None or choice == "required":
        wanted = last != "tool"
    else:
        wanted = choice in (None, "auto") and last == "user"
    if not wanted:
        return []
    if forced is not None:
        return [f for f in functions if f["name"] == forced]
    if controls.parallel_tools and body.get("parallel_tool_calls") is not False:
        return functions
    return functions[:1]


def _tool_results_sentence(messages: Sequence[Any]) -> list[str]:
    """A sentence quoting the tool results the conversation ends with, as tokens shaped like the prose (a leading
    space on every one but the first), or [] if it does not end with tool results."""
    start = len(messages)
    while start > 0 and role_of(messages[start - 1]) == "tool":
        start -= 1
    if start == len(messages):
        return []
    names: dict[Any, str] = {}  # call id -> function name, from the assistant messages that made the calls
    for m in messages[:start]:
        calls = m.get("tool_calls") if role_of(m) == "assistant" else None
        for call in calls if isinstance(calls, list) else []:
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                names[call.get("id")] = fn["name"]
    clauses = []
    for m in messages[start:]:
        result = " ".join(text_of(m).split())
        if len(result) > TOOL_RESULT_QUOTE_CHARS:
            result = result[: TOOL_RESULT_QUOTE_CHARS - 3].rstrip() + "..."
        name = names.get(m.get("tool_call_id"))
        clauses.append(f'the tool {name} returned "{result}"' if name else f'the tool returned "{result}"')
    words = ("; ".join(clauses) + ".").split(" ")
    words[0] = words[0].capitalize()
    return [words[0], *(" " + w for w in words[1:])]


def plan_answer(body: dict[str, Any], controls: Controls) -> Plan:
    """What this request answers (README "How the simulator decides"): tool calls when `_functions_to_call` says
    so; otherwise text, a JSON document for structured output or else prose led by a sentence quoting the tool
    results the conversation ends with. A continuation gets only the part of that text still missing."""
    messages: list[Any] = body["messages"]
    base, mode, partial = split_tail(messages)
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
    chosen = _functions_to_call(body, functions, forced, controls) if mode is None else []
    if chosen:
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
        spec_value = fmt.get("json_schema")
        spec: dict[str, Any] = spec_value if isinstance(spec_value, dict) else {}
        schema = spec.get("schema") if fmt["type"] == "json_schema" else _JSON_OBJECT_SCHEMA
        document = json.dumps(example_for_schema(schema, seeded_rng("json", controls.seed, key), root=schema))
        tokens = chunks_of(document, JSON_PIECE_CHARS)
    else:
        lead = _tool_results_sentence(base)
        prose = simulated_tokens(controls.seed, key, controls.length)
        if lead and prose:
            prose[0] = " " + prose[0]
        tokens = lead + prose

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
