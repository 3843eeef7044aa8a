"""A fake OpenAI Responses API (`POST /v1/responses`, `stream: true`) on `FakeUpstream`: replays the recorded
Responses streams (with `event:` lines, as OpenAI sends them) and injects the API's failure modes. The terminator
of a Responses stream is its terminal event (`response.completed | incomplete | failed`); there is no `[DONE]`."""

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

RESPONSES_FIXTURES = FIXTURES / "openai_responses"
TERMINAL = ("response.completed", "response.incomplete", "response.failed")


def chunks_streams(path: Path) -> list[list[bytes]]:
    """A `.chunks.txt` as SSE frames with `event:` lines, split into its streams: a file may hold several responses
    concatenated (each starts with `response.created`)."""
    streams: list[list[bytes]] = []
    for line in data_lines(path):
        etype = json.loads(line).get("type")
        if etype == "response.created" or not streams:
            streams.append([])
        streams[-1].append(data_frame(line, event=etype))
    return streams


def streams_of(path: Path) -> list[list[bytes]]:
    if path.name.endswith(".chunks.txt"):
        return chunks_streams(path)
    return [split_sse(body) for body in cassette_bodies(path)]


def responses_recordings() -> dict[str, list[bytes]]:
    return recordings(RESPONSES_FIXTURES, streams_of)


def error_event(code: str = "server_is_overloaded", message: str = "The server is overloaded.", *,
                nested: bool = True) -> bytes:
    """The in-band `error` event, nested (as recorded) or flat (as the SDK types describe it)."""
    if nested:
        ev: dict[str, Any] = {"type": "error", "sequence_number": 99,
                              "error": {"type": code, "code": code, "message": message, "param": None}}
    else:
        ev = {"type": "error", "sequence_number": 99, "code": code, "message": message, "param": None}
    return data_frame(ev, event="error")


def failed_event(code: str = "server_error", message: str = "The server had an error.") -> bytes:
    ev = {"type": "response.failed", "sequence_number": 100,
          "response": {"id": "resp_fake", "object": "response", "status": "failed",
                       "error": {"code": code, "message": message}, "usage": None}}
    return data_frame(ev, event="response.failed")


def without_terminal(frames: list[bytes]) -> list[bytes]:
    out = []
    for frame, payload in zip(frames, frame_payloads(frames), strict=True):
        if json.loads(payload).get("type") not in TERMINAL:
            out.append(frame)
    return out


def openai_error_body(code: str, message: str, etype: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": etype or code, "param": None, "code": code}}


class ResponsesFake(ScriptedFake):
    """`with ResponsesFake() as fake: fake.serve(fake.replay("openai-phase.1.chunks.txt"))`."""

    recordings = staticmethod(responses_recordings)

    @staticmethod
    def frames(name: str) -> list[bytes]:
        return responses_recordings()[name]

    def replay(self, name: str) -> Script:
        return stream(self.frames(name))

    @staticmethod
    def http_error(status: int, code: str = "server_error", message: str = "upstream failure", *,
                   headers: dict[str, str] | None = None) -> Script:
        return json_error(status, openai_error_body(code, message), headers)

    def in_band_error(self, name: str, after: int, code: str = "server_is_overloaded", *, nested: bool = True,
                      with_failed: bool = False) -> Script:
        tail = [error_event(code, nested=nested)] + ([failed_event(code)] if with_failed else [])
        return stream([*self.frames(name)[:after], *tail])

    def failed_after(self, name: str, after: int, code: str = "server_error") -> Script:
        return stream([*self.frames(name)[:after], failed_event(code)])

    def reset_after(self, name: str, n: int) -> Script:
        return stream(self.frames(name), reset_after=n)

    def stall_after(self, name: str, n: int) -> Script:
        return stream(self.frames(name), stall_after=n)

    def malformed_after(self, name: str, n: int) -> Script:
        return malformed_after(self.frames(name), n)

    def missing_terminator(self, name: str) -> Script:
        return stream(without_terminal(self.frames(name)))
