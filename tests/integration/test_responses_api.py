"""`POST /v1/responses` through a real uvicorn server in front of the simulated upstream: the stream's shape, the
spec validity of everything emitted, tool calls, errors, heartbeats and the stream deadline."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import pytest

from tests.support.client import post_json, post_stream
from tests.support.server import RouterThread, base_config, sim_model
from tests.support.spec import validate_response
from tests.support.sse import assert_well_formed
from unbroken.simulator import input_key_of, simulated_tokens


def expected_text(user_text: str, *, seed: str = "7", length: int = 40, instructions: str | None = None) -> str:
    """The simulated upstream's answer, computed from its own generator (the router is what is under test)."""
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    messages.append({"role": "user", "content": user_text})
    return "".join(simulated_tokens(seed, input_key_of(messages), length))


@pytest.fixture(scope="module")
def router() -> Iterator[RouterThread]:
    config = base_config(sim_model("demo"), sim_model("slow", deployments=1, tps=20, length=20),
                         heartbeat_seconds=0.02)
    with RouterThread(config) as server:
        yield server


def test_stream_text_is_spec_valid_dense_and_ends_with_done(router: RouterThread) -> None:
    response, stream = post_stream(router.base_url, {"model": "demo", "input": "Hello there"})
    assert response.status_code == 200
    assert_well_formed(stream)
    assert stream.types[:2] == ["response.created", "response.in_progress"]
    assert stream.terminal["type"] == "response.completed"
    assert stream.text() == expected_text("Hello there")
    assert stream.output_text() == stream.text()
    usage = stream.response["usage"]
    assert usage["output_tokens"] == 40 and usage["total_tokens"] == usage["input_tokens"] + 40


