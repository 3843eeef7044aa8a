"""The seam of a continued answer and the request a continuation sends (`resilience/continuation.py`)."""

from __future__ import annotations

import pytest

from unbroken.ir import (
    Continuation,
    Finish,
    FunctionCall,
    GenerationRequest,
    Message,
    Reasoning,
    ReasoningDelta,
    ReasoningSeal,
    TextDelta,
    TextPart,
    ToolCallDelta,
    ToolCallStart,
)
from unbroken.protocol.responses import ResponseEmitter
from unbroken.resilience.continuation import (
    OVERLAP_WINDOW,
    OverlapFilter,
    attempt_request,
    continuation_base,
    seam,
    strip_overlap,
)


@pytest.mark.parametrize(("partial", "new", "expected"), [
    # the cut fell inside a word and the model goes on inside it: nothing repeated, nothing removed
    ("The answer is compl", "ete and final.", "ete and final."),
    # the model repeats the last words before going on
    ("The quick brown fox jumps", " brown fox jumps over", " over"),
    ("The quick brown fox jumps", "brown fox jumps over", " over"),
    # one repeated word on a word boundary may be the answer's own ("green green"): kept
    ("The grass is green", " green and lush", " green and lush"),
    # the model starts over: everything it repeats goes
    ("Hello, wor", "Hello, world!", "ld!"),
    # no overlap at all
    ("abc def", " ghi", " ghi"),
    # a short coincidence (a shared letter) is not an overlap
    ("I like pasta", "a lot", "a lot"),
    ("I like pasta", "ta and more", "ta and more"),
    # a long run is an overlap even off a word boundary
    ("xx supercalifragilistic", "califragilistic expialidocious", " expialidocious"),
])
def test_strip_overlap(partial: str, new: str, expected: str) -> None:
    assert strip_overlap(partial, new, final=True) == (expected, True)


def test_strip_overlap_waits_for_enough_text_unless_final() -> None:
    assert strip_overlap("The quick brown fox", " brown fox", final=False) == (" brown fox", False)
    long = " brown fox" + " and on" * 50
    assert len(long) >= OVERLAP_WINDOW
    text, decided = strip_overlap("The quick brown fox", long, final=False)
    assert decided and text == long[len(" brown fox"):]


@pytest.mark.parametrize(("partial", "new", "expected"), [
    ("Hello ", " world", "world"),  # doubled whitespace at the seam goes
    ("Hello ", "\n\nworld", "world"),
    ("Hello", " world", " world"),
    ("Hel", "lo", "lo"),  # never a space inserted inside a word
    ('{"a": "b', 'c"}', 'c"}'),  # nor inside a JSON string
    ("", " x", " x"),
])
def test_seam(partial: str, new: str, expected: str) -> None:
    assert seam(partial, new) == expected


# -- OverlapFilter ------------------------------------------------------------------------------------------------

PARTIAL = "The quick brown fox jumps"


def instruction() -> OverlapFilter:
    return OverlapFilter(Continuation(PARTIAL, literal=False))


def test_overlap_filter_passes_everything_without_an_instruction_continuation() -> None:
    for f in (OverlapFilter(None), OverlapFilter(Continuation(PARTIAL, literal=True))):
        assert f.feed(TextDelta(" brown fox jumps over")) == [TextDelta(" brown fox jumps over")]
        assert f.close() == []


def test_overlap_filter_releases_held_text_at_a_tool_call() -> None:
    f = instruction()
    assert f.feed(TextDelta(" brown fox")) == []
    assert f.feed(TextDelta(" jumps over")) == []
    start = ToolCallStart(0, "c1", "f")
    assert f.feed(start) == [TextDelta(" over"), start]
    # after the seam everything passes unchanged
    assert f.feed(ToolCallDelta(0, "{}")) == [ToolCallDelta(0, "{}")]
    assert f.feed(TextDelta(" brown fox jumps")) == [TextDelta(" brown fox jumps")]
    assert f.close() == []


def test_overlap_filter_releases_held_text_at_finish() -> None:
    f = instruction()
    assert f.feed(TextDelta("The quick brown fox jumps over the dog.")) == []
    assert f.feed(Finish("stop")) == [TextDelta(" over the dog."), Finish("stop")]
    assert f.close() == []


