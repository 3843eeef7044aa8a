"""The attempt loop (`resilience/attempts.py`) against in-process fake providers: no sockets, no real waiting.

Backoff between rounds goes through `asyncio.sleep` inside the attempts module only; the `instant_backoff` fixture
replaces that one name with a recorder, so rounds happen at once and a test can see that they happened.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support.fake_provider import HANG, Do, Fail, FakePool, FakeProvider, Step, text_attempt
from unbroken.config import Deployment, ServerSettings
from unbroken.ir import (
    Continuation,
    Finish,
    GenerationRequest,
    ImagePart,
    Message,
    Reasoning,
    TextDelta,
    TextPart,
    ToolCallDelta,
    ToolCallStart,
)
from unbroken.protocol.responses import Event, ResponseEmitter
from unbroken.providers.base import Capabilities
from unbroken.resilience import attempts
from unbroken.resilience.attempts import Generation, GenerationOptions, NoOutput, Route, RunControl
from unbroken.routing.health import HealthBoard

TERMINAL = {"response.completed", "response.incomplete", "response.failed"}
LITERAL = Capabilities(literal_continuation=True)
INSTRUCTION = Capabilities(literal_continuation=False)
BOUND = 5.0  # every run is bounded: a loop that hangs fails the test instead of the suite


class _SleepRecorder:
    """Stands in for the `asyncio` module inside `attempts`: everything is the real one except `sleep`."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def sleep(self, delay: float) -> None:
        if delay == 0:  # a loop turn the attempt loop gives other tasks (YIELD_EVERY_S), not a backoff
            await asyncio.sleep(0)
            return
        self.delays.append(delay)

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)


@pytest.fixture(autouse=True)
def instant_backoff(monkeypatch: pytest.MonkeyPatch) -> _SleepRecorder:
    random.seed(1234)
    recorder = _SleepRecorder()
    monkeypatch.setattr(attempts, "asyncio", recorder)
    return recorder


def dep(name: str, provider: str = "openai", **options: Any) -> Deployment:
    return Deployment(name=name, provider=provider, model=f"model-{name}", options=options)


def user_request(text: str = "hi", **kw: Any) -> GenerationRequest:
    return GenerationRequest(model="m", items=[Message("user", [TextPart(text)])], **kw)


@dataclass
class Outcome:
    events: list[Event]
    generation: Generation
    pool: FakePool
    no_output: NoOutput | None

    @property
    def types(self) -> list[str]:
        return [e["type"] for e in self.events]

    @property
    def terminal(self) -> Event | None:
        ends = [e for e in self.events if e["type"] in TERMINAL]
        assert len(ends) <= 1, ends
        return ends[0] if ends else None

    @property
    def streamed_text(self) -> str:
        return "".join(e["delta"] for e in self.events if e["type"] == "response.output_text.delta")

    def final_text(self) -> str:
        assert self.terminal is not None
        return "".join(p["text"] for item in self.terminal["response"]["output"] if item["type"] == "message"
                       for p in item["content"] if p["type"] == "output_text")

    @property
    def outcomes(self) -> list[str]:
        return [a.outcome for a in self.generation.attempts]


def assert_dense(events: list[Event]) -> None:
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


async def run(deployments: Sequence[tuple[Deployment, Sequence[Sequence[Step]]] |
                                    tuple[Deployment, Sequence[Sequence[Step]], Capabilities]],
              *, request: GenerationRequest | None = None, settings: ServerSettings | None = None,
              options: GenerationOptions | None = None, control: RunControl | None = None,
              recovery: bool = False) -> Outcome:
    pool = FakePool()
    for spec in deployments:
        d, script = spec[0], spec[1]
        caps = spec[2] if len(spec) == 3 else None  # type: ignore[misc]
        pool.add(FakeProvider(d, script, capabilities=caps))
    route = Route("m", tuple(s[0] for s in deployments), pool, HealthBoard())
    emitter = ResponseEmitter({"id": "resp_test", "object": "response", "model": "m", "status": "queued",
                               "output": []}, hold_tool_arguments=True)
    gen = Generation(request or user_request(), route, emitter, settings or ServerSettings(),
                     options or GenerationOptions(recovery_events=recovery),
                     control or RunControl(time.time() + 600))
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


