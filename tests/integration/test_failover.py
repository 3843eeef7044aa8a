"""Failover and continuation through the real server against the simulated upstream: invisible before output, one
uninterrupted item after output, dense sequence numbers and the fault-free text either way."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.test_responses_api import WEATHER_TOOL, expected_text
from tests.support.client import post_stream
from tests.support.server import RouterThread, base_config, sim_model
from tests.support.sse import Stream, assert_well_formed

RECOVERY = {"x-unbroken-recovery-events": "true"}


@pytest.fixture(scope="module")
def router() -> Iterator[RouterThread]:
    fast = {"ttft_timeout_s": 1.0, "stall_timeout_s": 0.5}  # silent upstreams are detected quickly here
    instruction_model = sim_model("instr", literal_continuation=False, **fast)
    mixed = sim_model("mixed", **fast)
    mixed["deployments"][1]["options"]["literal_continuation"] = False
    with RouterThread(base_config(sim_model("demo", **fast), instruction_model, mixed)) as server:
        yield server


def run(router: RouterThread, model: str, fault: str, attempts: int = 1, **extra: Any) -> Stream:
    body = {"model": model, "input": "Tell me about failover",
            "metadata": {"sim_fault": fault, "sim_fault_attempts": str(attempts)}, **extra}
    response, stream = post_stream(router.base_url, body, extra_headers=extra.pop("headers", None))
    assert response.status_code == 200, response.text
    assert_well_formed(stream)
    return stream


FAULT_FREE = expected_text("Tell me about failover")


@pytest.mark.parametrize("fault", ["http:503", "http:429", "http:500", "timeout"])
def test_failure_before_output_is_invisible(router: RouterThread, fault: str) -> None:
    stream = run(router, "demo", fault)
    assert stream.terminal["type"] == "response.completed"
    assert stream.text() == FAULT_FREE
    assert not any(t.startswith("router:") for t in stream.types)


@pytest.mark.parametrize("fault", ["cut:7", "error:7", "malformed:7", "stall:7"])
@pytest.mark.parametrize("model", ["demo", "instr", "mixed"])
def test_mid_stream_failure_continues_into_the_same_item(router: RouterThread, fault: str, model: str) -> None:
    stream = run(router, model, fault, attempts=1)
    assert stream.terminal["type"] == "response.completed"
    messages = [i for i in stream.response["output"] if i["type"] == "message"]
    assert len(messages) == 1, "the client sees one uninterrupted message"
    assert stream.text() == FAULT_FREE
    assert stream.output_text() == FAULT_FREE


def test_no_done_after_finish_is_not_a_failure(router: RouterThread) -> None:
    stream = run(router, "demo", "no_done", attempts=99)
    assert stream.terminal["type"] == "response.completed"
    assert stream.text() == FAULT_FREE


def test_recovery_events_only_for_clients_that_opt_in(router: RouterThread) -> None:
    body = {"model": "mixed", "input": "Tell me about failover", "metadata": {"sim_fault": "cut:5"}}
    _, plain = post_stream(router.base_url, body)
    assert not any(t.startswith("router:") for t in plain.types)
    _, opted = post_stream(router.base_url, body, extra_headers=RECOVERY, allow_extensions=True)
    kinds = [e for e in opted.events if e["type"].startswith("router:")]
    assert [e["type"] for e in kinds] == ["router:stream.interrupted", "router:stream.resumed"]
    assert kinds[0]["reason"] == "connection" and kinds[0]["deployment"] == "sim-0"
    assert kinds[1]["deployment"] in ("sim-0", "sim-1")
    assert opted.text() == FAULT_FREE
    accounting = opted.response["router"]
    assert len(accounting["attempts"]) == 2 and accounting["attempts"][0]["outcome"] == "connection"


def test_nothing_can_continue_ends_incomplete_with_partial_output(router: RouterThread) -> None:
    stream = run(router, "demo", "cut:6", attempts=99)
    assert stream.terminal["type"] == "response.incomplete"
    assert stream.response["incomplete_details"] == {"reason": "upstream_unavailable"}
    message = stream.response["output"][0]
    assert message["status"] == "incomplete"
    assert len(stream.text()) > 0 and FAULT_FREE.startswith(stream.text())


def test_tool_call_cut_in_half_is_redone_not_half_sent(router: RouterThread) -> None:
    stream = run(router, "demo", "cut:2", attempts=1, tools=[WEATHER_TOOL], tool_choice="required")
    assert stream.terminal["type"] == "response.completed"
    calls = [i for i in stream.response["output"] if i["type"] == "function_call"]
    complete = [c for c in calls if c["status"] == "completed"]
    assert len(complete) == 1 and complete[0]["arguments"]
    for e in stream.events:
        if e["type"] == "response.function_call_arguments.delta":
            # held until complete: each call's arguments go out in one piece, never half
            assert e["delta"] == next(c["arguments"] for c in calls if c["id"] == e["item_id"])