def test_overlap_filter_releases_held_text_at_the_end_of_the_stream() -> None:
    f = instruction()
    assert f.feed(TextDelta(" brown fox jumps over")) == []
    assert f.close() == [TextDelta(" over")]
    assert f.close() == []


def test_overlap_filter_lets_reasoning_through_while_it_holds_text() -> None:
    f = instruction()
    assert f.feed(TextDelta(" fox jumps")) == []
    assert f.feed(ReasoningDelta("hmm")) == [ReasoningDelta("hmm")]
    assert f.close() == [TextDelta("")]  # " fox jumps" was all overlap


def test_overlap_filter_decides_once_it_has_a_window_of_text() -> None:
    f = instruction()
    tail = " and on" * 50
    assert f.feed(TextDelta(" brown fox jumps" + tail)) == [TextDelta(tail)]
    assert f.close() == []


def test_overlap_filter_with_nothing_held_closes_empty() -> None:
    assert instruction().close() == []


# -- continuation_base and attempt_request -------------------------------------------------------------------------


def request(*items: object) -> GenerationRequest:
    return GenerationRequest(model="m", items=[Message("user", [TextPart("hi")]), *items])  # type: ignore[list-item]


def emitter_after(*deltas: object) -> ResponseEmitter:
    em = ResponseEmitter({"id": "resp_c", "object": "response", "model": "m", "status": "in_progress",
                          "output": []}, hold_tool_arguments=True)
    for d in deltas:
        em.apply(d)  # type: ignore[arg-type]
    return em


def test_continuation_base_turns_completed_messages_and_calls_into_input_items() -> None:
    em = emitter_after(TextDelta("First."), ToolCallStart(0, "c1", "look"), ToolCallDelta(0, '{"q":1}'),
                       TextDelta("Then"))
    base = continuation_base(request(), em)
    assert base is not None
    assert base.items[1:] == [Message("assistant", [TextPart("First.")]), FunctionCall("c1", "look", '{"q":1}')]
    # the open message is not an input item: it is the continuation's text
    assert em.open_message_text() == "Then"


def test_continuation_base_keeps_reasoning_with_its_provider() -> None:
    em = emitter_after(ReasoningDelta("think"), ReasoningSeal("anthropic", signature="sig"), TextDelta("So"))
    base = continuation_base(request(), em)
    assert base is not None
    reasoning = [it for it in base.items if isinstance(it, Reasoning)]
    assert len(reasoning) == 1
    assert (reasoning[0].text, reasoning[0].signature, reasoning[0].provider) == ("think", "sig", "anthropic")


def test_continuation_base_is_none_after_only_completed_function_calls() -> None:
    em = emitter_after(ToolCallStart(0, "c1", "look"), ToolCallDelta(0, "{}"))
    em.close_open()
    assert continuation_base(request(), em) is None


def test_continuation_base_with_nothing_emitted_is_the_request() -> None:
    base = continuation_base(request(), emitter_after())
    assert base is not None and base.items == request().items


def test_attempt_request_drops_foreign_reasoning_when_a_message_is_continued() -> None:
    base = request(Reasoning(text="a", signature="s", provider="anthropic"),
                   Reasoning(text="o", encrypted_content="e", provider="openai_responses"))
    em = emitter_after(TextDelta("partial"))
    sent = attempt_request(base, em, literal=True, provider="anthropic")
    assert sent.continuation == Continuation("partial", True)
    assert [it.provider for it in sent.items if isinstance(it, Reasoning)] == ["anthropic"]
    assert sent.trace_id == "resp_c"
    sent = attempt_request(base, em, literal=False, provider="openai_responses")
    assert sent.continuation == Continuation("partial", False)
    assert [it.provider for it in sent.items if isinstance(it, Reasoning)] == ["openai_responses"]


def test_attempt_request_without_an_open_message_sends_no_continuation() -> None:
    base = request()
    sent = attempt_request(base, emitter_after(), literal=True, provider="anthropic")
    assert sent.continuation is None and sent.items == base.items and sent.trace_id == "resp_c"