# -- success and failover before output --------------------------------------------------------------------------


async def test_success_on_the_first_try() -> None:
    out = await run([(dep("a"), [text_attempt("Hello", ", world")]), (dep("b"), [])])
    assert out.types[:2] == ["response.created", "response.in_progress"]
    assert out.types[-1] == "response.completed"
    assert out.final_text() == "Hello, world" == out.streamed_text
    assert out.pool.called == ["a"]
    assert out.outcomes == ["ok"]
    sent = out.pool.calls[0][1]
    assert sent.continuation is None and sent.trace_id == "resp_test"


async def test_failover_before_output_is_invisible_to_the_client() -> None:
    out = await run([(dep("a"), [[Fail("overloaded")]]), (dep("b"), [text_attempt("Hi there")])])
    assert out.pool.called == ["a", "b"]
    assert out.outcomes == ["overloaded", "ok"]
    assert out.types.count("response.created") == 1
    assert out.types.count("response.output_item.added") == 1
    assert not any(t.startswith("router:") for t in out.types)
    assert out.final_text() == "Hi there"
    assert out.pool.calls[1][1].continuation is None  # nothing was sent: a plain retry, not a continuation


async def test_image_urls_go_only_to_deployments_that_take_them() -> None:
    request = GenerationRequest(model="m", items=[Message("user", [TextPart("what is it?"),
                                                                   ImagePart("https://example.test/cat.png")])])
    out = await run([(dep("a"), [], Capabilities(image_urls=False)),
                     (dep("b"), [text_attempt("a cat")], Capabilities(image_urls=True))], request=request)
    assert out.pool.called == ["b"]
    assert out.final_text() == "a cat"


# -- continuation after a mid-stream cut ---------------------------------------------------------------------------


async def test_mid_stream_cut_continues_literally_on_the_next_deployment() -> None:
    out = await run([(dep("a"), [[TextDelta("Hello, wor"), Fail("connection")]]),
                     (dep("b"), [text_attempt("ld!")], LITERAL)])
    assert out.pool.called == ["a", "b"]
    sent = out.pool.providers["b"].requests[0]
    assert sent.continuation == Continuation("Hello, wor", True)
    assert out.final_text() == "Hello, world!" == out.streamed_text
    assert out.types.count("response.output_item.added") == 1  # one uninterrupted message
    assert out.generation.attempts[1].continuation == "literal"
    assert out.types[-1] == "response.completed"


async def test_mid_stream_cut_continues_with_an_instruction_and_strips_the_overlap() -> None:
    out = await run([(dep("a"), [[TextDelta("The quick brown fox jumps"), Fail("server_error")]]),
                     (dep("b"), [text_attempt(" brown fox jumps over", " the lazy dog.")], INSTRUCTION)])
    sent = out.pool.providers["b"].requests[0]
    assert sent.continuation == Continuation("The quick brown fox jumps", False)
    assert out.final_text() == "The quick brown fox jumps over the lazy dog." == out.streamed_text
    assert out.generation.attempts[1].continuation == "instruction"


async def test_recovery_events_for_clients_that_opted_in() -> None:
    out = await run([(dep("a"), [[TextDelta("Hello, wor"), Fail("connection")]]),
                     (dep("b"), [text_attempt("ld!")], LITERAL)], recovery=True)
    interrupted = [e for e in out.events if e["type"] == "router:stream.interrupted"]
    resumed = [e for e in out.events if e["type"] == "router:stream.resumed"]
    assert [(e["deployment"], e["reason"]) for e in interrupted] == [("a", "connection")]
    assert [(e["deployment"], e["previous"], e["mode"]) for e in resumed] == [("b", "a", "literal")]
    router = out.terminal["response"]["router"]  # type: ignore[index]
    assert [a["outcome"] for a in router["attempts"]] == ["connection", "ok"] and router["served_by"] == "b"


