"""Each SSE frame leaves the app in one write (one ASGI body message holds whole frames only): clients that parse
per read, like the Open Responses compliance suite, drop frames split across writes."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tests.support.server import base_config, config_from, sim_model
from unbroken.api.app import create_app


async def test_every_body_message_holds_whole_frames() -> None:
    app = create_app(config_from(base_config(sim_model("demo", length=30), heartbeat_seconds=0.001)))
    body = json.dumps({"model": "demo", "input": "frames", "stream": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/responses", "raw_path": b"/v1/responses", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"authorization", b"Bearer sk-test"),
                         (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    sent: list[dict[str, Any]] = []
    received = False
    finished = asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": body, "more_body": False}
        await finished.wait()  # the client stays connected until the response is complete
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            finished.set()

    await asyncio.wait_for(app(scope, receive, send), 60)
    await app.state.runtime.aclose()
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    chunks = [m["body"] for m in sent[1:] if m.get("body")]
    frames_seen = 0
    for chunk in chunks:
        assert chunk.endswith(b"\n\n"), chunk[-40:]
        for frame in chunk.decode().split("\n\n")[:-1]:
            lines = frame.split("\n")
            if lines[0].startswith(":"):
                continue  # heartbeat comment
            if lines == ["data: [DONE]"]:
                continue
            assert lines[0].startswith("event: ") and lines[1].startswith("data: ") and len(lines) == 2
            assert json.loads(lines[1][6:])["type"] == lines[0][7:]
            frames_seen += 1
    assert frames_seen > 30  # created, in_progress, item/part events and 30 deltas
    assert chunks[-1].endswith(b"data: [DONE]\n\n")
