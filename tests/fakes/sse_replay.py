"""What the SSE provider fakes (Gemini, Azure, OpenAI Responses) share: reading recorded streams from the fixture
files, cutting them into SSE frames, generic faults on a frame list, and a fake that serves scripts in order.

Fixture formats: `.chunks.txt` = one JSON data payload per line (the fake adds the SSE framing); `.yaml` = a VCR
cassette whose response bodies are the raw SSE text, replayed as recorded (cut at frame boundaries only so that
faults can be placed after N events).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.fakes.upstream import FakeUpstream, ReceivedRequest, Script

SSE_HEADERS = {"content-type": "text/event-stream"}
MALFORMED_FRAME = b'data: {"candidates": [{"content": \n\n'


def data_lines(path: Path) -> list[str]:
    """The JSON payloads of a `.chunks.txt` file, one per non-empty line."""
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def cassette_bodies(path: Path) -> list[str]:
    """The response body of every interaction of a VCR cassette."""
    with open(path, encoding="utf-8") as f:
        interactions = yaml.safe_load(f)["interactions"]
    bodies = []
    for it in interactions:
        body = it["response"]["body"]["string"]
        bodies.append(body.decode() if isinstance(body, bytes) else body)
    return bodies


def split_sse(body: str) -> list[bytes]:
    """A raw SSE body cut at its blank-line frame separators; every frame keeps its own separator."""
    text = body.replace("\r\n", "\n")
    return [(frame + "\n\n").encode() for frame in text.split("\n\n") if frame.strip()]


def data_frame(payload: str | dict[str, Any], event: str | None = None) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {data}\n\n".encode()


def frame_payloads(frames: list[bytes]) -> list[str]:
    """The `data:` payload of each frame (frames without one are skipped)."""
    out = []
    for frame in frames:
        lines = [ln[5:].lstrip() for ln in frame.decode().split("\n") if ln.startswith("data:")]
        if lines:
            out.append("\n".join(lines))
    return out


# -- generic faults on a frame list ------------------------------------------------------------------------------


def stream(frames: list[bytes], *, reset_after: int | None = None, stall_after: int | None = None,
           headers: dict[str, str] | None = None) -> Script:
    return Script(200, {**SSE_HEADERS, **(headers or {})}, list(frames), reset_after=reset_after,
                  stall_after=stall_after)


def malformed_after(frames: list[bytes], n: int) -> Script:
    """n good frames, then a frame whose JSON is cut in the middle, then the rest."""
    return stream([*frames[:n], MALFORMED_FRAME, *frames[n:]])


def json_error(status: int, body: dict[str, Any] | list[Any], headers: dict[str, str] | None = None) -> Script:
    return Script(status, {"content-type": "application/json", **(headers or {})}, [json.dumps(body).encode()])


class ScriptedFake:
    """A `FakeUpstream` that serves the queued scripts in order, repeating the last one; requests are recorded."""

    def __init__(self, *scripts: Script) -> None:
        self.scripts: list[Script] = list(scripts)
        self.upstream = FakeUpstream(self._handle)
        server = self.upstream._server
        report = server.handle_error

        def quiet(request: Any, client_address: Any) -> None:
            # A client that stops reading early (after an error frame) resets its keep-alive connection: that is
            # expected here, not worth a traceback on stderr.
            if not isinstance(sys.exc_info()[1], ConnectionError):
                report(request, client_address)

        server.handle_error = quiet  # type: ignore[method-assign]

    def _handle(self, request: ReceivedRequest) -> Script:
        if not self.scripts:
            return json_error(500, {"error": {"message": "no script queued"}})
        return self.scripts.pop(0) if len(self.scripts) > 1 else self.scripts[0]

    def serve(self, *scripts: Script) -> ScriptedFake:
        self.scripts = list(scripts)
        return self

    def reset(self) -> None:
        """Forget the queued scripts and the recorded requests (a fake shared by several tests)."""
        self.scripts = []
        self.upstream.requests.clear()

    @property
    def base_url(self) -> str:
        return self.upstream.base_url

    @property
    def requests(self) -> list[ReceivedRequest]:
        return self.upstream.requests

    def close(self) -> None:
        """Stops the server; a stalled response is released with a connection reset."""
        self.upstream.close()

    def __enter__(self) -> ScriptedFake:
        self.upstream.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.upstream.__exit__(*exc)


def recordings(directory: Path, to_frames: Callable[[Path], list[list[bytes]]],
               suffixes: tuple[str, ...] = (".chunks.txt", ".yaml")) -> dict[str, list[bytes]]:
    """Every recorded stream of a provider directory, named `file` or `file#i` when a file holds several."""
    out: dict[str, list[bytes]] = {}
    for path in sorted(directory.iterdir()):
        if not path.name.endswith(suffixes):
            continue
        streams = to_frames(path)
        for i, frames in enumerate(streams):
            out[path.name if len(streams) == 1 else f"{path.name}#{i}"] = frames
    return out
