"""Reading the router's SSE output in tests, strictly: `\\n` line endings, `event:` equal to the JSON `type`, dense
sequence numbers from the first one seen, one terminal event, then `data: [DONE]`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tests.support.spec import validate_event, validate_response

TERMINAL = {"response.completed", "response.incomplete", "response.failed"}
RESUME = "router:stream.resume"


@dataclass
class Stream:
    events: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False
    heartbeats: int = 0

    @property
    def types(self) -> list[str]:
        return [e["type"] for e in self.events]

    @property
    def terminal(self) -> dict[str, Any]:
        terminals = [e for e in self.events if e["type"] in TERMINAL]
        assert len(terminals) == 1, f"expected one terminal event, got {[e['type'] for e in terminals]}"
        return terminals[0]

    @property
    def response(self) -> dict[str, Any]:
        return self.terminal["response"]

    def text(self) -> str:
        return "".join(e["delta"] for e in self.events if e["type"] == "response.output_text.delta")

    def output_text(self) -> str:
        return "".join(p.get("text", "") for item in self.response["output"] if item["type"] == "message"
                       for p in item["content"] if p["type"] == "output_text")

    def function_calls(self) -> list[dict[str, Any]]:
        return [i for i in self.response["output"] if i["type"] == "function_call"]


def parse_sse(raw: bytes, *, allow_extensions: bool = False, validate: bool = True,
              first_seq: int | None = 0) -> Stream:
    text = raw.decode("utf-8")
    assert "\r" not in text, "CR in the stream: frames must use \\n line endings"
    stream = Stream()
    blocks = text.split("\n\n")
    assert blocks[-1] == "", "the stream does not end with a blank line"
    for block in blocks[:-1]:
        lines = block.split("\n")
        if all(line.startswith(":") for line in lines):
            stream.heartbeats += 1
            continue
        assert not stream.done, "data after [DONE]"
        fields: dict[str, str] = {}
        for line in lines:
            if line.startswith(":"):
                continue
            name, _, value = line.partition(": ")
            assert name in ("event", "data", "id"), f"unexpected SSE line {line[:80]!r}"
            fields[name] = value
        if fields.get("data") == "[DONE]":
            stream.done = True
            continue
        event = json.loads(fields["data"])
        assert fields.get("event") == event["type"], f"event: {fields.get('event')} but type {event['type']}"
        if validate:
            validate_event(event, allow_extensions=allow_extensions)
        stream.events.append(event)
    ordinary = stream.events
    if stream.events and stream.events[-1]["type"] == RESUME:
        # `router:stream.resume` ends a stream handed on at its deadline; not in the journal, it repeats the last
        # committed sequence number (the cursor to resume from).
        *ordinary, resume = stream.events
        assert resume["sequence_number"] == (ordinary[-1]["sequence_number"] if ordinary else resume["starting_after"])
    assert all(e["type"] != RESUME for e in ordinary), "router:stream.resume is the stream's last event"
    seqs = [e["sequence_number"] for e in ordinary]
    if seqs:
        start = seqs[0] if first_seq is None else first_seq
        assert seqs == list(range(start, start + len(seqs))), f"sequence numbers not dense: {seqs[:50]}"
    if stream.events and stream.events[-1]["type"] in TERMINAL and validate:
        validate_response(stream.events[-1]["response"])
    return stream


def assert_well_formed(stream: Stream) -> None:
    """A complete stream: terminal event last, then [DONE]; item lifecycle events in order."""
    assert stream.done, "no data: [DONE]"
    assert stream.events and stream.events[-1]["type"] in TERMINAL, "the last event is not terminal"
    open_items: dict[int, str] = {}
    for e in stream.events:
        if e["type"] == "response.output_item.added":
            assert e["output_index"] not in open_items
            open_items[e["output_index"]] = "open"
        elif e["type"] == "response.output_item.done":
            assert open_items.get(e["output_index"]) == "open", "output_item.done without added"
            open_items[e["output_index"]] = "done"
        elif "output_index" in e:
            assert open_items.get(e["output_index"]) == "open", f"{e['type']} outside its item's lifecycle"
    assert all(v == "done" for v in open_items.values()), "an item was never closed"
