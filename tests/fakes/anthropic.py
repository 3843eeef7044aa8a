"""A fake Anthropic Messages API on `FakeUpstream`: replays recorded streams and injects Anthropic's failure modes.

Fixture files: raw `.txt` SSE bodies are replayed byte for byte (cut at their blank lines so faults can go after N
events); `.chunks.txt` lines become `event: <type>\\ndata: <line>\\n\\n`; cassette `.yaml` bodies are raw SSE too.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any

import yaml

from tests.fakes.upstream import FakeUpstream, ReceivedRequest, Script
from tests.support.paths import FIXTURES

ANTHROPIC_FIXTURES = FIXTURES / "anthropic"

SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}


def _split_sse(text: str) -> list[bytes]:
    """One frame per SSE event, bytes as recorded. A recording stored without its final blank line gets it back
    (the wire always has it; without it an SSE parser would drop the last event)."""
    return [(block + "\n\n").encode() for block in text.split("\n\n") if block.strip()]


def fixture_frames(path: Path, interaction: int = 0) -> list[bytes]:
    """The SSE frames of a fixture's stream, one per event."""
    if path.suffix == ".yaml":
        with open(path, encoding="utf-8") as f:
            body = yaml.safe_load(f)["interactions"][interaction]["response"]["body"]["string"]
        return _split_sse(body if isinstance(body, str) else body.decode())
    text = path.read_text(encoding="utf-8")
    if path.name.endswith(".chunks.txt"):
        return [f"event: {json.loads(line)['type']}\ndata: {line}\n\n".encode()
                for line in text.splitlines() if line.strip()]
    return _split_sse(text)


def error_frame(error_type: str = "overloaded_error", message: str = "Overloaded") -> bytes:
    """Anthropic's in-band failure after HTTP 200."""
    return f"event: error\ndata: {json.dumps({'type': 'error', 'error': {'type': error_type, 'message': message}})}" \
           "\n\n".encode()


MALFORMED_FRAME = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"ty\n\n'


def stream_script(
    frames: list[bytes],
    *,
    error_after: int | None = None,
    error_type: str = "overloaded_error",
    reset_after: int | None = None,
    stall_after: int | None = None,
    malformed_after: int | None = None,
    drop_message_stop: bool = False,
) -> Script:
    """A 200 SSE stream of `frames` with at most one fault placed after that many frames."""
    frames = list(frames)
    if drop_message_stop:
        frames = [f for f in frames if b"message_stop" not in f]
    if error_after is not None:
        frames = [*frames[:error_after], error_frame(error_type)]
    if malformed_after is not None:
        frames = [*frames[:malformed_after], MALFORMED_FRAME, *frames[malformed_after:]]
    return Script(200, dict(SSE_HEADERS), frames, reset_after=reset_after, stall_after=stall_after)


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "api_error",
    529: "overloaded_error",
}


def http_error_script(status: int, message: str = "error", *, error_type: str | None = None,
                      retry_after: str | None = None) -> Script:
    """A pre-stream error with Anthropic's body `{"type":"error","error":{"type","message"},"request_id"}`."""
    body = {"type": "error", "error": {"type": error_type or _ERROR_TYPES.get(status, "api_error"),
                                       "message": message}, "request_id": "req_fake"}
    headers = {"Content-Type": "application/json", "request-id": "req_fake"}
    if retry_after is not None:
        headers["retry-after"] = retry_after
    return Script(status, headers, [json.dumps(body).encode()])


def _quiet_handle_error(request: object, client_address: object) -> None:
    """Clients that hang up mid-response (resets, cancelled streams) are the point of these tests, not noise."""
    exc = sys.exc_info()[1]
    if not isinstance(exc, ConnectionError):
        traceback.print_exc()


class FakeAnthropic(FakeUpstream):
    """Serves `scripts` in order, one per request (the last one repeats); `bodies` are the JSON bodies received."""

    def __init__(self, *scripts: Script) -> None:
        self.scripts = list(scripts)
        super().__init__(self._next)
        self._server.handle_error = _quiet_handle_error  # type: ignore[method-assign]

    def play(self, *scripts: Script) -> FakeAnthropic:
        """Reuse a running fake (starting a server per test is the slow part): new scripts, no recorded requests."""
        self.scripts = list(scripts)
        self.requests.clear()
        return self

    def _next(self, request: ReceivedRequest) -> Script:
        return self.scripts[min(len(self.requests) - 1, len(self.scripts) - 1)]

    @property
    def bodies(self) -> list[Any]:
        return [r.json() for r in self.requests]
