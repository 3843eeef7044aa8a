"""A fake Gemini API (`streamGenerateContent?alt=sse`) on `FakeUpstream`: replays the recorded Gemini streams and
injects Gemini's failure modes. Gemini has no terminator line: a stream is complete when a candidate carried a
`finishReason`, so "missing terminator" means the finish reason never came."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.fakes.sse_replay import (
    ScriptedFake,
    cassette_bodies,
    data_frame,
    data_lines,
    frame_payloads,
    json_error,
    malformed_after,
    recordings,
    split_sse,
    stream,
)
from tests.fakes.upstream import Script
from tests.support.paths import FIXTURES

GEMINI_FIXTURES = FIXTURES / "gemini"
RETRY_INFO_FIXTURE = GEMINI_FIXTURES / "google-429-retry-info.json"
_STATUS_TEXT = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED",
                500: "INTERNAL", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


def streams_of(path: Path) -> list[list[bytes]]:
    if path.name.endswith(".chunks.txt"):
        return [[data_frame(line) for line in data_lines(path)]]
    return [split_sse(body) for body in cassette_bodies(path)]


def gemini_recordings() -> dict[str, list[bytes]]:
    return recordings(GEMINI_FIXTURES, streams_of)


def error_body(code: int, message: str, status: str | None = None, retry_delay: str | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message, "status": status or _STATUS_TEXT.get(code, "UNKNOWN")}
    if retry_delay is not None:
        err["details"] = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay}]
    return {"error": err}


def error_frame(code: int = 503, status: str | None = None,
                message: str = "This model is currently experiencing high demand. Please try again later.") -> bytes:
    """Gemini's in-band failure after HTTP 200: a data object holding only `error`."""
    return data_frame(error_body(code, message, status))


def without_finish(frames: list[bytes]) -> list[bytes]:
    """The same stream with every `finishReason` removed: all the content, but no end marker."""
    out = []
    for payload in frame_payloads(frames):
        chunk = json.loads(payload)
        for cand in chunk.get("candidates") or []:
            cand.pop("finishReason", None)
        out.append(data_frame(chunk))
    return out


class GeminiFake(ScriptedFake):
    """`with GeminiFake() as fake: fake.serve(fake.replay("google-text.chunks.txt"))`."""

    recordings = staticmethod(gemini_recordings)

    @staticmethod
    def frames(name: str) -> list[bytes]:
        return gemini_recordings()[name]

    def replay(self, name: str) -> Script:
        return stream(self.frames(name))

    @staticmethod
    def http_error(code: int, message: str = "upstream failure", *, status: str | None = None,
                   retry_delay: str | None = None, headers: dict[str, str] | None = None) -> Script:
        return json_error(code, error_body(code, message, status, retry_delay), headers)

    @staticmethod
    def retry_info_429() -> Script:
        """The recorded 429 RESOURCE_EXHAUSTED body with QuotaFailure + RetryInfo details."""
        return json_error(429, json.loads(RETRY_INFO_FIXTURE.read_text(encoding="utf-8")))

    def in_band_error(self, name: str, after: int, code: int = 503, status: str | None = None) -> Script:
        return stream([*self.frames(name)[:after], error_frame(code, status)])

    def reset_after(self, name: str, n: int) -> Script:
        return stream(self.frames(name), reset_after=n)

    def stall_after(self, name: str, n: int) -> Script:
        return stream(self.frames(name), stall_after=n)

    def malformed_after(self, name: str, n: int) -> Script:
        return malformed_after(self.frames(name), n)

    def missing_terminator(self, name: str) -> Script:
        return stream(without_finish(self.frames(name)))
