"""IR deltas → Open Responses streaming events, and the response object they build.

`ResponseEmitter` owns the stream's `sequence_number` counter and the output items. It is fed by the attempt loop
(one delta at a time, across attempts) and can be rebuilt from already-emitted events (`restore`) when another
process takes a response over, so the numbering stays dense across takeovers.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from unbroken.ir import (
    Delta,
    Finish,
    ReasoningDelta,
    ReasoningSeal,
    RefusalDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
    UpstreamModel,
    Usage,
)
from unbroken.journal.store import TERMINAL_EVENT_TYPES
from unbroken.protocol.reasoning_codec import encode_reasoning

Event = dict[str, Any]



def new_id(prefix: str) -> str:
    # 128 random bits: ids are capabilities (DESIGN: unguessable, bound to the caller).
    return f"{prefix}_{secrets.token_hex(16)}"


@dataclass(slots=True)
class _OpenItem:
    kind: str  # message | function_call | reasoning
    output_index: int
    item: dict[str, Any]
    part_kind: str | None = None  # output_text | refusal (message); reasoning_text | summary_text (reasoning)
    text: list[str] = field(default_factory=list)
    tool_index: int | None = None
    held_args: list[str] = field(default_factory=list)
    deferred: bool = False  # a held function call: announced only when complete


def usage_object(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_input_tokens},
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }


class ResponseEmitter:
    """Builds one response's event stream. Not thread-safe; one producer at a time (the journal fences others).

    `hold_tool_arguments`: function-call argument deltas are held and sent in one piece when the call is complete,
    so a failover never leaves the client with half a call (DESIGN: continuation)."""

    def __init__(self, response: dict[str, Any], *, hold_tool_arguments: bool = False) -> None:
        self.response = response
        self.hold_tool_arguments = hold_tool_arguments
        self.seq = 0
        self.open: _OpenItem | None = None
        self.calls: dict[int, _OpenItem] = {}  # tool index -> its item, for parallel calls
        self.usage = Usage()
        self.finish: Finish | None = None
        self.upstream_model: str | None = None
        self.closed = False
        # What earlier owners of this response did (takeover): their attempts, as in the `router` field, which the
        # new owner's accounting adds to.
        self.previous_attempts: list[dict[str, Any]] = []

    # -- low level -----------------------------------------------------------------------------------------------

    def _event(self, type_: str, **fields: Any) -> Event:
        event = {"type": type_, "sequence_number": self.seq, **fields}
        self.seq += 1
        return event

    @property
    def output(self) -> list[dict[str, Any]]:
        output: list[dict[str, Any]] = self.response["output"]
        return output

    @property
    def has_output(self) -> bool:
        return bool(self.output)

    def snapshot(self) -> dict[str, Any]:
        """A copy of the response object as it stands, safe to serialise while streaming goes on. The open
        content part shows its text so far: the pieces are joined here, once per snapshot, never per delta."""
        import copy

        response = copy.deepcopy(self.response)
        cur = self.open
        if cur is not None and cur.part_kind is not None and not cur.deferred:
            item = response["output"][cur.output_index]
            parts = item["summary"] if cur.part_kind == "summary_text" else item["content"]
            parts[-1]["refusal" if cur.part_kind == "refusal" else "text"] = "".join(cur.text)
        return response

    # -- lifecycle -----------------------------------------------------------------------------------------------

    def start(self, *, queued: bool = False) -> list[Event]:
        events = [self._event("response.created", response=self.snapshot())]
        if queued:
            events.append(self._event("response.queued", response=self.snapshot()))
        return events

    def in_progress(self) -> list[Event]:
        self.response["status"] = "in_progress"
        return [self._event("response.in_progress", response=self.snapshot())]

    def apply(self, delta: Delta) -> list[Event]:
        if isinstance(delta, TextDelta):
            return self._text(delta.text, "output_text") if delta.text else []
        if isinstance(delta, RefusalDelta):
            return self._text(delta.text, "refusal") if delta.text else []
        if isinstance(delta, ReasoningDelta):
            return self._reasoning(delta) if delta.text else []
        if isinstance(delta, ReasoningSeal):
            return self._seal(delta)
        if isinstance(delta, ToolCallStart):
            return self._tool_start(delta)
        if isinstance(delta, ToolCallDelta):
            return self._tool_delta(delta)
        if isinstance(delta, Usage):
            self.usage = self.usage + delta
            return []
        if isinstance(delta, Finish):
            self.finish = delta
            return []
        if isinstance(delta, UpstreamModel):
            self.upstream_model = delta.name
            return []
        raise TypeError(f"unknown delta {delta!r}")

    # -- messages ------------------------------------------------------------------------------------------------

    def _text(self, text: str, part_kind: str) -> list[Event]:
        events: list[Event] = []
        cur = self.open
        if cur is None or cur.kind != "message":
            events += self.close_open()
            item = {"id": new_id("msg"), "type": "message", "status": "in_progress", "role": "assistant",
                    "content": []}
            cur = self._open_item("message", item, events)
        if cur.part_kind != part_kind:
            events += self._close_part(cur)
            cur.part_kind = part_kind
            part: dict[str, Any] = ({"type": "output_text", "text": "", "annotations": []}
                                    if part_kind == "output_text" else {"type": "refusal", "refusal": ""})
            cur.item["content"].append(part)
            events.append(self._event("response.content_part.added", item_id=cur.item["id"],
                                      output_index=cur.output_index, content_index=len(cur.item["content"]) - 1,
                                      part=dict(part)))
        cur.text.append(text)
        type_ = "response.output_text.delta" if part_kind == "output_text" else "response.refusal.delta"
        extra: dict[str, Any] = {"logprobs": []} if part_kind == "output_text" else {}
        events.append(self._event(type_, item_id=cur.item["id"], output_index=cur.output_index,
                                  content_index=len(cur.item["content"]) - 1, delta=text, **extra))
        return events

    def _close_part(self, cur: _OpenItem) -> list[Event]:
        if cur.part_kind is None:
            return []
        text = "".join(cur.text)
        cur.text = []
        parts = cur.item["summary"] if cur.part_kind == "summary_text" else cur.item["content"]
        idx = len(parts) - 1
        part = parts[idx]
        common = {"item_id": cur.item["id"], "output_index": cur.output_index}
        events: list[Event] = []
        if cur.kind == "message":
            if cur.part_kind == "output_text":
                part["text"] = text
                events.append(self._event("response.output_text.done", **common, content_index=idx, text=text,
                                          logprobs=[]))
            else:
                part["refusal"] = text
                events.append(self._event("response.refusal.done", **common, content_index=idx, refusal=text))
            events.append(self._event("response.content_part.done", **common, content_index=idx, part=dict(part)))
        elif cur.part_kind == "summary_text":
            part["text"] = text
            events.append(self._event("response.reasoning_summary_text.done", **common, summary_index=idx,
                                      text=text))
            events.append(self._event("response.reasoning_summary_part.done", **common, summary_index=idx,
                                      part=dict(part)))
        else:  # reasoning_text
            part["text"] = text
            events.append(self._event("response.reasoning.done", **common, content_index=idx, text=text))
            events.append(self._event("response.content_part.done", **common, content_index=idx, part=dict(part)))
        cur.part_kind = None
        return events

    # -- reasoning -----------------------------------------------------------------------------------------------

    def _reasoning(self, delta: ReasoningDelta) -> list[Event]:
        events: list[Event] = []
        cur = self.open
        if cur is None or cur.kind != "reasoning":
            events += self.close_open()
            cur = self._open_item("reasoning", {"id": new_id("rs"), "type": "reasoning", "summary": []}, events)
        want = "summary_text" if delta.summary else "reasoning_text"
        common = {"item_id": cur.item["id"], "output_index": cur.output_index}
        if cur.part_kind != want:
            events += self._close_part(cur)
            cur.part_kind = want
            if delta.summary:
                part = {"type": "summary_text", "text": ""}
                cur.item["summary"].append(part)
                events.append(self._event("response.reasoning_summary_part.added", **common,
                                          summary_index=len(cur.item["summary"]) - 1, part=dict(part)))
            else:
                part = {"type": "reasoning_text", "text": ""}
                cur.item.setdefault("content", []).append(part)
                events.append(self._event("response.content_part.added", **common,
                                          content_index=len(cur.item["content"]) - 1, part=dict(part)))
        cur.text.append(delta.text)
        if delta.summary:
            events.append(self._event("response.reasoning_summary_text.delta", **common,
                                      summary_index=len(cur.item["summary"]) - 1, delta=delta.text))
        else:
            events.append(self._event("response.reasoning.delta", **common,
                                      content_index=len(cur.item["content"]) - 1, delta=delta.text))
        return events

    def _seal(self, seal: ReasoningSeal) -> list[Event]:
        events: list[Event] = []
        cur = self.open
        if cur is None or cur.kind != "reasoning":
            # Redacted reasoning arrives with no text at all: it still needs an item to travel in.
            events += self.close_open()
            cur = self._open_item("reasoning", {"id": new_id("rs"), "type": "reasoning", "summary": []}, events)
        cur.item["encrypted_content"] = encode_reasoning(seal, previous=cur.item.get("encrypted_content"))
        return events

    # -- function calls ------------------------------------------------------------------------------------------

    def _tool_start(self, start: ToolCallStart) -> list[Event]:
        events = self.close_open()
        item = {"id": new_id("fc"), "type": "function_call", "status": "in_progress", "call_id": start.call_id,
                "name": start.name, "arguments": ""}
        if self.hold_tool_arguments:
            # Nothing of the call goes out until it is complete: a cut call then leaves no trace to take back.
            cur = _OpenItem("function_call", -1, item, deferred=True)
            self.open = cur
        else:
            cur = self._open_item("function_call", item, events)
        cur.tool_index = start.index
        self.calls[start.index] = cur
        return events

    def _tool_delta(self, delta: ToolCallDelta) -> list[Event]:
        cur = self.calls.get(delta.index)
        if cur is None:  # arguments before a start: treat as the start of an unnamed call
            events = self._tool_start(ToolCallStart(delta.index, new_id("call"), ""))
            return events + self._tool_delta(delta)
        cur.item["arguments"] += delta.arguments
        if self.hold_tool_arguments:
            cur.held_args.append(delta.arguments)
            return []
        return [self._event("response.function_call_arguments.delta", item_id=cur.item["id"],
                            output_index=cur.output_index, delta=delta.arguments)]

    # -- items ---------------------------------------------------------------------------------------------------

    def _open_item(self, kind: str, item: dict[str, Any], events: list[Event]) -> _OpenItem:
        self.output.append(item)
        cur = _OpenItem(kind, len(self.output) - 1, item)
        self.open = cur
        # A copy all the way down: the live item keeps growing, and an event must never change after it is emitted.
        added = _copy_item(item)
        if kind == "message":
            added["content"] = []
        events.append(self._event("response.output_item.added", output_index=cur.output_index, item=added))
        return cur

    def close_open(self, status: str = "completed") -> list[Event]:
        """Close the open item (the next one starts, or the stream ends)."""
        cur = self.open
        if cur is None:
            return []
        self.open = None
        events = self._close_part(cur)
        if cur.deferred:
            cur.deferred = False
            self.output.append(cur.item)
            cur.output_index = len(self.output) - 1
            events.append(self._event("response.output_item.added", output_index=cur.output_index,
                                      item={**cur.item, "arguments": ""}))
        common = {"item_id": cur.item["id"], "output_index": cur.output_index}
        if cur.kind == "function_call":
            if cur.held_args:
                events.append(self._event("response.function_call_arguments.delta", **common,
                                          delta="".join(cur.held_args)))
                cur.held_args = []
            events.append(self._event("response.function_call_arguments.done", **common,
                                      arguments=cur.item["arguments"]))
        if cur.kind != "reasoning":
            cur.item["status"] = status
        events.append(self._event("response.output_item.done", output_index=cur.output_index,
                                  item=_copy_item(cur.item)))
        return events

    def drop_open_tool_call(self) -> list[Event]:
        """A function call cut in half: if it was held, nothing of it went out and it is forgotten (the next
        attempt redoes it); if it was streamed, it is closed as incomplete."""
        cur = self.open
        if cur is None or cur.kind != "function_call":
            return []
        if cur.deferred:
            self.open = None
            if cur.tool_index is not None:
                self.calls.pop(cur.tool_index, None)
            return []
        return self.close_open(status="incomplete")

    def open_message_text(self) -> str | None:
        """The text the client has seen of the open assistant message, if a message is open."""
        cur = self.open
        if cur is None or cur.kind != "message" or cur.part_kind != "output_text":
            return None
        return "".join(cur.text)

    # -- the end -------------------------------------------------------------------------------------------------

    def complete(self) -> list[Event]:
        reason = self.finish.reason if self.finish else "stop"
        if reason in ("length", "content_filter"):
            return self.end_incomplete("max_output_tokens" if reason == "length" else "content_filter")
        events = self.close_open()
        self._finalise("completed")
        events.append(self._event("response.completed", response=self.snapshot()))
        self.closed = True
        return events

    def end_incomplete(self, reason: str, *, status: str = "incomplete") -> list[Event]:
        """`status` is "cancelled" for a cancel: OpenAI's status, carried by the spec's `response.incomplete`."""
        events = self.close_open(status="incomplete")
        self._finalise(status)
        self.response["incomplete_details"] = {"reason": reason}
        events.append(self._event("response.incomplete", response=self.snapshot()))
        self.closed = True
        return events

    def fail(self, code: str, message: str, *, error_type: str = "server_error") -> list[Event]:
        events = self.close_open(status="incomplete")
        events.append(self._event("error", error={"type": error_type, "code": code, "message": message,
                                                  "param": None}))
        self._finalise("failed")
        self.response["error"] = {"code": code, "message": message}
        events.append(self._event("response.failed", response=self.snapshot()))
        self.closed = True
        return events

    def _finalise(self, status: str) -> None:
        self.response["status"] = status
        self.response["completed_at"] = int(time.time()) if status == "completed" else None
        self.response["usage"] = usage_object(self.usage)
        if self.upstream_model and self.response.get("model") != self.upstream_model:
            # DESIGN (failover accounting): `model` names the upstream model that actually answered.
            self.response["model"] = self.upstream_model

    def extension(self, type_: str, **fields: Any) -> Event:
        """A `router:` extension event (only sent to clients that opted in)."""
        return self._event(type_, **fields)


def _copy_item(item: dict[str, Any]) -> dict[str, Any]:
    out = dict(item)
    if "content" in out:
        out["content"] = [dict(p) for p in out["content"]]
    if "summary" in out:
        out["summary"] = [dict(p) for p in out["summary"]]
    return out


_OUTPUT_DELTAS = frozenset({"response.output_text.delta", "response.refusal.delta", "response.reasoning.delta",
                            "response.reasoning_summary_text.delta", "response.function_call_arguments.delta"})


def streamed_chars(events: list[Event], *, after: int = -1) -> int:
    """Characters of model output in `events` after sequence number `after` (deltas, and function names)."""
    total = 0
    for e in events:
        if e["sequence_number"] <= after:
            continue
        if e["type"] in _OUTPUT_DELTAS:
            total += len(e["delta"])
        elif e["type"] == "response.output_item.added" and e["item"].get("type") == "function_call":
            total += len(e["item"].get("name") or "")
    return total


def restore_emitter(events: list[Event], *, hold_tool_arguments: bool = False) -> ResponseEmitter:
    """Rebuild an emitter from the events a response has committed, so another process can go on where a dead
    producer stopped: same response object, same open item and text so far, next `sequence_number`."""
    import copy

    base = next((e["response"] for e in reversed(events) if e["type"] in ("response.in_progress",
                                                                        "response.queued", "response.created")),
                None)
    if base is None:
        raise ValueError("no response.created event to restore from")
    emitter = ResponseEmitter(copy.deepcopy(base), hold_tool_arguments=hold_tool_arguments)
    emitter.response["output"] = []
    emitter.response["status"] = "in_progress"
    by_index: dict[int, _OpenItem] = {}
    for e in events:
        etype = e["type"]
        if etype == "response.output_item.added":
            item = copy.deepcopy(e["item"])
            kind = item["type"]
            emitter.output.append(item)
            cur = _OpenItem(kind, len(emitter.output) - 1, item)
            by_index[cur.output_index] = cur
            emitter.open = cur
        elif etype == "response.content_part.added" or etype == "response.reasoning_summary_part.added":
            cur = by_index[e["output_index"]]
            part = dict(e["part"])
            if etype == "response.reasoning_summary_part.added":
                cur.item["summary"].append(part)
                cur.part_kind = "summary_text"
            else:
                cur.item.setdefault("content", []).append(part)
                cur.part_kind = part["type"]
            cur.text = []
        elif etype in ("response.output_text.delta", "response.refusal.delta", "response.reasoning.delta",
                       "response.reasoning_summary_text.delta"):
            by_index[e["output_index"]].text.append(e["delta"])
        elif etype in ("response.content_part.done", "response.reasoning_summary_part.done"):
            cur = by_index[e["output_index"]]
            parts = cur.item["summary"] if etype == "response.reasoning_summary_part.done" else cur.item["content"]
            parts[-1] = dict(e["part"])
            cur.part_kind = None
            cur.text = []
        elif etype == "response.function_call_arguments.delta":
            by_index[e["output_index"]].item["arguments"] += e["delta"]
        elif etype == "response.output_item.done":
            emitter.output[e["output_index"]] = copy.deepcopy(e["item"])
            if emitter.open is not None and emitter.open.output_index == e["output_index"]:
                emitter.open = None
        elif etype in TERMINAL_EVENT_TYPES:
            emitter.closed = True
        emitter.seq = e["sequence_number"] + 1
    if emitter.open is not None:
        # The open item's dict is the one in `output`; keep them the same object so closing updates both.
        emitter.open.item = emitter.output[emitter.open.output_index]
        if emitter.open.kind == "function_call":
            emitter.calls[-1] = emitter.open
            emitter.open.tool_index = -1
    return emitter
