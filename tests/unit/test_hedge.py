"""Hedged first token (`resilience/attempts.py`, the first attempt): a late first token starts the next deployment
alongside, the first to stream wins and the other is closed before any of its output reaches the client.

Late is scripted with `Wait(event)` (the test or the other script sets it); the hedge threshold is a few
milliseconds (floor = ceiling) so the race's own timer is the only real wait."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from tests.support.fake_provider import HANG, Do, Fail, FakePool, FakeProvider, Step, Wait, text_attempt
from tests.unit.test_attempts import BOUND, Outcome, assert_dense, user_request
from unbroken.config import Deployment, HedgeSettings, Price, ServerSettings
from unbroken.ir import TextDelta
from unbroken.protocol.responses import Event, ResponseEmitter
from unbroken.resilience.attempts import Generation, GenerationOptions, NoOutput, Route, RunControl, hedgeable
from unbroken.routing.health import HealthBoard

THRESHOLD_MS = 10.0
HEDGE = HedgeSettings(enabled=True, floor_ms=THRESHOLD_MS, ceiling_ms=THRESHOLD_MS, max_share=1.0,
                      max_cost_share=1.0)


def dep(name: str, **options: Any) -> Deployment:
    return Deployment(name=name, provider="openai", model=f"model-{name}", price=Price(input=1.0, output=2.0),
                      options=options)


async def run(deployments: Sequence[tuple[Deployment, Sequence[Sequence[Step]]]], *,
              hedge: HedgeSettings = HEDGE, health: HealthBoard | None = None, recovery: bool = False,
              options: GenerationOptions | None = None) -> Outcome:
    pool = FakePool(*(FakeProvider(d, script) for d, script in deployments))
    route = Route("m", tuple(d for d, _ in deployments), pool, health or HealthBoard())
    emitter = ResponseEmitter({"id": "resp_test", "object": "response", "model": "m", "status": "queued",
                               "output": []}, hold_tool_arguments=True)
    gen = Generation(user_request("a question long enough to cost some input tokens"), route, emitter,
                     ServerSettings(hedge=hedge), options or GenerationOptions(recovery_events=recovery),
                     RunControl(time.time() + 600))
    events: list[Event] = []
    no_output: NoOutput | None = None
    async with asyncio.timeout(BOUND):
        try:
            async for ev in gen.run():
                events.append(ev)
        except NoOutput as exc:
            no_output = exc
    assert_dense(events)
    return Outcome(events, gen, pool, no_output)


def never() -> asyncio.Event:
    return asyncio.Event()


async def test_a_late_first_token_starts_the_next_deployment_and_the_faster_one_wins() -> None:
    started: dict[str, float] = {}
    slow = [Do(lambda: started.setdefault("a", time.monotonic())), Wait(never()), TextDelta("SLOW TEXT")]
    fast = [Do(lambda: started.setdefault("b", time.monotonic())), *text_attempt("fast ", "answer")]
    out = await run([(dep("a"), [slow]), (dep("b"), [fast])])
    assert out.pool.called == ["a", "b"]
    assert started["b"] - started["a"] >= THRESHOLD_MS / 1000 * 0.9  # the hedge waited for the threshold
    assert out.final_text() == "fast answer" == out.streamed_text
    assert "SLOW" not in repr(out.events)  # nothing of the loser reached the client
    assert out.pool.providers["a"].closed_streams == 1  # the loser's stream was closed
    assert out.outcomes == ["hedge_lost", "ok"]  # the winner is the last attempt: the one that served
    assert out.types.count("response.created") == 1
    assert not any(t.startswith("router:") for t in out.types)  # no recovery events unless opted in
    router = out.terminal["response"]["router"] if out.terminal else {}
    lost, won = router["attempts"]
    assert router["served_by"] == "b"
    assert lost["outcome"] == "hedge_lost" and lost["input_tokens"] > 0 and lost["output_tokens"] == 0
    assert lost["usage_estimated"] and lost["cost_usd"] > 0  # the loser's input was sent: it is charged
    assert router["cost_usd"] == round(lost["cost_usd"] + won["cost_usd"], 8)
    usage = out.terminal["response"]["usage"] if out.terminal else {}
    assert usage["input_tokens"] == lost["input_tokens"] + won["input_tokens"]


async def test_the_primary_wins_when_its_first_token_comes_first() -> None:
    late = never()
    out = await run([(dep("a"), [[Wait(late), *text_attempt("primary")]]),
                     (dep("b"), [[Do(late.set), Wait(never()), TextDelta("HEDGE TEXT")]])])
    assert out.final_text() == "primary"
    assert "HEDGE" not in repr(out.events)
    assert out.pool.providers["b"].closed_streams == 1
    assert [(a.deployment, a.outcome) for a in out.generation.attempts] == [("b", "hedge_lost"), ("a", "ok")]


async def test_recovery_events_name_the_deployments_only_when_opted_in() -> None:
    out = await run([(dep("a"), [[Wait(never())]]), (dep("b"), [text_attempt("fast")])], recovery=True)
    hedge = [e for e in out.events if e["type"].startswith("router:hedge.")]
    assert [e["type"] for e in hedge] == ["router:hedge.started", "router:hedge.won"]
    assert (hedge[0]["deployment"], hedge[0]["primary"], hedge[0]["after_ms"]) == ("b", "a", THRESHOLD_MS)
    assert (hedge[1]["deployment"], hedge[1]["lost"]) == ("b", "a")
    # Before the winner's output, after the start events (the header hold was not spent on the hedge).
    assert out.types[:4] == ["response.created", "response.in_progress", "router:hedge.started",
                             "router:hedge.won"]


async def test_the_header_hold_and_the_hedge_timer_are_independent() -> None:
    # The hold (1 ms) commits the response before the hedge starts (10 ms); the hedge event follows at once.
    out = await run([(dep("a"), [[Wait(never())]]), (dep("b"), [text_attempt("fast")])], recovery=True,
                    options=GenerationOptions(recovery_events=True, header_hold_seconds=0.001))
    assert out.types[:3] == ["response.created", "response.in_progress", "router:hedge.started"]
    assert out.final_text() == "fast"


async def test_the_share_bound_stops_hedging() -> None:
    board = HealthBoard()
    hedge = HEDGE.model_copy(update={"max_share": 0.4})
    first = await run([(dep("a"), [[Wait(never())]]), (dep("b"), [text_attempt("fast")])],
                      hedge=hedge, health=board)
    assert first.outcomes == ["hedge_lost", "ok"]
    # The next request of the model finds its share spent: the slow one keeps its own TTFT timeout, then fails over.
    second = await run([(dep("a", ttft_timeout_s=0.05), [[HANG]]), (dep("b"), [text_attempt("fast")])],
                       hedge=hedge, health=board)
    assert second.outcomes == ["timeout", "ok"]


async def test_the_cost_bound_stops_hedging() -> None:
    board = HealthBoard()
    budget = board.hedge_budget("m")
    budget.note_request()
    budget.cost, budget.hedge_cost = 1.0, 0.5  # half the model's recent spend was hedges that lost
    out = await run([(dep("a", ttft_timeout_s=0.05), [[HANG]]), (dep("b"), [text_attempt("fast")])],
                    hedge=HEDGE.model_copy(update={"max_cost_share": 0.2}), health=board)
    assert out.outcomes == ["timeout", "ok"]


async def test_no_hedge_when_disabled() -> None:
    out = await run([(dep("a", ttft_timeout_s=0.05), [[HANG]]), (dep("b"), [text_attempt("fast")])],
                    hedge=HedgeSettings())
    assert out.outcomes == ["timeout", "ok"]


async def test_no_hedge_without_another_deployment() -> None:
    late = never()
    asyncio.get_running_loop().call_later(0.05, late.set)  # the only deployment answers late, unhedged
    out = await run([(dep("a"), [[Wait(late), *text_attempt("only")]])])
    assert out.outcomes == ["ok"] and out.final_text() == "only"


async def test_no_hedge_for_a_continuation() -> None:
    out = await run([(dep("a"), [[TextDelta("Hello, wor"), Fail("connection")]]),
                     (dep("b", ttft_timeout_s=0.05), [[HANG]]),
                     (dep("c"), [text_attempt("ld!")])])
    assert out.outcomes == ["connection", "timeout", "ok"]
    assert out.final_text() == "Hello, world!"


async def test_a_racer_that_fails_drops_out_and_the_other_races_on() -> None:
    late = never()
    out = await run([(dep("a"), [[Wait(late), Fail("server_error")]]),
                     (dep("b"), [[Do(late.set), *text_attempt("fast")]])])
    assert out.final_text() == "fast"
    assert out.outcomes == ["server_error", "ok"]


async def test_the_hedge_threshold_follows_the_live_p95() -> None:
    board = HealthBoard()
    for _ in range(20):
        board.record_success("m", "a", 0.002)  # a's p95 is far below the floor: the floor holds
    started: dict[str, float] = {}
    out = await run([(dep("a"), [[Do(lambda: started.setdefault("a", time.monotonic())), Wait(never())]]),
                     (dep("b"), [[Do(lambda: started.setdefault("b", time.monotonic())), *text_attempt("x")]])],
                    hedge=HEDGE.model_copy(update={"ceiling_ms": 1000.0}), health=board)
    assert out.outcomes == ["hedge_lost", "ok"]
    assert started["b"] - started["a"] < 0.5  # the floor (10 ms), not the ceiling (1 s)


def test_every_request_is_hedgeable_while_only_function_tools_exist() -> None:
    assert hedgeable(user_request())
