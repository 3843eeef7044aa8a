"""The storage codec: whatever is appended decodes to equal dicts (keys in the same order), and text deltas are stored
compactly."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unbroken.journal.codec import check_dense, decode_events, decode_json, encode_events, encode_json

# Any code point, lone surrogates included: providers have been seen to split a surrogate pair across deltas.
TEXT = st.text(st.characters(codec=None, categories=None), max_size=40) | st.sampled_from(["", "\ud800", "\udfff"])
JSON_LEAF = st.none() | st.booleans() | st.integers(-(2**60), 2**60) | st.floats(allow_nan=False) | TEXT
JSON = st.recursive(
    JSON_LEAF,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)


@st.composite
def text_delta(draw: st.DrawFn) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": "response.output_text.delta",
        "sequence_number": 0,
        "item_id": draw(st.sampled_from(["msg_1", "msg_2"])),
        "output_index": draw(st.sampled_from([0, 1])),
        "content_index": draw(st.sampled_from([0, 1])),
        "delta": draw(TEXT),
        "logprobs": [],
    }
    variant = draw(st.integers(0, 5))
    if variant == 1:
        event["obfuscation"] = draw(TEXT)
    elif variant == 2:
        event["logprobs"] = [{"token": "a", "logprob": -0.5}]
    elif variant == 3:
        event = dict(reversed(list(event.items())))
    elif variant == 4:
        event["output_index"] = draw(st.sampled_from([True, 0.0, "0"]))
    return event


@st.composite
def other_event(draw: st.DrawFn) -> dict[str, Any]:
    event: dict[str, Any] = {"type": draw(st.sampled_from(["response.created", "router:x", "error", "x"]))}
    event["sequence_number"] = 0
    event.update(draw(st.dictionaries(TEXT.filter(lambda k: k not in ("type", "sequence_number")), JSON, max_size=3)))
    return event


@given(st.lists(st.one_of(text_delta(), text_delta(), other_event()), max_size=30), st.integers(0, 10**12))
@settings(max_examples=300, deadline=None)
def test_roundtrip_is_exact(events: list[dict[str, Any]], start: int) -> None:
    for offset, event in enumerate(events):
        event["sequence_number"] = start + offset
    decoded = decode_events(encode_events(events))
    assert decoded == events
    assert [list(e) for e in decoded] == [list(e) for e in events]
    assert [[type(v) for v in e.values()] for e in decoded] == [[type(v) for v in e.values()] for e in events]


@given(JSON)
@settings(max_examples=200, deadline=None)
def test_snapshot_roundtrip(value: Any) -> None:
    assert decode_json(encode_json(value)) == value


def test_text_deltas_are_stored_compactly() -> None:
    words = "the quick brown fox jumps over the lazy dog and keeps running through the field".split()
    events = [
        {
            "type": "response.output_text.delta",
            "sequence_number": i,
            "item_id": "msg_67ab12cd34ef",
            "output_index": 0,
            "content_index": 0,
            "delta": " " + words[i % len(words)],
            "logprobs": [],
        }
        for i in range(1000)
    ]
    plain = sum(len(json.dumps(e)) for e in events)
    blob = encode_events(events)
    assert decode_events(blob) == events
    assert len(blob) * 20 < plain  # merged runs + zlib: each token costs a few bytes, not a whole JSON object


def test_check_dense() -> None:
    assert check_dense([{"sequence_number": 4}, {"sequence_number": 5}]) == (4, 5)
    for bad in (
        [{"sequence_number": 1}, {"sequence_number": 3}],
        [{"sequence_number": 1}, {"sequence_number": 1}],
        [{"sequence_number": "1"}],
        [{"sequence_number": True}, {"sequence_number": 2}],
        [{}],
    ):
        with pytest.raises(ValueError):
            check_dense(bad)
