"""`ResponseEmitter.snapshot()` while a content part is open: the part shows its text so far (a GET of a running
response), in the emitter that streams and in one restored from the journal, without touching the live response."""

from __future__ import annotations

from typing import Any

from tests.support.spec import validate_response
from unbroken.ir import Delta, ReasoningDelta, RefusalDelta, TextDelta, ToolCallDelta, ToolCallStart
from unbroken.protocol.request import CreateResponseBody, response_skeleton
from unbroken.protocol.responses import Event, ResponseEmitter, restore_emitter


def emitter(*, hold: bool = False) -> ResponseEmitter:
    return ResponseEmitter(response_skeleton(CreateResponseBody(model="m"), "resp_1", "m"), hold_tool_arguments=hold)


def feed(em: ResponseEmitter, *deltas: Delta) -> list[Event]:
    events = em.start() + em.in_progress()
    for delta in deltas:
        events += em.apply(delta)
    return events


def test_an_open_text_part_shows_its_text_so_far_and_the_live_response_is_untouched() -> None:
    em = emitter()
    events = feed(em, TextDelta("Hel"), TextDelta("lo "), TextDelta("world"))
    snap = em.snapshot()
    validate_response(snap)
    assert snap["output"][0]["content"][0]["text"] == "Hello world"
    assert snap["output"][0]["status"] == "in_progress"
    assert em.response["output"][0]["content"][0]["text"] == ""  # joined into the copy only
    restored = restore_emitter(events)
    assert restored.snapshot()["output"] == snap["output"]
    events += em.complete()
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "Hello world"


def test_open_refusal_and_reasoning_parts_show_their_text_so_far() -> None:
    em = emitter()
    feed(em, ReasoningDelta("Think", summary=True), ReasoningDelta("ing", summary=True))
    assert em.snapshot()["output"][0]["summary"][0]["text"] == "Thinking"
    em.apply(ReasoningDelta("raw "))
    em.apply(ReasoningDelta("thought"))
    snap: dict[str, Any] = em.snapshot()
    assert snap["output"][0]["summary"][0]["text"] == "Thinking"  # closed when the raw text began
    assert snap["output"][0]["content"][0]["text"] == "raw thought"
    em.apply(RefusalDelta("No"))
    em.apply(RefusalDelta("pe"))
    assert em.snapshot()["output"][1]["content"][0] == {"type": "refusal", "refusal": "Nope"}


def test_a_held_tool_call_stays_out_of_a_snapshot() -> None:
    em = emitter(hold=True)
    feed(em, TextDelta("Calling"), ToolCallStart(0, "call_1", "f"), ToolCallDelta(0, '{"a"'))
    snap = em.snapshot()
    assert [i["type"] for i in snap["output"]] == ["message"]
    assert snap["output"][0]["content"][0]["text"] == "Calling"
