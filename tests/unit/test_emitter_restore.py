"""Rebuilding a `ResponseEmitter` from its committed events (`restore_emitter`), as a takeover does: cut the event
stream of one run at every prefix, restore, and check the restored emitter goes on exactly as the uncut one."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from unbroken.ir import (
    Delta,
    Finish,
    ReasoningDelta,
    ReasoningSeal,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
    Usage,
)
from unbroken.protocol.responses import Event, ResponseEmitter, restore_emitter

DELTAS: list[Delta] = [
    ReasoningDelta("Let me"), ReasoningDelta(" think."), ReasoningDelta("A summary", summary=True),
    ReasoningSeal("anthropic", signature="sig-1"),
    TextDelta("Hello"), TextDelta(", world"),
    ToolCallStart(0, "call_1", "lookup"), ToolCallDelta(0, '{"q":'), ToolCallDelta(0, '"x"}'),
    TextDelta("Done."), TextDelta(" Really."),
    Usage(input_tokens=10, output_tokens=7), Finish("stop"),
]


def fresh() -> ResponseEmitter:
    return ResponseEmitter({"id": "resp_r", "object": "response", "model": "m", "status": "queued", "output": []},
                           hold_tool_arguments=True)


def normal(events: list[Event]) -> list[Event]:
    """Events without what differs between two runs: the wall clock, and the random ids of items opened after the
    cut (named by their output index instead)."""
    out = copy.deepcopy(events)
    for e in out:
        if "item_id" in e:
            e["item_id"] = f"item-{e['output_index']}"
        if "item" in e:
            e["item"]["id"] = f"item-{e['output_index']}"
        if "response" in e:
            e["response"].pop("completed_at", None)
            for i, item in enumerate(e["response"]["output"]):
                item["id"] = f"item-{i}"
    return out


def uncut() -> tuple[list[Event], list[int], list[dict[str, Any]]]:
    """The whole run's events, the event count after each delta (boundary k: after DELTAS[:k]), and the emitter's
    state at each boundary."""
    em = fresh()
    # Copied as they come: what a journal that encoded each event at once would hold.
    events = copy.deepcopy(em.start() + em.in_progress())
    counts = [len(events)]
    states = [state(em)]
    for d in DELTAS:
        events += copy.deepcopy(em.apply(d))
        counts.append(len(events))
        states.append(state(em))
    events += copy.deepcopy(em.complete())
    return events, counts, states


def state(em: ResponseEmitter) -> dict[str, Any]:
    return {"output": copy.deepcopy(em.output),
            "open": None if em.open is None else (em.open.kind, em.open.output_index, em.open.part_kind,
                                                  "".join(em.open.text)),
            "text": em.open_message_text()}


EVENTS, COUNTS, STATES = uncut()


def test_the_uncut_run_is_dense_and_ends_once() -> None:
    assert [e["sequence_number"] for e in EVENTS] == list(range(len(EVENTS)))
    assert EVENTS[-1]["type"] == "response.completed"


def test_nothing_to_restore_from_without_response_created() -> None:
    with pytest.raises(ValueError):
        restore_emitter([])


@pytest.mark.parametrize("n", range(1, len(EVENTS) + 1))
def test_restore_at_every_prefix_continues_densely(n: int) -> None:
    em = restore_emitter(copy.deepcopy(EVENTS[:n]), hold_tool_arguments=True)
    assert em.seq == n
    assert em.closed == (n == len(EVENTS))
    if em.closed:
        return
    # whatever was cut, the restored emitter can end the response with numbers that go on from the prefix
    ending = em.drop_open_tool_call() + em.end_incomplete("upstream_unavailable")
    assert [e["sequence_number"] for e in ending] == list(range(n, n + len(ending)))
    assert ending[-1]["type"] == "response.incomplete"


BOUNDARIES = sorted({(count, COUNTS.index(count)) for count in COUNTS})  # (events, first k reaching that count)


@pytest.mark.parametrize(("n", "k"), BOUNDARIES)
def test_restore_at_a_delta_boundary_matches_and_goes_on_like_the_uncut_run(n: int, k: int) -> None:
    em = restore_emitter(copy.deepcopy(EVENTS[:n]), hold_tool_arguments=True)
    expected = STATES[k]
    if expected["open"] is not None and expected["open"][:2] == ("function_call", -1):
        # A held call: nothing of it was sent, so nothing of it is restored; the next attempt redoes it whole.
        assert em.open is None and em.output == expected["output"]
        k = max(i for i in range(k) if isinstance(DELTAS[i], ToolCallStart))
    else:
        assert state(em) == expected
    rest: list[Event] = []
    for d in DELTAS[k:]:
        rest += copy.deepcopy(em.apply(d))
    rest += em.complete()
    assert normal(rest) == normal(EVENTS[n:])

def test_emitted_events_are_not_changed_by_later_deltas() -> None:
    em = fresh()
    events = em.start() + em.in_progress()
    events += em.apply(ReasoningDelta("A summary", summary=True))
    added = next(e for e in events if e["type"] == "response.output_item.added")
    before = copy.deepcopy(added)
    events += em.apply(TextDelta("Hi"))  # closes the reasoning item
    assert added == before
    restored = restore_emitter(events)  # the events as a batch encoded now holds them
    assert restored.output[0]["summary"] == [{"type": "summary_text", "text": "A summary"}]