async def test_prefill_rejected_flips_to_an_instruction_on_the_same_deployment() -> None:
    out = await run([(dep("a"), [[TextDelta("Hello, wor"), Fail("connection")]]),
                     (dep("b"), [[Fail("prefill_rejected")], text_attempt("Hello, world!")], LITERAL),
                     (dep("c"), [])])
    assert out.pool.called == ["a", "b", "b"]
    first, second = out.pool.providers["b"].requests
    assert first.continuation == Continuation("Hello, wor", True)
    assert second.continuation == Continuation("Hello, wor", False)
    assert [a.continuation for a in out.generation.attempts] == [None, "literal", "instruction"]
    assert out.final_text() == "Hello, world!"  # the model started over: everything it repeated went


async def test_continuation_drops_foreign_reasoning_and_keeps_completed_items() -> None:
    request = GenerationRequest(model="m", items=[
        Message("user", [TextPart("hi")]),
        Reasoning(text="mine", signature="sig-a", provider="anthropic"),
        Reasoning(text="theirs", encrypted_content="enc", provider="openai"),
    ])
    out = await run([(dep("a", "openai"), [[TextDelta("Hello, wor"), Fail("connection")]]),
                     (dep("b", "anthropic"), [text_attempt("ld!")], LITERAL)], request=request)
    sent = out.pool.providers["b"].requests[0]
    kept = [it for it in sent.items if isinstance(it, Reasoning)]
    assert [r.provider for r in kept] == ["anthropic"]
    assert out.final_text() == "Hello, world!"


# -- failures that end the request --------------------------------------------------------------------------------


async def test_bad_request_before_output_is_no_output_with_an_invalid_request_failure() -> None:
    out = await run([(dep("a"), [[Fail("bad_request", "bad schema")]]), (dep("b"), [])])
    assert out.no_output is not None
    assert out.no_output.failure.kind == "invalid_request"
    assert out.no_output.failure.code == "invalid_request"
    assert out.events == []
    assert out.pool.called == ["a"]  # no other deployment is asked


async def test_content_filter_after_output_ends_incomplete_with_that_reason() -> None:
    out = await run([(dep("a"), [[TextDelta("Sure, here is"), Fail("content_filter")]]), (dep("b"), [])])
    assert out.pool.called == ["a"]
    assert out.types[-1] == "response.incomplete"
    response = out.terminal["response"]  # type: ignore[index]
    assert response["incomplete_details"] == {"reason": "content_filter"}
    assert out.final_text() == "Sure, here is"


async def test_content_filter_before_output_is_no_output() -> None:
    out = await run([(dep("a"), [[Fail("content_filter")]]), (dep("b"), [])])
    assert out.no_output is not None and out.no_output.failure.code == "content_filter"
    assert out.pool.called == ["a"]


async def test_rate_limited_with_a_short_retry_after_is_retried_in_the_next_round(
        instant_backoff: _SleepRecorder) -> None:
    out = await run([(dep("a"), [[Fail("rate_limited", retry_after=0.5)], text_attempt("ok")]),
                     (dep("b"), [[Fail("server_error")]])])
    assert out.pool.called == ["a", "b", "a"]
    assert len(instant_backoff.delays) == 1 and instant_backoff.delays[0] >= 0.5  # honours Retry-After
    assert out.final_text() == "ok"


async def test_rate_limited_with_retry_after_beyond_the_remaining_time_excludes_the_deployment(
        instant_backoff: _SleepRecorder) -> None:
    out = await run([(dep("a"), [[Fail("rate_limited", retry_after=10_000)]]),
                     (dep("b"), [[Fail("server_error")], text_attempt("ok")])],
                    settings=ServerSettings(max_total_seconds=60))
    assert out.no_output is None
    assert out.pool.called == ["a", "b", "b"]  # a is never asked again
    assert out.final_text() == "ok"


async def test_rate_limited_beyond_the_remaining_time_on_the_only_deployment_gives_up_without_waiting(
        instant_backoff: _SleepRecorder) -> None:
    out = await run([(dep("a"), [[Fail("rate_limited", retry_after=10_000)]])],
                    settings=ServerSettings(max_total_seconds=60))
    assert out.no_output is not None and out.no_output.failure.kind == "rate_limited"
    assert out.no_output.failure.retry_after == 10_000
    assert instant_backoff.delays == []
    assert out.pool.called == ["a"]


