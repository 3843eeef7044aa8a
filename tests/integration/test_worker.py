"""The worker (background mode on AWS): a background response produced by one invocation that runs out of time
hands off to the next, which goes on from the journal; the combined stream is dense and complete, and both
invocations' charges reach the store."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.test_responses_api import expected_text
from tests.support.server import base_config, config_from, sim_model
from unbroken.api.app import create_app
from unbroken.durable import spend
from unbroken.durable.runtime import Runtime
from unbroken.journal.memory import MemoryStore
from unbroken.journal.store import ResponseHeader
from unbroken.simulator import SimulatedUpstream
from unbroken.worker import HANDOFF_MARGIN_SECONDS, run_event


@pytest.fixture(scope="module")
def sim() -> Iterator[Any]:
    with SimulatedUpstream.start_in_thread() as handle:
        yield handle


async def queued_background(sim: Any, **request: Any) -> tuple[Runtime, MemoryStore]:
    """A runtime over a memory store holding one queued background response (`resp_bg`) of ~120 paced tokens."""
    model = sim_model("slow", deployments=1, length=120, tps=40)
    model["deployments"][0]["base_url"] = sim.base_url
    store = MemoryStore()
    runtime = create_app(config_from(base_config(model, lease_seconds=1.0)), store).state.runtime
    now = time.time()
    await store.create(ResponseHeader(
        id="resp_bg", tenant="t1", created_at=now, expires_at=now + 3600, status="queued", background=True,
        request={"model": "slow", "input": [{"type": "message", "role": "user", "content": "work in the background"}],
                 "background": True, **request}))
    return runtime, store


async def test_background_response_hands_off_between_invocations(sim: Any) -> None:
    runtime, store = await queued_background(sim)
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


async def test_a_handed_off_response_is_charged_by_both_invocations(sim: Any) -> None:
    """Spend across the worker's invocations: both owners charge (the first up to the handoff, the second the rest),
    and each invocation leaves its charges in the store, not pending in a process Lambda may freeze."""
    runtime, store = await queued_background(sim, **{spend.KEY_ID_FIELD: "key_worker"})
    queued: list[dict[str, Any]] = []
    first = await run_event(runtime, {"kind": "background", "response_id": "resp_bg", "epoch": 0},
                            time.time() + HANDOFF_MARGIN_SECONDS + 1.0, queued.append)
    assert first["status"] == "handed_off"
    day = spend.day_of(time.time())
    keys = [spend.spend_key("key", "key_worker", day), spend.spend_key("tenant", "t1", day),
            spend.spend_key("model", "slow", day)]
    after_first = await store.get_counters(keys)  # the store itself: nothing left only in this process
    assert after_first[keys[0]]["usd"] > 0
    second = await run_event(runtime, queued[0], time.time() + 900, queued.append)
    assert second["status"] == "done"
    header = await store.get("resp_bg")
    assert header is not None and header.response is not None
    cost = header.response["router"]["cost_usd"]
    stored = await store.get_counters(keys)
    for key in keys:
        assert stored[key]["usd"] == pytest.approx(cost, abs=1e-9), key
    assert stored[keys[0]]["usd"] > after_first[keys[0]]["usd"]  # the second owner added its own
    assert runtime.counters.pending(keys[0]) == {}
    await runtime.aclose()
