"""A fake Bedrock runtime (ConverseStream) on `FakeUpstream`: replays recorded streams as AWS event-stream frames and
injects Bedrock's failure modes.

botocore ships only a decoder for `application/vnd.amazon.eventstream`, so the encoder is here: a frame is
prelude (total length, headers length, prelude CRC32) + headers + payload + message CRC32, all big-endian.

Fixture files: `.chunks.txt` (one decoded `{eventType: payload}` per line) are encoded frame by frame; cassette
`.yaml` bodies are the real wire bytes, cut at their frame boundaries so faults can be placed after N events.
Every frame is written as two HTTP chunks (split mid-frame) so the client has to reassemble frames.
"""

from __future__ import annotations

import json
import struct
import sys
import traceback
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from tests.fakes.upstream import FakeUpstream, ReceivedRequest, Script
from tests.support.paths import FIXTURES

BEDROCK_FIXTURES = FIXTURES / "bedrock"

EVENTSTREAM = "application/vnd.amazon.eventstream"
_STRING_HEADER = 7


def _header(name: str, value: str) -> bytes:
    key, val = name.encode(), value.encode()
    return struct.pack("!B", len(key)) + key + struct.pack("!BH", _STRING_HEADER, len(val)) + val


def encode_frame(headers: dict[str, str], payload: bytes) -> bytes:
    """One AWS event-stream message with correct prelude and message CRCs."""
    head = b"".join(_header(k, v) for k, v in headers.items())
    prelude = struct.pack("!II", 12 + len(head) + len(payload) + 4, len(head))
    body = prelude + struct.pack("!I", zlib.crc32(prelude)) + head + payload
    return body + struct.pack("!I", zlib.crc32(body))


def event_frame(event_type: str, payload: dict[str, Any] | bytes) -> bytes:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return encode_frame(
        {":event-type": event_type, ":content-type": "application/json", ":message-type": "event"}, data)


_EXCEPTION_MESSAGES = {
    "throttlingException": "Too many tokens, please wait before trying again.",
    "modelStreamErrorException": "Model stream error",
    "internalServerException": "The server encountered an internal error",
    "serviceUnavailableException": "Service unavailable",
    "validationException": "Malformed input request",
}


def exception_frame(exception_type: str = "throttlingException", message: str | None = None,
                    **extra: Any) -> bytes:
    """A modelled in-stream exception, as ConverseStream sends it (camelCase member name)."""
    message = message or _EXCEPTION_MESSAGES.get(exception_type, "error")
    return encode_frame(
        {":exception-type": exception_type, ":content-type": "application/json", ":message-type": "exception"},
        json.dumps({"message": message, **extra}).encode())


def corrupt_frame(frame: bytes) -> bytes:
    """The same frame with a flipped payload byte: its message CRC no longer matches."""
    pos = len(frame) - 5
    return frame[:pos] + bytes([frame[pos] ^ 0xFF]) + frame[pos + 1:]


def split_frames(body: bytes) -> list[bytes]:
    """Cut a recorded event-stream body at frame boundaries (the prelude's total length), bytes unchanged."""
    frames = []
    pos = 0
    while pos < len(body):
        (total,) = struct.unpack("!I", body[pos:pos + 4])
        frames.append(body[pos:pos + total])
        pos += total
    return frames


def cassette_interactions(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)["interactions"]


def fixture_frames(path: Path, interaction: int = 0) -> list[bytes]:
    """The frames of a fixture's (successful) stream, ready to replay."""
    if path.suffix == ".yaml":
        body = cassette_interactions(path)[interaction]["response"]["body"]["string"]
        if not isinstance(body, bytes):
            raise ValueError(f"{path.name} interaction {interaction} is not an event stream")
        return split_frames(body)
    frames = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            ((event_type, payload),) = json.loads(line).items()
            frames.append(event_frame(event_type, payload))
    return frames


def chunked(frames: Iterable[bytes]) -> list[bytes]:
    """Each frame as two HTTP chunks, split at a varying point, so frames straddle chunk boundaries."""
    out: list[bytes] = []
    for i, frame in enumerate(frames):
        cut = max(1, min(len(frame) - 1, 5 + (i * 7) % max(1, len(frame) - 6)))
        out += [frame[:cut], frame[cut:]]
    return out


