"""Small HTTP helpers for tests: POST a body and read the whole SSE stream (bounded by a timeout)."""

from __future__ import annotations

from typing import Any

import httpx

from tests.support.server import API_KEY
from tests.support.sse import Stream, parse_sse

TIMEOUT = httpx.Timeout(60.0)


def headers(key: str = API_KEY, **extra: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}", **extra}


def post_stream(base_url: str, body: dict[str, Any], *, key: str = API_KEY, extra_headers: dict[str, str] | None
                = None, allow_extensions: bool = False) -> tuple[httpx.Response, Stream]:
    with httpx.Client(timeout=TIMEOUT) as client, client.stream(
        "POST", f"{base_url}/responses", json={**body, "stream": True},
        headers=headers(key, **(extra_headers or {})),
    ) as response:
        raw = response.read()
    if response.status_code != 200:
        return response, Stream()
    assert response.headers["content-type"].startswith("text/event-stream")
    return response, parse_sse(raw, allow_extensions=allow_extensions)


def post_json(base_url: str, path: str, body: Any, *, key: str | None = API_KEY,
              extra_headers: dict[str, str] | None = None, content: bytes | None = None) -> httpx.Response:
    hdrs = headers(key) if key is not None else {}
    hdrs.update(extra_headers or {})
    with httpx.Client(timeout=TIMEOUT) as client:
        if content is not None:
            return client.post(f"{base_url}{path}", content=content,
                               headers={"content-type": "application/json", **hdrs})
        return client.post(f"{base_url}{path}", json=body, headers=hdrs)