async def test_context_length_excludes_windows_that_are_not_larger() -> None:
    out = await run([(dep("small", context_window=8000), [[Fail("context_length")]]),
                     (dep("same", context_window=8000), []),
                     (dep("smaller", context_window=4000), []),
                     (dep("large", context_window=32000), [text_attempt("fits")])])
    assert out.pool.called == ["small", "large"]
    assert out.final_text() == "fits"


async def test_max_attempts_bounds_the_number_of_attempts() -> None:
    script: list[Sequence[Step]] = [[Fail("server_error")] for _ in range(10)]
    out = await run([(dep("a", max_retries=20), script)], settings=ServerSettings(max_attempts=3))
    assert out.pool.called == ["a", "a", "a"]
    assert out.no_output is not None


@pytest.mark.parametrize(("kind", "failure_kind", "code"), [
    ("server_error", "upstream_error", "upstream_error"),
    ("connection", "upstream_error", "upstream_error"),
    ("overloaded", "unavailable", "upstream_unavailable"),
    ("timeout", "unavailable", "upstream_unavailable"),
    ("rate_limited", "rate_limited", "rate_limit_exceeded"),
    ("auth", "upstream_error", "upstream_error"),
])
async def test_every_deployment_failing_before_output_is_no_output(kind: str, failure_kind: str,
                                                                   code: str) -> None:
    script: list[Sequence[Step]] = [[Fail(kind)], [Fail(kind)]]  # type: ignore[arg-type]
    out = await run([(dep("a"), script), (dep("b"), list(script))])
    assert out.no_output is not None
    assert (out.no_output.failure.kind, out.no_output.failure.code) == (failure_kind, code)
    assert out.events == []
    assert set(out.pool.called) == {"a", "b"}


async def test_every_deployment_failing_after_output_ends_incomplete_and_keeps_the_text() -> None:
    out = await run([(dep("a"), [[TextDelta("partial answer"), Fail("connection")], [Fail("connection")]]),
                     (dep("b"), [[Fail("overloaded")], [Fail("overloaded")]])])
    assert out.pool.called == ["a", "b", "a", "b"]
    assert out.types[-1] == "response.incomplete"
    response = out.terminal["response"]  # type: ignore[index]
    assert response["incomplete_details"] == {"reason": "upstream_unavailable"}
    assert out.final_text() == "partial answer"
    assert response["output"][0]["status"] == "incomplete"


# -- cancellation and deadlines -------------------------------------------------------------------------------------


async def test_cancellation_ends_the_response_cancelled() -> None:
    cancel = {"now": False}
    control = RunControl(time.time() + 600, cancelled=lambda: cancel["now"])
    out = await run([(dep("a"), [[TextDelta("Hel"), Do(lambda: cancel.update(now=True)), TextDelta("lo"),
                                  HANG]])], control=control)
    assert out.types[-1] == "response.incomplete"
    response = out.terminal["response"]  # type: ignore[index]
    assert response["status"] == "cancelled"
    assert response["incomplete_details"] == {"reason": "cancelled"}
    assert out.final_text() == "Hello"
    assert out.outcomes == ["cancelled"]
    assert out.pool.providers["a"].closed_streams == 1


async def test_deadline_after_the_first_token_ends_incomplete() -> None:
    control = RunControl(time.time() + 600)
    out = await run([(dep("a"), [[TextDelta("Hi"), Do(lambda: setattr(control, "deadline", time.time() - 1)),
                                  TextDelta(" there"), HANG]])], control=control)
    assert out.types[-1] == "response.incomplete"
    assert out.terminal["response"]["incomplete_details"] == {"reason": "stream_deadline"}  # type: ignore[index]
    assert out.final_text() == "Hi there"
    assert out.outcomes == ["deadline"]