def rechunked(frames: Iterable[bytes], size: int) -> list[bytes]:
    """The whole body re-cut into `size`-byte chunks: chunks span several frames and frames span chunks."""
    body = b"".join(frames)
    return [body[i:i + size] for i in range(0, len(body), size)]


def stream_script(
    frames: list[bytes],
    *,
    exception_after: int | None = None,
    exception_type: str = "throttlingException",
    reset_after: int | None = None,
    stall_after: int | None = None,
    malformed_after: int | None = None,
    drop_message_stop: bool = False,
) -> Script:
    """A 200 event stream of `frames` with at most one fault placed after that many frames."""
    frames = list(frames)
    if drop_message_stop:
        # Everything from messageStop on is lost, as when the connection closes cleanly too early.
        cut = next((i for i, f in enumerate(frames) if b"messageStop" in f), len(frames))
        frames = frames[:cut]
    if exception_after is not None:
        frames = [*frames[:exception_after], exception_frame(exception_type)]
    if malformed_after is not None:
        frames = [*frames[:malformed_after], corrupt_frame(frames[malformed_after])]
    chunks = chunked(frames)
    script = Script(200, {"Content-Type": EVENTSTREAM}, chunks)
    # Frames are two chunks each: a fault "after N frames" is after 2N chunks.
    if reset_after is not None:
        script.reset_after = 2 * reset_after
    if stall_after is not None:
        script.stall_after = 2 * stall_after
    return script


_ERROR_TYPES = {
    429: "ThrottlingException",
    500: "InternalServerException",
    503: "ServiceUnavailableException",
    400: "ValidationException",
    403: "AccessDeniedException",
    404: "ResourceNotFoundException",
}


def http_error_script(status: int, message: str = "Too many requests, please wait before trying again.",
                      error_type: str | None = None, headers: dict[str, str] | None = None) -> Script:
    """A pre-stream error as Bedrock sends it: JSON `{"message"}` with the modelled type in `x-amzn-ErrorType`."""
    etype = error_type if error_type is not None else _ERROR_TYPES.get(status, "InternalServerException")
    head = {"Content-Type": "application/json", **(headers or {})}
    if etype:
        head["x-amzn-ErrorType"] = f"{etype}:http://internal.amazon.com/coral/com.amazon.bedrock/"
    return Script(status, head, [json.dumps({"message": message}).encode()])


def cassette_script(path: Path, interaction: int = 0) -> Script:
    """A cassette interaction replayed as recorded: its status, content type and body (event-stream bytes are
    re-cut into frame-straddling chunks)."""
    response = cassette_interactions(path)[interaction]["response"]
    status = int(response["status"]["code"])
    headers = {k.lower(): v[0] if isinstance(v, list) else v for k, v in response["headers"].items()}
    ctype = headers.get("content-type", "application/json")
    body = response["body"]["string"] if "body" in response else json.dumps(response["parsed_body"]).encode()
    if isinstance(body, str):
        body = body.encode()
    if ctype.startswith(EVENTSTREAM):
        return Script(status, {"Content-Type": ctype}, chunked(split_frames(body)))
    return Script(status, {"Content-Type": ctype}, [body])


def _quiet_handle_error(request: object, client_address: object) -> None:
    """Clients that hang up mid-response (resets, cancelled streams) are the point of these tests, not noise."""
    exc = sys.exc_info()[1]
    if not isinstance(exc, ConnectionError):
        traceback.print_exc()


class FakeBedrock(FakeUpstream):
    """Serves `scripts` in order, one per request (the last one repeats). `requests[i].json()` is the Converse
    body boto3 sent; `requests[i].path` holds the model id."""

    def __init__(self, *scripts: Script) -> None:
        self.scripts = list(scripts)
        super().__init__(self._next)
        self._server.handle_error = _quiet_handle_error  # type: ignore[method-assign]

    def play(self, *scripts: Script) -> FakeBedrock:
        """Reuse a running fake (starting a server per test is the slow part): new scripts, no recorded requests."""
        self.scripts = list(scripts)
        self.requests.clear()
        return self

    def _next(self, request: ReceivedRequest) -> Script:
        index = min(len(self.requests) - 1, len(self.scripts) - 1)
        return self.scripts[index]

    @property
    def bodies(self) -> list[Any]:
        return [r.json() for r in self.requests]