def test_instructions_and_items_input(router: RouterThread) -> None:
    body = {"model": "demo", "instructions": "Be brief.",
            "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}]}
    _, stream = post_stream(router.base_url, body)
    assert stream.text() == expected_text("Hi", instructions="Be brief.")
    assert stream.response["instructions"] == "Be brief."


def test_non_stream_returns_the_complete_response(router: RouterThread) -> None:
    response = post_json(router.base_url, "/responses", {"model": "demo", "input": "Hello there"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    validate_response(body)
    assert body["status"] == "completed"
    assert body["output"][0]["content"][0]["text"] == expected_text("Hello there")


def test_response_object_has_every_required_key_and_no_null_optionals(router: RouterThread) -> None:
    body = post_json(router.base_url, "/responses", {"model": "demo", "input": "x", "text": {"verbosity": "low"},
                                                     "reasoning": {"effort": "low"}, "metadata": {"a": "b"}}).json()
    validate_response(body)
    assert len([k for k in body if k != "router"]) >= 31
    part = body["output"][0]["content"][0]
    assert "logprobs" not in part or part["logprobs"] is not None
    assert body["metadata"] == {"a": "b"}
    assert body["reasoning"] == {"effort": "low", "summary": None}


WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "Weather for a city",
                "parameters": {"type": "object", "properties": {
                    "city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                    "required": ["city", "unit", "days"], "additionalProperties": False}}


def test_tool_call_streams_a_complete_function_call(router: RouterThread) -> None:
    _, stream = post_stream(router.base_url, {"model": "demo", "input": "Weather in Paris?",
                                              "tools": [WEATHER_TOOL], "tool_choice": "required"})
    assert_well_formed(stream)
    calls = stream.function_calls()
    assert len(calls) == 1 and calls[0]["name"] == "get_weather" and calls[0]["status"] == "completed"
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER_TOOL["parameters"])
    deltas = "".join(e["delta"] for e in stream.events if e["type"] == "response.function_call_arguments.delta")
    assert deltas == calls[0]["arguments"]
    done = [e for e in stream.events if e["type"] == "response.function_call_arguments.done"]
    assert done[0]["arguments"] == calls[0]["arguments"]
    assert stream.response["tools"][0] == {**WEATHER_TOOL, "strict": None}  # echoed with every required key


def test_named_tool_choice_and_tool_result_round_trip(router: RouterThread) -> None:
    first = post_json(router.base_url, "/responses", {
        "model": "demo", "input": "Weather?", "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "function", "name": "get_weather"}}).json()
    call = first["output"][0]
    assert call["type"] == "function_call"
    second = post_json(router.base_url, "/responses", {
        "model": "demo", "tools": [WEATHER_TOOL],
        "input": [{"role": "user", "content": "Weather?"},
                  {"type": "function_call", "call_id": call["call_id"], "name": call["name"],
                   "arguments": call["arguments"]},
                  {"type": "function_call_output", "call_id": call["call_id"], "output": "21C and sunny"}]}).json()
    validate_response(second)
    assert second["output"][0]["type"] == "message" and second["status"] == "completed"


def test_json_schema_output(router: RouterThread) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    body = post_json(router.base_url, "/responses", {
        "model": "demo", "input": "A person",
        "text": {"format": {"type": "json_schema", "name": "person", "schema": schema, "strict": True}}}).json()
    validate_response(body)
    jsonschema.validate(json.loads(body["output"][0]["content"][0]["text"]), schema)
    assert body["text"]["format"]["type"] == "json_schema" and body["text"]["format"]["name"] == "person"


def test_max_output_tokens_ends_incomplete(router: RouterThread) -> None:
    _, stream = post_stream(router.base_url, {"model": "demo", "input": "Hello", "max_output_tokens": 16})
    assert_well_formed(stream)
    assert stream.terminal["type"] == "response.incomplete"
    assert stream.response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert stream.response["output"][0]["status"] == "incomplete"
    assert len(stream.text()) > 0


def test_heartbeat_comments_while_no_event_flows(router: RouterThread) -> None:
    # 20 tokens/s upstream and a 20 ms heartbeat interval: quiet gaps between tokens get keep-alive comments.
    _, stream = post_stream(router.base_url, {"model": "slow", "input": "Hello"})
    assert_well_formed(stream)
    assert stream.heartbeats >= 1


def test_stream_deadline_ends_with_a_terminal_event() -> None:
    config = base_config(sim_model("demo", deployments=1, tps=50, length=400), stream_deadline_seconds=1.5)
    with RouterThread(config) as router:
        _, stream = post_stream(router.base_url, {"model": "demo", "input": "Hello"})
    assert_well_formed(stream)
    assert stream.terminal["type"] == "response.incomplete"
    assert stream.response["incomplete_details"] == {"reason": "stream_deadline"}
    assert 0 < len(stream.text()) < len(expected_text("Hello", length=400))


def test_openresponses_version_header_is_accepted(router: RouterThread) -> None:
    response = post_json(router.base_url, "/responses", {"model": "demo", "input": "hi"},
                         extra_headers={"OpenResponses-Version": "latest"})
    assert response.status_code == 200


def test_models_lists_public_models(router: RouterThread) -> None:
    with httpx.Client() as client:
        body = client.get(f"{router.base_url}/models", headers={"authorization": "Bearer sk-test"}).json()
    assert [m["id"] for m in body["data"]] == ["demo", "slow"]
    assert all(m["object"] == "model" for m in body["data"])


PNG = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU"
       "5ErkJggg==")


def test_images_as_data_urls_and_https_urls_only_where_accepted() -> None:
    bytes_only = sim_model("bytes", deployments=1)
    bytes_only["deployments"][0]["options"]["image_urls"] = False
    mixed = sim_model("mixed", deployments=2)
    mixed["deployments"][0]["options"]["image_urls"] = False
    with RouterThread(base_config(bytes_only, mixed)) as router:
        def ask(model: str, url: str) -> httpx.Response:
            return post_json(router.base_url, "/responses", {"model": model, "input": [{"role": "user", "content": [
                {"type": "input_text", "text": "What is this?"}, {"type": "input_image", "image_url": url}]}]})

        assert ask("bytes", PNG).json()["status"] == "completed"
        refused = ask("bytes", "https://example.com/cat.png")
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "image_url_not_supported"
        served = ask("mixed", "https://example.com/cat.png").json()
        assert served["status"] == "completed"  # routed past the bytes-only deployment, URL never fetched
