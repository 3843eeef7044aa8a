"""Every recorded OpenAI Chat / OpenAI-compatible stream in tests/fixtures, replayed by a fake upstream over real
HTTP and streamed through the router: the events are spec-valid and carry exactly the text, refusal, reasoning and
tool calls the recording holds (parsed here, independently of the adapter), with the right final status."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml

from tests.fakes.upstream import FakeUpstream, ReceivedRequest, Script
from tests.support.client import post_stream
from tests.support.paths import FIXTURES
from tests.support.server import RouterThread, base_config
from tests.support.sse import assert_well_formed


def recorded_bodies() -> list[tuple[str, str, bytes]]:
    """(id, provider, raw SSE body) for every stream in the two chat fixture folders."""
    out = []
    for folder, provider in (("openai_chat", "openai"), ("openai_compatible", "openai_compatible")):
        for path in sorted((FIXTURES / folder).iterdir()):
            if path.suffix == ".bin":
                out.append((path.name, provider, path.read_bytes()))
            elif path.name.endswith(".chunks.txt"):
                lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
                out.append((path.name, provider, "".join(f"data: {ln}\n\n" for ln in lines).encode()
                            + b"data: [DONE]\n\n"))
            elif path.suffix == ".yaml":
                for i, interaction in enumerate(yaml.safe_load(path.read_text())["interactions"]):
                    body = interaction["response"]["body"]["string"]
                    out.append((f"{path.name}#{i}", provider, body.encode() if isinstance(body, str) else body))
    return out


@dataclass
class Expected:
    text: str = ""
    refusal: str = ""
    reasoning: str = ""
    calls: dict[int, dict[str, str]] = field(default_factory=dict)
    finish: str | None = None
    error: bool = False
    usage: dict[str, Any] | None = None


def expected_from(raw: bytes) -> Expected:
    exp = Expected()
    for block in raw.decode().split("\n\n"):
        data = [ln[6:] for ln in block.split("\n") if ln.startswith("data: ")]
        if not data or data[0] == "[DONE]":
            continue
        chunk = json.loads(data[0])
        if chunk.get("error"):
            exp.error = True
            break
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            exp.text += delta.get("content") or ""
            exp.refusal += delta.get("refusal") or ""
            exp.reasoning += delta.get("reasoning_content") or delta.get("reasoning") or ""
            for call in delta.get("tool_calls") or []:
                entry = exp.calls.setdefault(call["index"], {"name": "", "arguments": "", "id": ""})
                fn = call.get("function") or {}
                entry["name"] = entry["name"] or fn.get("name") or ""
                entry["id"] = entry["id"] or call.get("id") or ""
                entry["arguments"] += fn.get("arguments") or ""
            exp.finish = choice.get("finish_reason") or exp.finish
        if chunk.get("usage"):
            exp.usage = chunk["usage"]
    return exp


def frames(raw: bytes) -> list[bytes]:
    return [block + b"\n\n" for block in raw.split(b"\n\n") if block.strip()]


CASES = recorded_bodies()


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    current: dict[str, bytes] = {}

    def handler(request: ReceivedRequest) -> Script:
        return Script(200, {"content-type": "text/event-stream"}, frames(current["body"]))

    with FakeUpstream(handler) as upstream:
        upstream.current = current  # type: ignore[attr-defined]
        yield upstream


def test_every_fixture_file_is_covered() -> None:
    names = {c[0].split("#")[0] for c in CASES}
    on_disk = {p.name for d in ("openai_chat", "openai_compatible") for p in (FIXTURES / d).iterdir()}
    assert names == on_disk


@pytest.mark.parametrize(("name", "provider", "raw"), CASES, ids=[c[0] for c in CASES])
def test_replay_through_router(fake: FakeUpstream, name: str, provider: str, raw: bytes) -> None:
    fake.current["body"] = raw  # type: ignore[attr-defined]
    model = {"name": "m", "deployments": [{"name": "d", "provider": provider, "model": "upstream-model",
                                           "base_url": f"{fake.base_url}/v1", "api_key": "k",
                                           "options": {"max_retries": 0}}]}
    exp = expected_from(raw)
    with RouterThread(base_config(model, hold_tool_arguments=False)) as router:
        response, stream = post_stream(router.base_url, {"model": "m", "input": "hello"})
    sent = fake.requests[-1]
    assert sent.headers["authorization"] == "Bearer k"
    assert sent.json()["stream"] is True and sent.json()["stream_options"] == {"include_usage": True}
    if exp.error:
        # An in-band error is a failure, never a success: an HTTP error before output, else a terminal event.
        assert response.status_code >= 400 or stream.terminal["type"] != "response.completed"
        return
    assert response.status_code == 200
    assert_well_formed(stream)
    output = stream.response["output"]
    messages = [i for i in output if i["type"] == "message"]
    got_text = "".join(p["text"] for m in messages for p in m["content"] if p["type"] == "output_text")
    got_refusal = "".join(p["refusal"] for m in messages for p in m["content"] if p["type"] == "refusal")
    got_reasoning = "".join(p["text"] for i in output if i["type"] == "reasoning" for p in i.get("content", []))
    assert got_text == exp.text
    assert got_refusal == exp.refusal
    assert got_reasoning == exp.reasoning
    calls = [i for i in output if i["type"] == "function_call"]
    assert [(c["name"], c["arguments"], c["call_id"]) for c in calls] == [
        (c["name"], c["arguments"], c["id"]) for _, c in sorted(exp.calls.items())]
    if exp.finish == "length":
        assert stream.terminal["type"] == "response.incomplete"
        assert stream.response["incomplete_details"] == {"reason": "max_output_tokens"}
    else:
        assert stream.terminal["type"] == "response.completed"
    assert exp.usage is not None
    usage = stream.response["usage"]
    assert usage["input_tokens"] == exp.usage["prompt_tokens"]
    assert usage["output_tokens"] == exp.usage["completion_tokens"]
    assert stream.text() == got_text  # the deltas add up to the final text
