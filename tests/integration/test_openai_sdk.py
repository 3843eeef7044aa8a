"""The official `openai` SDK against the real server: streamed and non-streamed responses, text and tool calls."""

from __future__ import annotations

import json
from collections.abc import Iterator

import jsonschema
import pytest
from openai import OpenAI

from tests.integration.test_responses_api import WEATHER_TOOL, expected_text
from tests.support.server import API_KEY, RouterThread, base_config, sim_model
from tests.support.spec import validate_event, validate_response


@pytest.fixture(scope="module")
def client() -> Iterator[OpenAI]:
    with RouterThread(base_config(sim_model("demo"))) as router:
        yield OpenAI(base_url=router.base_url, api_key=API_KEY, max_retries=0, timeout=30)


def test_responses_create_stream_text(client: OpenAI) -> None:
    stream = client.responses.create(model="demo", input="Hello SDK", stream=True)
    events = list(stream)
    for event in events:
        validate_event(event.model_dump(mode="json", exclude_unset=True))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == expected_text("Hello SDK")
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == text


def test_responses_stream_helper_text(client: OpenAI) -> None:
    with client.responses.stream(model="demo", input="Hello helper") as stream:
        for _ in stream:
            pass
        final = stream.get_final_response()
    assert final.status == "completed"
    assert final.output_text == expected_text("Hello helper")


def test_responses_create_non_stream_text(client: OpenAI) -> None:
    response = client.responses.create(model="demo", input="Hello plain")
    validate_response(response.model_dump(mode="json", exclude_unset=True))
    assert response.output_text == expected_text("Hello plain")
    assert response.usage is not None and response.usage.output_tokens == 40


def test_responses_create_stream_tool_call(client: OpenAI) -> None:
    stream = client.responses.create(model="demo", input="Weather?", tools=[WEATHER_TOOL],  # type: ignore[list-item]
                                     tool_choice="required", stream=True)
    events = list(stream)
    calls = [i for i in events[-1].response.output if i.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER_TOOL["parameters"])


def test_responses_stream_helper_tool_call(client: OpenAI) -> None:
    with client.responses.stream(model="demo", input="Weather?", tools=[WEATHER_TOOL],  # type: ignore[list-item]
                                 tool_choice="required") as stream:
        done_args = [e.arguments for e in stream if e.type == "response.function_call_arguments.done"]
        final = stream.get_final_response()
    call = final.output[0]
    assert call.type == "function_call" and done_args == [call.arguments]


def test_responses_create_non_stream_tool_call(client: OpenAI) -> None:
    response = client.responses.create(model="demo", input="Weather?", tools=[WEATHER_TOOL],  # type: ignore[list-item]
                                       tool_choice={"type": "function", "name": "get_weather"})
    assert response.output[0].type == "function_call"
    jsonschema.validate(json.loads(response.output[0].arguments), WEATHER_TOOL["parameters"])


def test_two_turn_tool_call_under_auto(client: OpenAI) -> None:
    """What a client trying tools does: offer one (tool_choice left to the model), run the call it gets, send the
    result back with the conversation, and get an answer that uses it."""
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.responses.create(model="demo", input=question, tools=[WEATHER_TOOL])  # type: ignore[arg-type,list-item]
    validate_response(first.model_dump(mode="json", exclude_unset=True))
    assert first.status == "completed" and [i.type for i in first.output] == ["function_call"]
    call = first.output[0]
    assert call.type == "function_call" and call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER_TOOL["parameters"])
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "21C and sunny"}
    with client.responses.stream(model="demo", tools=[WEATHER_TOOL],  # type: ignore[list-item]
                                 input=[*question, call.model_dump(exclude_none=True), result]) as stream:
        second = stream.get_final_response()
    validate_response(second.model_dump(mode="json", exclude_unset=True))
    assert second.status == "completed" and [i.type for i in second.output] == ["message"]
    assert second.output_text.startswith('The tool get_weather returned "21C and sunny". ')


def test_models_list(client: OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["demo"]


def test_sdk_sees_a_clear_error(client: OpenAI) -> None:
    import openai

    with pytest.raises(openai.NotFoundError) as err:
        client.responses.create(model="nope", input="x")
    assert err.value.body["code"] == "model_not_found"  # type: ignore[index]
