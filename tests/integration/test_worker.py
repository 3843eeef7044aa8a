"""The worker (background mode on AWS): a background response produced by one invocation that runs out of time
hands off to the next, which goes on from the journal; the combined stream is dense and complete."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.test_responses_api import expected_text
from tests.support.server import base_config, config_from, sim_model
from unbroken.api.app import create_app
from unbroken.journal.memory import MemoryStore
from unbroken.journal.store import ResponseHeader
from unbroken.simulator import SimulatedUpstream
from unbroken.worker import HANDOFF_MARGIN_SECONDS, run_event


@pytest.fixture(scope="module")
def sim() -> Iterator[Any]:
    with SimulatedUpstream.start_in_thread() as handle:
        yield handle


async def test_background_response_hands_off_between_invocations(sim: Any) -> None:
    model = sim_model("slow", deployments=1, length=120, tps=40)
    model["deployments"][0]["base_url"] = sim.base_url
    store = MemoryStore()
    runtime = create_app(config_from(base_config(model, lease_seconds=1.0)), store).state.runtime
    now = time.time()
    await store.create(ResponseHeader(
        id="resp_bg", tenant="t1", created_at=now, expires_at=now + 3600, status="queued", background=True,
        request={"model": "slow", "input": [{"type": "message", "role": "user", "content": "work in the background"}],
                 "background": True}))
    queued: list[dict[str, Any]] = []
    # First invocation: only ~1 s before its deadline (less the handoff margin) — far less than the answer needs.
    first = await run_event(runtime, {"kind": "background", "response_id": "resp_bg", "epoch": 0},
                            time.time() + HANDOFF_MARGIN_SECONDS + 1.0, queued.append)
    assert first["status"] == "handed_off"
    assert queued == [{"kind": "handoff", "response_id": "resp_bg", "epoch": 1, "hop": 1, "reason": "deadline"}]
    partial = await store.read_events("resp_bg")
    assert partial and not any(e["type"] == "response.completed" for e in partial)
    # A duplicate or stale event (an epoch that has moved) does nothing.
    stale = await run_event(runtime, {"kind": "background", "response_id": "resp_bg", "epoch": 0},
                            time.time() + 900, queued.append)
    assert stale["status"] == "skipped"
    second = await run_event(runtime, queued[0], time.time() + 900, queued.append)
    assert second["status"] == "done"
    events = await store.read_events("resp_bg")
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events[:3]] == ["response.created", "response.queued", "response.in_progress"]
    assert events[-1]["type"] == "response.completed"
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == expected_text("work in the background", length=120)
    header = await store.get("resp_bg")
    assert header is not None and header.status == "completed" and header.owner_epoch == 2
    await runtime.aclose()
