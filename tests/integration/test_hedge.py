"""Hedged first token through a real server: the first deployment is slow to its first token (simulated 3 s), the
hedge on the second answers at once; the client gets the fast one's text, at the fast one's TTFT."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.test_responses_api import expected_text
from tests.support.client import post_stream
from tests.support.server import RouterThread, base_config
from tests.support.sse import assert_well_formed

SLOW_MS = 3000
HEDGE = {"enabled": True, "floor_ms": 50, "ceiling_ms": 100, "max_share": 1.0, "max_cost_share": 1.0}


def sim(name: str, seed: int, ttft_ms: int) -> dict[str, Any]:
    return {"name": name, "provider": "simulated", "model": name, "price": {"input": 1.0, "output": 2.0},
            "options": {"seed": seed, "ttft_ms": ttft_ms, "tps": 0, "length": 40}}


@pytest.fixture(scope="module")
def router() -> Iterator[RouterThread]:
    model = {"name": "hedged", "deployments": [sim("sim-slow", 8, SLOW_MS), sim("sim-fast", 7, 0)]}
    with RouterThread(base_config(model, hedge=HEDGE)) as server:
        yield server


def test_a_hedged_request_gets_the_fast_deployments_text_and_ttft(router: RouterThread) -> None:
    body = {"model": "hedged", "input": "Tell me about hedging"}
    began = time.monotonic()
    response, stream = post_stream(router.base_url, body, extra_headers={"x-unbroken-recovery-events": "true"},
                                   allow_extensions=True)
    elapsed = time.monotonic() - began
    assert response.status_code == 200, response.text
    assert_well_formed(stream)
    assert stream.terminal["type"] == "response.completed"
    assert stream.text() == expected_text("Tell me about hedging") == stream.output_text()  # seed 7: sim-fast's
    assert stream.text() != expected_text("Tell me about hedging", seed="8")
    assert elapsed < SLOW_MS / 1000 / 2  # nobody waited for the slow one
    router_field = stream.response["router"]
    assert router_field["served_by"] == "sim-fast"
    lost, won = router_field["attempts"]
    assert (lost["deployment"], lost["outcome"], lost["output_tokens"]) == ("sim-slow", "hedge_lost", 0)
    assert won["deployment"] == "sim-fast" and won["outcome"] == "ok"
    assert won["ttft_ms"] < SLOW_MS / 2
    hedge = [e for e in stream.events if e["type"].startswith("router:hedge.")]
    assert [(e["type"], e["deployment"]) for e in hedge] == [("router:hedge.started", "sim-fast"),
                                                             ("router:hedge.won", "sim-fast")]