async def test_deadline_with_hand_off_stops_without_a_terminal_event() -> None:
    control = RunControl(time.time() + 600)
    out = await run([(dep("a"), [[TextDelta("Hi"), ToolCallStart(0, "c1", "f"), ToolCallDelta(0, '{"a"'),
                                  Do(lambda: setattr(control, "deadline", time.time() - 1)),
                                  ToolCallDelta(0, ": 1}"), HANG]])],
                    control=control, options=GenerationOptions(hand_off_at_deadline=True))
    assert out.generation.handed_off is True
    assert out.terminal is None
    assert out.streamed_text == "Hi"
    # the held call was never shown; nothing of it is in the stream
    assert not any(e.get("item", {}).get("type") == "function_call" for e in out.events)


# -- tool calls ----------------------------------------------------------------------------------------------------


async def test_a_held_tool_call_cut_in_half_is_dropped_and_redone() -> None:
    out = await run([(dep("a"), [[ToolCallStart(0, "call_1", "get_weather"), ToolCallDelta(0, '{"city":'),
                                  Fail("connection")]]),
                     (dep("b"), [[ToolCallStart(0, "call_2", "get_weather"), ToolCallDelta(0, '{"city":'),
                                  ToolCallDelta(0, '"Paris"}'), Finish("tool_calls")]])])
    added = [e for e in out.events if e["type"] == "response.output_item.added"]
    assert [e["item"]["call_id"] for e in added] == ["call_2"]
    arg_deltas = [e["delta"] for e in out.events if e["type"] == "response.function_call_arguments.delta"]
    assert arg_deltas == ['{"city":"Paris"}']
    output = out.terminal["response"]["output"]  # type: ignore[index]
    assert [(o["type"], o["arguments"], o["status"]) for o in output] == \
        [("function_call", '{"city":"Paris"}', "completed")]
    assert out.pool.providers["b"].requests[0].continuation is None
    assert out.types[-1] == "response.completed"


async def test_text_then_a_cut_tool_call_resends_the_text_as_a_completed_message() -> None:
    out = await run([(dep("a"), [[TextDelta("Let me check."), ToolCallStart(0, "c1", "look"),
                                  ToolCallDelta(0, '{"q"'), Fail("connection")]]),
                     (dep("b"), [[ToolCallStart(0, "c2", "look"), ToolCallDelta(0, '{"q":1}'),
                                  Finish("tool_calls")]])])
    sent = out.pool.providers["b"].requests[0]
    assert sent.continuation is None
    assert [(type(it).__name__, getattr(it, "role", None)) for it in sent.items] == \
        [("Message", "user"), ("Message", "assistant")]
    assert sent.items[1].text() == "Let me check."  # type: ignore[union-attr]
    output = out.terminal["response"]["output"]  # type: ignore[index]
    assert [o["type"] for o in output] == ["message", "function_call"]
    assert output[1]["arguments"] == '{"q":1}'


async def test_an_upstream_that_never_suspends_still_lets_other_tasks_run_from_its_first_delta() -> None:
    """A buffered upstream (every delta ready at once) must not starve the journal's committer and the client's
    writer until its end: the loop gives the event loop a turn at the first delta."""
    turns: list[int] = []
    seen: list[Event] = []

    async def other_task() -> None:
        while len(turns) < 1000:
            turns.append(len(seen))  # how much of the stream existed when this task got a turn
            await asyncio.sleep(0)

    pool = FakePool()
    deployment = dep("a")
    pool.add(FakeProvider(deployment, [[TextDelta(f"w{i} ") for i in range(200)]]))
    gen = Generation(user_request(), Route("m", (deployment,), pool, HealthBoard()),
                     ResponseEmitter({"id": "resp_t", "object": "response", "model": "m", "status": "queued",
                                      "output": []}), ServerSettings(), GenerationOptions(),
                     RunControl(time.time() + 600))
    observer = asyncio.ensure_future(other_task())
    await asyncio.sleep(0)
    start = len(turns)
    async with asyncio.timeout(BOUND):
        async for ev in gen.run():
            seen.append(ev)
    observer.cancel()
    during = [n for n in turns[start:] if 0 < n < len(seen)]
    assert during and min(during) <= 10  # a turn came with the first delta's events, long before the end
