"""A fake Azure OpenAI resource on `FakeUpstream`: chat deployments (`/openai/v1/chat/completions` or the classic
`/openai/deployments/{name}/chat/completions?api-version=...`) and the v1 Responses API, replaying the recorded
Azure streams and injecting Azure's failure modes (including content filtering, which is Azure's own).

Which wire a recording speaks is read from it: Responses events carry a `type` starting with `response.`; chat
chunks do not. Chat streams end with `data: [DONE]`; the recorded chunks file leaves it out, the fake adds it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.fakes.openai_responses import chunks_streams, error_event, failed_event, openai_error_body, without_terminal
from tests.fakes.sse_replay import (
    ScriptedFake,
    data_frame,
    data_lines,
    frame_payloads,
    json_error,
    malformed_after,
    recordings,
    stream,
)
from tests.fakes.upstream import Script
from tests.support.paths import FIXTURES

AZURE_FIXTURES = FIXTURES / "azure"
DONE = data_frame("[DONE]")

# Azure's prompt-filter rejection (shape from the Azure docs; values made up here).
PROMPT_FILTER_BODY: dict[str, Any] = {"error": {
    "message": "The response was filtered due to the prompt triggering Azure OpenAI's content management policy.",
    "type": None, "param": "prompt", "code": "content_filter", "status": 400,
    "innererror": {"code": "ResponsibleAIPolicyViolation", "content_filter_result": {
        "hate": {"filtered": False, "severity": "safe"}, "violence": {"filtered": True, "severity": "high"}}}}}


def is_responses(path: Path) -> bool:
    first = json.loads(data_lines(path)[0])
    return str(first.get("type", "")).startswith("response.")


def streams_of(path: Path) -> list[list[bytes]]:
    if is_responses(path):
        return chunks_streams(path)
    return [[data_frame(line) for line in data_lines(path)] + [DONE]]


def azure_recordings() -> dict[str, list[bytes]]:
    return recordings(AZURE_FIXTURES, streams_of, suffixes=(".chunks.txt",))


def chat_payloads(frames: list[bytes]) -> list[dict[str, Any]]:
    return [json.loads(p) for p in frame_payloads(frames) if p != "[DONE]"]


def content_filtered(frames: list[bytes]) -> list[bytes]:
    """A chat stream whose answer is cut by the (synchronous) content filter: the finish chunk says
    `content_filter` instead of `stop`."""
    out = []
    for chunk in chat_payloads(frames):
        for choice in chunk.get("choices") or []:
            if choice.get("finish_reason"):
                choice["finish_reason"] = "content_filter"
                choice["content_filter_results"] = {"violence": {"filtered": True, "severity": "high"}}
        out.append(data_frame(chunk))
    return [*out, DONE]


def late_annotation(frames: list[bytes], finish_reason: str | None) -> list[bytes]:
    """Asynchronous-filter mode: an annotation chunk (empty id/model, no delta, content_filter_offsets) arrives after
    the `finish_reason: stop` chunk, before `[DONE]`; with `finish_reason: content_filter` it retracts the answer."""
    annotation = {"choices": [{"index": 0, "finish_reason": finish_reason,
                               "content_filter_results": {"violence": {"filtered": finish_reason is not None,
                                                                       "severity": "high" if finish_reason else
                                                                       "safe"}},
                               "content_filter_offsets": {"check_offset": 0, "start_offset": 0, "end_offset": 40}}],
                  "created": 0, "id": "", "model": "", "object": ""}
    body = [f for f in frames if f != DONE]
    return [*body, data_frame(annotation), DONE]


def chat_without_finish(frames: list[bytes]) -> list[bytes]:
    out = []
    for chunk in chat_payloads(frames):
        if any(c.get("finish_reason") for c in chunk.get("choices") or []):
            continue
        out.append(data_frame(chunk))
    return out


class AzureFake(ScriptedFake):
    """`with AzureFake() as fake: fake.serve(fake.replay("azure-model-router.1.chunks.txt"))`."""

    recordings = staticmethod(azure_recordings)

    @staticmethod
    def frames(name: str) -> list[bytes]:
        return azure_recordings()[name]

    def replay(self, name: str) -> Script:
        return stream(self.frames(name))

    @staticmethod
    def http_error(status: int, code: str = "server_error", message: str = "upstream failure", *,
                   headers: dict[str, str] | None = None) -> Script:
        return json_error(status, openai_error_body(code, message), headers)

    @staticmethod
    def prompt_filtered() -> Script:
        return json_error(400, PROMPT_FILTER_BODY)

    def chat_error_after(self, name: str, after: int, message: str = "The server had an error while processing "
                         "your request. Sorry about that!", etype: str = "server_error") -> Script:
        """Chat's in-band error: `data: {"error": {...}}` without choices, then the socket closes."""
        return stream([*self.frames(name)[:after], data_frame({"error": {"message": message, "type": etype}})])

    def responses_error_after(self, name: str, after: int, code: str = "server_is_overloaded") -> Script:
        return stream([*self.frames(name)[:after], error_event(code), failed_event(code)])

    def content_filtered(self, name: str) -> Script:
        return stream(content_filtered(self.frames(name)))

    def late_annotation(self, name: str, finish_reason: str | None) -> Script:
        return stream(late_annotation(self.frames(name), finish_reason))

    def reset_after(self, name: str, n: int) -> Script:
        return stream(self.frames(name), reset_after=n)

    def stall_after(self, name: str, n: int) -> Script:
        return stream(self.frames(name), stall_after=n)

    def malformed_after(self, name: str, n: int) -> Script:
        return malformed_after(self.frames(name), n)

    def missing_terminator(self, name: str) -> Script:
        frames = self.frames(name)
        if name.startswith("azure-model-router"):
            return stream(chat_without_finish(frames))
        return stream(without_terminal(frames))
