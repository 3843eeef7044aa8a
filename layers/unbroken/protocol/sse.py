"""Server-sent event framing for the router's own output.

Each frame is built as one bytes object and written in one write (clients such as the Open Responses compliance
suite drop frames split across writes) with `\\n` line endings only, `event:` equal to the JSON `type`."""

from __future__ import annotations

import json
from typing import Any

DONE = b"data: [DONE]\n\n"
HEARTBEAT = b": keep-alive\n\n"


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def frame(event: dict[str, Any], *, with_id: bool = False) -> bytes:
    head = f"id: {event['sequence_number']}\n" if with_id and "sequence_number" in event else ""
    return f"{head}event: {event['type']}\ndata: {_dumps(event)}\n\n".encode()


def data_frame(obj: Any) -> bytes:
    """A `data:`-only frame (Chat Completions chunks have no `event:` line)."""
    return f"data: {_dumps(obj)}\n\n".encode()
