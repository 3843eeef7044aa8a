"""What the simulator answers (`unbroken.simulator.script.plan_answer`), decided without a server: tool calls or text,
and the text after tool results."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from unbroken.ir import CONTINUE_INSTRUCTION
from unbroken.simulator import Controls, input_key_of, simulated_tokens
from unbroken.simulator.script import TOOL_RESULT_QUOTE_CHARS, Plan, plan_answer

QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
    "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
CONTROLS = Controls(seed="7", length=12)


def plan(messages: list[dict[str, Any]], *, controls: Controls = CONTROLS, **fields: Any) -> Plan:
    return plan_answer({"model": "sim", "messages": messages, **fields}, controls)


def prose(messages: list[dict[str, Any]]) -> str:
    return "".join(simulated_tokens(CONTROLS.seed, input_key_of(messages), CONTROLS.length))


def called(messages: list[dict[str, Any]], choice: Any) -> list[tuple[str, Any]]:
    """The (name, parsed arguments) of each call, or [] for a text answer."""
    fields: dict[str, Any] = {"tools": [WEATHER, TIME]}
    if choice is not None:
        fields["tool_choice"] = choice
    out = plan(messages, **fields)
    assert (out.finish_reason == "tool_calls") == bool(out.tool_calls)
    assert not (out.tool_calls and out.pieces)
    return [(c.name, json.loads(c.arguments)) for c in out.tool_calls]


def answered(name: str, result: str, call_id: str = "call_1") -> list[dict[str, Any]]:
    return [*QUESTION,
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": call_id, "content": result}]


@pytest.mark.parametrize("choice", ["auto", None, "required"])
def test_a_user_turn_with_tools_offered_calls_the_first_one(choice: str | None) -> None:
    calls = called(QUESTION, choice)
    assert [name for name, _ in calls] == ["get_weather"]
    jsonschema.validate(calls[0][1], WEATHER["function"]["parameters"])  # type: ignore[index]
    assert called(QUESTION, choice) == calls  # deterministic


def test_a_tool_without_parameters_gets_an_empty_object() -> None:
    out = plan(QUESTION, tools=[TIME], tool_choice="auto")
    assert [(c.name, c.arguments) for c in out.tool_calls] == [("get_time", "{}")]


def test_named_choice_calls_that_tool_and_parallel_calls_them_all() -> None:
    assert [n for n, _ in called(QUESTION, {"type": "function", "function": {"name": "get_time"}})] == ["get_time"]
    parallel = plan(QUESTION, controls=Controls(seed="7", parallel_tools=True), tools=[WEATHER, TIME],
                    tool_choice="auto")
    assert [c.name for c in parallel.tool_calls] == ["get_weather", "get_time"]


@pytest.mark.parametrize("fields", [{"tools": [WEATHER], "tool_choice": "none"}, {}, {"tool_choice": "auto"}])
def test_no_call_without_tools_or_with_none(fields: dict[str, Any]) -> None:
    out = plan(QUESTION, **fields)
    assert not out.tool_calls and out.finish_reason == "stop"
    assert "".join(out.pieces) == prose(QUESTION)


@pytest.mark.parametrize("choice", ["auto", None, "required", "none"])
def test_after_a_tool_result_it_answers_text_quoting_the_result(choice: str | None) -> None:
    messages = answered("get_weather", "21C and\n  sunny")
    assert called(messages, choice) == []
    out = plan(messages, tools=[WEATHER], **({"tool_choice": choice} if choice else {}))
    assert "".join(out.pieces) == 'The tool get_weather returned "21C and sunny". ' + prose(messages)
    assert out.finish_reason == "stop"
    assert all(p.startswith(" ") and " " not in p[1:] for p in out.pieces[1:])  # one word a chunk, like the prose


def test_several_results_long_results_and_unknown_calls() -> None:
    messages = [*answered("get_weather", "x" * 500),
                {"role": "tool", "tool_call_id": "call_unknown", "content": "12:00"}]
    text = "".join(plan(messages, tools=[WEATHER, TIME]).pieces)
    quoted = "x" * (TOOL_RESULT_QUOTE_CHARS - 3) + "..."
    assert text.startswith(f'The tool get_weather returned "{quoted}"; the tool returned "12:00". ')


def test_a_user_turn_after_the_tool_round_calls_again() -> None:
    messages = [*answered("get_weather", "21C"), {"role": "assistant", "content": "It is 21C."},
                {"role": "user", "content": "And the time?"}]
    assert [n for n, _ in called(messages, "auto")] == ["get_weather"]


def test_the_answer_to_a_tool_result_continues_exactly() -> None:
    messages = answered("get_weather", "21C")
    full = "".join(plan(messages, tools=[WEATHER]).pieces)
    for cut in (3, 20, len(full) - 2):
        prefill = [*messages, {"role": "assistant", "content": full[:cut]}]
        assert full[:cut] + "".join(plan(prefill, tools=[WEATHER]).pieces) == full
        instructed = [*prefill, {"role": "user", "content": CONTINUE_INSTRUCTION}]
        assert full[:cut] + "".join(plan(instructed, tools=[WEATHER]).pieces) == full


def test_a_continuation_is_text_even_when_tools_are_offered() -> None:
    full = prose(QUESTION)
    out = plan([*QUESTION, {"role": "assistant", "content": full[:10]}], tools=[WEATHER], tool_choice="auto")
    assert not out.tool_calls and full[:10] + "".join(out.pieces) == full
