"""How a cut answer goes on (DESIGN: continuation): the request a continuation attempt sends, and the seam between
the text already sent and what the next attempt streams.

Literal continuation (assistant prefill) goes on exactly where the text stopped. A continue-instruction attempt
usually repeats some of the end of the partial text first: `OverlapFilter` holds the attempt's first text until it
can tell what was repeated, strips it, and lets the rest through unchanged.
"""

from __future__ import annotations

from dataclasses import replace

from unbroken.ir import (
    Continuation,
    Delta,
    Finish,
    FunctionCall,
    GenerationRequest,
    Item,
    Message,
    Reasoning,
    RefusalDelta,
    TextDelta,
    TextPart,
    ToolCallDelta,
    ToolCallStart,
)
from unbroken.protocol.reasoning_codec import decode_reasoning
from unbroken.protocol.responses import ResponseEmitter

# How much new text to look at before deciding what a continue-instruction attempt repeated.
OVERLAP_WINDOW = 256
MIN_UNALIGNED_OVERLAP = 12


def strip_overlap(partial: str, new: str, *, final: bool) -> tuple[str, bool]:
    """Remove from the start of `new` what repeats the end of `partial`. Returns (text, decided); not decided means
    more text is needed (unless `final`). A match must be long, or sit on a word boundary, to count: a short
    coincidence like a shared letter is not an overlap."""
    if len(new) < OVERLAP_WINDOW and not final:
        return new, False
    limit = min(len(partial), len(new))
    for k in range(limit, 0, -1):
        if not partial.endswith(new[:k]):
            continue
        if k == len(partial):
            return new[k:], True  # the model started over: everything it repeats goes
        aligned = new[0].isspace() or partial[-k - 1].isspace()
        # One repeated word at a word boundary is as likely the answer's own words ("green green") as an overlap;
        # two words or a long run are not a coincidence.
        if k >= MIN_UNALIGNED_OVERLAP or (aligned and len(new[:k].split()) >= 2):
            return new[k:], True
    return new, True


def seam(partial: str, new: str) -> str:
    """Whitespace at the seam: a continuation that starts with the whitespace the partial text already ends with
    would double it. Nothing is ever inserted: a cut can fall inside a word (or a JSON string), where a guessed
    space would corrupt the answer."""
    if partial[-1:].isspace() and new[:1].isspace():
        return new.lstrip()
    return new


# Output that is not text: once it comes, whatever text is held is all the overlap there is.
_ENDS_OVERLAP_WINDOW = (ToolCallStart, ToolCallDelta, RefusalDelta, Finish)


class OverlapFilter:
    """The deltas of one attempt, with the seam made right. Feed every delta through `feed`, then `close` at the
    end of the attempt's stream; both return the deltas to emit."""

    __slots__ = ("_held", "_partial", "_pending")

    def __init__(self, continuation: Continuation | None) -> None:
        self._partial = continuation.text if continuation is not None else ""
        self._pending = continuation is not None and not continuation.literal
        self._held = ""

    def feed(self, delta: Delta) -> list[Delta]:
        if not self._pending:
            return [delta]
        if isinstance(delta, TextDelta):
            self._held += delta.text
            text, decided = strip_overlap(self._partial, self._held, final=False)
            if not decided:
                return []
            self._pending = False
            return [TextDelta(seam(self._partial, text))]
        if isinstance(delta, _ENDS_OVERLAP_WINDOW):
            return [*self._release(), delta]
        return [delta]

    def close(self) -> list[Delta]:
        return self._release() if self._pending and self._held else []

    def _release(self) -> list[Delta]:
        self._pending = False
        text, _ = strip_overlap(self._partial, self._held, final=True)
        return [TextDelta(seam(self._partial, text))]


def continuation_base(request: GenerationRequest, emitter: ResponseEmitter) -> GenerationRequest | None:
    """The request a continuation attempt builds on: the original input plus every completed output item.
    None when nothing is left to generate (only complete function calls were cut short of a finish)."""
    items: list[Item] = list(request.items)
    open_item = emitter.open.item if emitter.open is not None else None
    for out in emitter.output:
        if out is open_item:
            continue
        if out["type"] == "function_call" and out.get("status") == "completed":
            items.append(FunctionCall(out["call_id"], out["name"], out["arguments"]))
        elif out["type"] == "message" and out.get("status") == "completed":
            text = "".join(p.get("text", "") for p in out["content"] if p["type"] == "output_text")
            items.append(Message("assistant", [TextPart(text)]))
        elif out["type"] == "reasoning" and out.get("encrypted_content"):
            sealed = decode_reasoning(out["encrypted_content"])
            items.append(Reasoning(text="".join(p.get("text", "") for p in out.get("content", [])),
                                   signature=sealed.signature, encrypted_content=sealed.encrypted_content,
                                   provider=sealed.provider))
    last = emitter.output[-1] if emitter.output else None
    if emitter.open is None and last is not None and last["type"] == "function_call" \
            and last["status"] == "completed":
        return None
    return replace(request, items=items)


def attempt_request(base: GenerationRequest, emitter: ResponseEmitter, *, literal: bool,
                    provider: str) -> GenerationRequest:
    """What one attempt sends: `base`, and when a message was cut, the text so far as a continuation. Reasoning is
    bound to the provider that produced it (signatures, encrypted content), so another provider's is left out."""
    response_id = emitter.response["id"]
    partial = emitter.open_message_text()
    if partial is None:
        return replace(base, trace_id=response_id)
    items = [it for it in base.items if not isinstance(it, Reasoning) or it.provider == provider]
    return replace(base, continuation=Continuation(partial, literal), trace_id=response_id, items=items)
