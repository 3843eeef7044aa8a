"""Routing through a real server on simulated deployments: the policy header, the opt-in explanation (field and
header), capability constraints, waiting or moving on after a 429 / 5xx, context-length moves and cache affinity
across the turns of a conversation (previous_response_id)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.client import post_json, post_stream
from tests.support.server import RouterThread, base_config
from unbroken.config import HealthSettings
from unbroken.journal.memory import MemoryStore

EXPLAIN = {"x-unbroken-explain": "true"}
FAST = {"seed": 7, "ttft_ms": 0, "tps": 0, "length": 20, "ttft_timeout_s": 2.0, "stall_timeout_s": 1.0}


def sim(name: str, price: tuple[float, ...], **options: Any) -> dict[str, Any]:
    keys = ("input", "output", "cached_input")
    return {"name": name, "provider": "simulated", "model": name, "price": dict(zip(keys, price, strict=False)),
            "options": {**FAST, **options}}


def sim_model(name: str, *deployments: dict[str, Any], **routing: Any) -> dict[str, Any]:
    return {"name": name, "deployments": list(deployments), "routing": routing}


@pytest.fixture(scope="module")
def router() -> Iterator[RouterThread]:
    models = [
        sim_model("pick", sim("dear", (5.0, 10.0)), sim("cheap", (0.1, 0.2))),
        sim_model("wait", sim("cheap", (1.0, 1.0)), sim("dear", (5.0, 5.0)), policy="cheapest"),
        sim_model("ctx", sim("small", (1.0, 1.0), fault="context_length", fault_attempts=99, context_window=8000),
                  sim("same", (1.0, 1.0), context_window=8000), sim("unknown", (1.0, 1.0)),
                  sim("large", (1.0, 1.0), context_window=200_000)),
        sim_model("text-only", {**sim("a", (1.0, 1.0)), "capabilities": {"images": False}},
                  {**sim("b", (1.0, 1.0)), "capabilities": {"images": False}}),
    ]
    with RouterThread(base_config(*models)) as server:
        yield server


def respond(router: RouterThread, model: str, *, headers: dict[str, str] | None = None, **body: Any) -> Any:
    response = post_json(router.base_url, "/responses", {"model": model, "input": "Route me", **body},
                         extra_headers=headers)
    return response


def test_the_policy_header_overrides_the_models_policy(router: RouterThread) -> None:
    ordered = respond(router, "pick")
    assert ordered.status_code == 200 and ordered.json()["router"]["served_by"] == "dear"
    cheapest = respond(router, "pick", headers={"X-Unbroken-Policy": "cheapest"})
    assert cheapest.status_code == 200, cheapest.text
    assert cheapest.json()["router"]["served_by"] == "cheap" and cheapest.headers["x-unbroken-deployment"] == "cheap"


@pytest.mark.parametrize("path", ["/responses", "/chat/completions"])
def test_an_unknown_policy_is_a_400_naming_the_header(router: RouterThread, path: str) -> None:
    body: dict[str, Any] = {"model": "pick", "input": "hi"} if path == "/responses" else {
        "model": "pick", "messages": [{"role": "user", "content": "hi"}]}
    response = post_json(router.base_url, path, body, extra_headers={"X-Unbroken-Policy": "cheap-ish"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "X-Unbroken-Policy" and error["code"] == "unknown_routing_policy"


def test_the_explanation_is_opt_in_in_the_router_field_and_the_stream_header(router: RouterThread) -> None:
    plain = respond(router, "pick", headers={"X-Unbroken-Policy": "cheapest"})
    assert "routing" not in plain.json()["router"]
    response, stream = post_stream(router.base_url, {"model": "pick", "input": "Route me"},
                                   extra_headers={"X-Unbroken-Policy": "cheapest", **EXPLAIN})
    assert response.status_code == 200 and response.headers["x-unbroken-deployment"] == "cheap"
    routing = stream.response["router"]["routing"]
    assert routing["policy"] == "cheapest" and routing["source"] == "header"
    assert [r["deployment"] for r in routing["ranked"]] == ["cheap", "dear"]
    cheap, dear = routing["ranked"]
    assert 0 < cheap["expected_cost_usd"] < dear["expected_cost_usd"]
    assert routing["reason"].startswith("cheapest: cheap expected $") and routing["input_tokens"] > 0
    _, unexplained = post_stream(router.base_url, {"model": "pick", "input": "Route me"})
    assert "routing" not in unexplained.response["router"]


def test_no_deployment_with_a_needed_capability_is_a_400_saying_so(router: RouterThread) -> None:
    image = {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo="}
    response = respond(router, "text-only", input=[{"role": "user", "content": [
        {"type": "input_text", "text": "What is this?"}, image]}])
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "no_capable_deployment" and error["param"] == "input"
    assert "it needs images" in error["message"] and "a: no images" in error["message"]
    assert respond(router, "text-only").status_code == 200  # text alone is served


def fault(spec: str) -> dict[str, str]:
    return {"sim_fault": spec, "sim_fault_attempts": "1"}


def test_cheapest_waits_for_the_rate_limited_cheap_deployment_and_fastest_moves_on(router: RouterThread) -> None:
    waited = respond(router, "wait", metadata=fault("http:429:0.2"), headers=EXPLAIN)
    assert waited.status_code == 200, waited.text
    accounting = waited.json()["router"]
    assert [(a["deployment"], a["outcome"]) for a in accounting["attempts"]] == [
        ("cheap", "rate_limited"), ("cheap", "ok")]
    decision = accounting["routing"]["decisions"][0]
    assert decision["action"] == "wait" and decision["wait_s"] == 0.2 and "5.0x as much" in decision["reason"]
    moved = respond(router, "wait", metadata=fault("http:429:0.2"), headers={"X-Unbroken-Policy": "fastest",
                                                                             **EXPLAIN})
    accounting = moved.json()["router"]
    assert [(a["deployment"], a["outcome"]) for a in accounting["attempts"]] == [
        ("cheap", "rate_limited"), ("dear", "ok")]
    assert accounting["routing"]["decisions"][0]["action"] == "move"


def test_a_transient_5xx_is_waited_out_on_the_much_cheaper_deployment(router: RouterThread) -> None:
    response = respond(router, "wait", metadata=fault("http:503"), headers=EXPLAIN)
    accounting = response.json()["router"]
    assert [(a["deployment"], a["outcome"]) for a in accounting["attempts"]] == [
        ("cheap", "overloaded"), ("cheap", "ok")]
    assert accounting["routing"]["decisions"][0]["action"] == "wait"


def test_a_context_length_error_moves_only_to_larger_or_unknown_windows(router: RouterThread) -> None:
    response = respond(router, "ctx")
    assert response.status_code == 200, response.text
    attempts = response.json()["router"]["attempts"]
    # `same` (8000, not larger) is skipped; `unknown` may be larger, and comes before `large` in the order
    assert [(a["deployment"], a["outcome"]) for a in attempts] == [("small", "context_length"), ("unknown", "ok")]


# -- cache affinity ---------------------------------------------------------------------------------------------

LONG_PROMPT = " ".join(f"Clause {i} of the agreement says nothing new." for i in range(300))  # ~13 KB


@pytest.fixture(scope="module")
def conversations() -> Iterator[RouterThread]:
    # `a` caches prompts at a tenth of its input price, `b` lists cheaper input and no cache price.
    models = [sim_model(name, sim("a", (1.0, 1.0, 0.1)), sim("b", (b_input, 1.0)), policy="cheapest")
              for name, b_input in (("conv", 0.8), ("conv-far", 0.05), ("conv-open", 0.8))]
    with RouterThread(base_config(*models), store=MemoryStore()) as server:
        yield server


def first_turn(server: RouterThread, model: str) -> str:
    turn = respond(server, model, input=LONG_PROMPT, headers={"X-Unbroken-Policy": "ordered"})
    assert turn.status_code == 200 and turn.json()["router"]["served_by"] == "a", turn.text
    return str(turn.json()["id"])


def second_turn(server: RouterThread, model: str, previous: str) -> dict[str, Any]:
    turn = respond(server, model, input="And the last clause?", previous_response_id=previous, headers=EXPLAIN)
    assert turn.status_code == 200, turn.text
    router: dict[str, Any] = turn.json()["router"]
    return router


def test_a_second_turn_stays_on_the_deployment_holding_its_prompt_cache(conversations: RouterThread) -> None:
    fresh = respond(conversations, "conv", input="And the last clause?", headers=EXPLAIN).json()["router"]
    assert fresh["served_by"] == "b"  # without a predecessor, `b`'s list price wins
    router = second_turn(conversations, "conv", first_turn(conversations, "conv"))
    assert router["served_by"] == "a"
    routing = router["routing"]
    assert routing["affinity"]["deployment"] == "a" and routing["affinity"]["via"] == "previous_response_id"
    assert routing["affinity"]["shared_tokens"] > 2000
    assert "stays first with its prompt cache" in routing["reason"]


def test_affinity_gives_way_when_the_difference_is_larger(conversations: RouterThread) -> None:
    router = second_turn(conversations, "conv-far", first_turn(conversations, "conv-far"))
    assert router["served_by"] == "b" and "even with its prompt cache b ranks first" in router["routing"]["reason"]


def test_affinity_gives_way_when_the_predecessors_circuit_is_open(conversations: RouterThread) -> None:
    previous = first_turn(conversations, "conv-open")
    for _ in range(HealthSettings().failures_to_open):
        conversations.runtime.health.record_failure("conv-open", "a")
    router = second_turn(conversations, "conv-open", previous)
    assert router["served_by"] == "b" and "its circuit is open" in router["routing"]["reason"]


def test_the_same_long_prompt_prefix_finds_its_deployment_without_previous_response_id(
        conversations: RouterThread) -> None:
    respond(conversations, "conv", input=LONG_PROMPT, headers={"X-Unbroken-Policy": "ordered"})
    again = respond(conversations, "conv", input=LONG_PROMPT + " One more question.", headers=EXPLAIN)
    router = again.json()["router"]
    assert router["served_by"] == "a" and router["routing"]["affinity"]["via"] == "prompt_prefix"


def test_a_journaled_stream_carries_the_deployment_header_and_the_explanation(conversations: RouterThread) -> None:
    response, stream = post_stream(conversations.base_url, {"model": "conv", "input": "Route me"},
                                   extra_headers={"X-Unbroken-Policy": "ordered", **EXPLAIN})
    assert response.status_code == 200 and response.headers["x-unbroken-deployment"] == "a"
    assert stream.response["router"]["routing"]["policy"] == "ordered"
    plain, _ = post_stream(conversations.base_url, {"model": "conv", "input": "Route me"})
    assert "x-unbroken-deployment" not in plain.headers
