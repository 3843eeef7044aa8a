"""Usage and cost over every attempt (README "Usage and cost"): reported usage where the upstream sent it, the
documented estimate where it did not (a cut), the sum on the response and in its `router` field, and a takeover's
new owner adding to what the journal shows of the old one. Fake providers, no sockets."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.support.fake_provider import HANG, Fail, FakePool, FakeProvider
from tests.unit.test_attempts import INSTRUCTION, LITERAL, run, user_request
from tests.unit.test_takeover import BOUND, committed_until, kill, start
from unbroken.config import Config, Deployment, Price, PublicModel, ServerSettings
from unbroken.durable.follow import journal_events
from unbroken.durable.runtime import Runtime
from unbroken.durable.takeover import take_over
from unbroken.ir import Finish, TextDelta, Usage
from unbroken.journal.memory import MemoryStore
from unbroken.routing.tokens import estimate_input_tokens, estimate_output_tokens

PRICE = Price(input=2.0, output=10.0)  # USD per 1M tokens


def priced(name: str) -> Deployment:
    return Deployment(name=name, provider="openai", model=f"model-{name}", price=PRICE)


def cost(input_tokens: int, output_tokens: int) -> float:
    return round(PRICE.cost(input_tokens, output_tokens), 8)


def test_the_estimate_is_four_characters_a_token_plus_chat_framing() -> None:
    assert estimate_output_tokens(0) == 0
    assert estimate_output_tokens(1) == 1
    assert estimate_output_tokens(8) == 2 and estimate_output_tokens(9) == 3
    # 3 for the request, 4 + chars // 4 for each message
    assert estimate_input_tokens(user_request("x" * 22)) == 3 + 4 + 5
    assert estimate_input_tokens(user_request("x" * 22, instructions="y" * 8)) == 3 + (4 + 2) + (4 + 5)


async def test_a_cut_attempt_counts_what_it_sent_and_streamed() -> None:
    cut = "Hello, wor"
    out = await run([(priced("a"), [[TextDelta(cut), Fail("connection")]]),
                     (priced("b"), [[TextDelta("ld!"), Usage(40, 2), Finish("stop")]], LITERAL)])
    first, second = out.generation.attempts
    assert first.usage_estimated and first.usage.output_tokens == estimate_output_tokens(len(cut)) == 3
    assert first.usage.input_tokens == estimate_input_tokens(user_request())
    assert not second.usage_estimated and (second.usage.input_tokens, second.usage.output_tokens) == (40, 2)
    response = out.terminal["response"]  # type: ignore[index]
    assert response["usage"]["output_tokens"] == 3 + 2
    assert response["usage"]["input_tokens"] == first.usage.input_tokens + 40
    router = response["router"]
    assert router["served_by"] == "b" and router["usage_estimated"] is True
    assert [a["usage_estimated"] for a in router["attempts"]] == [True, False]
    assert router["cost_usd"] == round(cost(first.usage.input_tokens, 3) + cost(40, 2), 8)
    assert router["attempts"][0]["cost_usd"] == cost(first.usage.input_tokens, 3)


async def test_an_instruction_continuation_counts_the_repeated_overlap_it_was_billed_for() -> None:
    out = await run([(priced("a"), [[TextDelta("The quick brown fox jumps"), Fail("server_error")]]),
                     (priced("b"), [[TextDelta(" brown fox jumps over"), TextDelta(" the lazy dog."),
                                     Finish("stop")]], INSTRUCTION)])
    assert out.final_text() == "The quick brown fox jumps over the lazy dog."
    second = out.generation.attempts[1]
    assert second.output_chars == len(" brown fox jumps over the lazy dog.")
    assert second.usage.output_tokens == estimate_output_tokens(second.output_chars)


async def test_a_failure_before_output_counts_nothing() -> None:
    out = await run([(priced("a"), [[Fail("server_error", status=503)]]),
                     (priced("b"), [[TextDelta("ok"), Usage(10, 1), Finish("stop")]])])
    failed = out.generation.attempts[0]
    assert (failed.usage.input_tokens, failed.usage.output_tokens, failed.cost) == (0, 0, 0.0)
    assert out.terminal["response"]["usage"]["total_tokens"] == 11  # type: ignore[index]
    assert out.terminal["response"]["router"]["usage_estimated"] is False  # type: ignore[index]


async def test_the_router_field_is_there_without_recovery_events() -> None:
    out = await run([(priced("a"), [[TextDelta("hi"), Usage(5, 1), Finish("stop")]])], recovery=False)
    assert not any(t.startswith("router:") for t in out.types)
    router = out.terminal["response"]["router"]  # type: ignore[index]
    assert router["cost_usd"] == cost(5, 1) and router["served_by"] == "a"


async def test_input_reported_but_output_cut_estimates_only_the_output() -> None:
    # Anthropic reports input tokens at message_start and output tokens only at the end.
    out = await run([(priced("a"), [[Usage(input_tokens=30), TextDelta("12345678"), Fail("connection")]]),
                     (priced("b"), [[TextDelta("9"), Usage(31, 1), Finish("stop")]], LITERAL)])
    first = out.generation.attempts[0]
    assert (first.usage.input_tokens, first.usage.output_tokens, first.usage_estimated) == (30, 2, True)


def _runtime(store: MemoryStore, provider: FakeProvider) -> Runtime:
    config = Config(models=[PublicModel(name="m", deployments=[provider.deployment])], allow_anonymous=True,
                    server=ServerSettings(journal_batch_ms=1, lease_seconds=5))
    return Runtime(config, store=store, pool=FakePool(provider))


async def test_a_takeover_adds_the_dead_owners_streamed_output_to_its_own() -> None:
    store = MemoryStore()
    dep = priced("a")
    rt1 = _runtime(store, FakeProvider(dep, [[TextDelta("Hello, "), TextDelta("wor"), HANG]]))
    created = await start(rt1)
    await committed_until(store, created.response_id, "Hello, wor")
    await kill(rt1, created)
    rt2 = _runtime(store, FakeProvider(dep, [[TextDelta("ld!"), Usage(50, 2), Finish("stop")]]))
    run = await take_over(rt2, created.response_id, 0)
    assert run is not None
    async with asyncio.timeout(BOUND):
        events = [e async for e in journal_events(rt2, created.response_id, -1)]
    response: dict[str, Any] = events[-1]["response"]
    router = response["router"]
    dead, new = router["attempts"]
    assert dead["outcome"] == "taken_over" and dead["usage_estimated"] is True
    assert dead["output_tokens"] == estimate_output_tokens(len("Hello, wor"))
    assert dead["input_tokens"] == estimate_input_tokens(user_request())
    assert (new["input_tokens"], new["output_tokens"], new["usage_estimated"]) == (50, 2, False)
    assert response["usage"]["output_tokens"] == dead["output_tokens"] + 2
    assert response["usage"]["input_tokens"] == dead["input_tokens"] + 50
    assert router["cost_usd"] == round(dead["cost_usd"] + cost(50, 2), 8)
    await rt1.aclose()
    await rt2.aclose()
