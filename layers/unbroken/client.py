"""A Python client for unbroken's resumable streams: nothing of the router is imported here, only httpx.

A streamed `POST /v1/responses` whose connection breaks (or whose body ends without a terminal event, or that is
told to resume by a `router:stream.resume` event) is picked up again with `GET /v1/responses/{id}?stream=true
&starting_after=N`, after a bounded backoff; events already seen are dropped, so the caller sees one stream with
dense sequence numbers ending in its terminal event. Two ways in:

- `stream_events(base_url, body, api_key=...)`: an iterator of event dicts (`async_stream_events` for asyncio).
- `resumable_http_client(...)` / `async_resumable_http_client(...)`: an httpx client for the official `openai` SDK,
  `OpenAI(base_url=..., http_client=resumable_http_client())`, whose `responses.stream(...)` and
  `responses.create(stream=True)` then resume by themselves. Every other request passes through unchanged.

Against a server without resume support the stream works as a plain Open Responses stream, and a cut raises.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
# An opt-in event by which the router says: this connection ends here, resume to go on (a stream longer than one
# Lambda invocation).
RESUME_EVENT = "router:stream.resume"
# Errors that mean "the connection broke", as opposed to an answer the server gave.
_BROKEN = (httpx.TransportError,)


class StreamBroken(Exception):
    """The stream broke and could not be resumed (no response id yet, no resume support, or retries exhausted)."""


@dataclass
class Backoff:
    """Bounded exponential backoff with full jitter between reconnects."""

    max_retries: int = 8
    initial: float = 0.25
    cap: float = 8.0
    sleep: Any = field(default=time.sleep, repr=False)

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.cap, self.initial * 2.0 ** attempt))


class _Tracker:
    """Sans-IO: SSE bytes in, whole events out, with the position a resume starts from. Bytes are kept as they
    came so a transport wrapper can re-emit exactly what the server sent."""

    def __init__(self) -> None:
        self.buffer = b""
        self.response_id: str | None = None
        self.last_seq = -1
        self.terminal: dict[str, Any] | None = None
        self.resume_requested = False
        self.done = False  # `data: [DONE]` seen

    def feed(self, chunk: bytes) -> list[tuple[bytes, dict[str, Any] | None]]:
        """Complete frames in `chunk` (with the buffered rest), each as (raw bytes, event or None for [DONE] and
        comments). Frames already seen (by sequence number) are left out."""
        self.buffer += chunk.replace(b"\r\n", b"\n")
        out: list[tuple[bytes, dict[str, Any] | None]] = []
        while b"\n\n" in self.buffer:
            frame, self.buffer = self.buffer.split(b"\n\n", 1)
            data = b"\n".join(line[5:].lstrip(b" ") for line in frame.split(b"\n") if line.startswith(b"data:"))
            if not data:
                continue  # a comment (heartbeat) or an empty frame
            if data == b"[DONE]":
                self.done = True
                if self.terminal is not None:  # else the stream goes on after a resume: not the consumer's end
                    out.append((frame + b"\n\n", None))
                continue
            try:
                event = json.loads(data)
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            if event.get("type") == RESUME_EVENT:
                # The router's instruction to this client, not part of the response (its sequence_number is the
                # last event's, so it comes before the duplicate check).
                self.resume_requested = True
                continue
            seq = event.get("sequence_number")
            if isinstance(seq, int):
                if seq <= self.last_seq:
                    continue  # seen before the reconnect
                self.last_seq = seq
            if event.get("type") == "response.created" and isinstance(event.get("response"), dict):
                self.response_id = event["response"].get("id") or self.response_id
            if event.get("type") in TERMINAL:
                self.terminal = event
            out.append((frame + b"\n\n", event))
        return out

    @property
    def finished(self) -> bool:
        return self.terminal is not None

    def reconnected(self) -> None:
        """A new connection starts at a frame boundary: the half frame the old one was cut in goes."""
        self.buffer = b""
        self.resume_requested = False
        self.done = False

    def resume_url(self, base_url: str) -> str:
        return f"{base_url.rstrip('/')}/responses/{self.response_id}?stream=true&starting_after={self.last_seq}"


def _is_stream_post(request: httpx.Request) -> bool:
    if request.method != "POST" or not request.url.path.rstrip("/").endswith("/responses"):
        return False
    try:
        body = json.loads(request.content or b"{}")
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("stream") is True


def _base_of(request: httpx.Request) -> str:
    path = request.url.path.rstrip("/")
    return str(request.url.copy_with(path=path[: -len("/responses")], query=None))


def _resume_headers(request: httpx.Request) -> dict[str, str]:
    keep = ("authorization", "x-api-key", "api-key", "x-unbroken-recovery-events", "openai-organization")
    headers = {k: v for k, v in request.headers.items() if k.lower() in keep}
    # Raw bytes are re-emitted as they come: no content coding on the resumed stream.
    return {**headers, "accept": "text/event-stream", "accept-encoding": "identity"}


def _refused(response: httpx.Response) -> str:
    """Why a resume was refused (a 4xx: no such response here, a server without resume, a bad cursor...)."""
    try:
        error = response.json().get("error", {})
        detail = f": {error.get('message')}" if isinstance(error, dict) and error.get("message") else ""
    except (ValueError, AttributeError):
        detail = ""
    return f"the server cannot resume this stream (GET answered {response.status_code}{detail})"


# -- sync -------------------------------------------------------------------------------------------------------


class _ResumingStream(httpx.SyncByteStream):
    def __init__(self, transport: httpx.BaseTransport, request: httpx.Request, first: httpx.Response,
                 backoff: Backoff) -> None:
        self.transport = transport
        self.request = request
        self.response = first
        self.backoff = backoff
        self.tracker = _Tracker()

    def __iter__(self) -> Iterator[bytes]:
        tracker = self.tracker
        retries = 0
        while True:
            try:
                for chunk in self.response.iter_raw():
                    frames = tracker.feed(chunk)
                    if frames:
                        retries = 0
                        yield b"".join(raw for raw, _ in frames)
                    if tracker.done or tracker.resume_requested:
                        break
            except _BROKEN:
                pass
            finally:
                self.response.close()
            if tracker.finished:
                if not tracker.done:  # the terminal event came, the [DONE] line was cut: give the consumer its end
                    yield b"data: [DONE]\n\n"
                return
            if tracker.response_id is None:
                raise StreamBroken("the stream broke before the response id arrived; it cannot be resumed")
            if retries >= self.backoff.max_retries:
                raise StreamBroken(f"the stream broke and {retries} reconnects failed")
            if not tracker.resume_requested:
                self.backoff.sleep(self.backoff.delay(retries))
            retries += 1
            tracker.reconnected()
            self.response = self._reconnect()

    def _reconnect(self) -> httpx.Response:
        url = self.tracker.resume_url(_base_of(self.request))
        request = httpx.Request("GET", url, headers=_resume_headers(self.request))
        try:
            response = self.transport.handle_request(request)
        except _BROKEN:
            return httpx.Response(599, stream=httpx.ByteStream(b""))  # counts as one more break
        if 400 <= response.status_code < 500:
            response.read()
            response.close()
            raise StreamBroken(_refused(response))
        return response

    def close(self) -> None:
        self.response.close()


class ResumingTransport(httpx.BaseTransport):
    """An httpx transport that makes streamed `POST .../responses` resume by themselves."""

    def __init__(self, inner: httpx.BaseTransport | None = None, *, backoff: Backoff | None = None) -> None:
        self.inner = inner or httpx.HTTPTransport()
        self.backoff = backoff or Backoff()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if not _is_stream_post(request) or response.status_code != 200 \
                or "text/event-stream" not in response.headers.get("content-type", ""):
            return response
        return httpx.Response(200, headers=response.headers, request=request,
                              stream=_ResumingStream(self.inner, request, response, self.backoff))

    def close(self) -> None:
        self.inner.close()


def resumable_http_client(*, backoff: Backoff | None = None, transport: httpx.BaseTransport | None = None,
                          **client_options: Any) -> httpx.Client:
    """An `httpx.Client` for `openai.OpenAI(http_client=...)` whose response streams resume by themselves."""
    client_options.setdefault("timeout", httpx.Timeout(600.0, connect=10.0))
    return httpx.Client(transport=ResumingTransport(transport, backoff=backoff), **client_options)


def stream_events(base_url: str, body: dict[str, Any], *, api_key: str | None = None,
                  headers: dict[str, str] | None = None, idempotency_key: str | None = None,
                  backoff: Backoff | None = None, client: httpx.Client | None = None) -> Iterator[dict[str, Any]]:
    """The events of a streamed response, resumed across breaks. Raises `httpx.HTTPStatusError` for an error
    answered before the stream started (its body is the spec's error object) and `StreamBroken` when a break
    cannot be repaired."""
    own = client is None
    http = client or resumable_http_client(backoff=backoff)
    try:
        with http.stream("POST", f"{base_url.rstrip('/')}/responses", json={**body, "stream": True},
                         headers=_headers(api_key, headers, idempotency_key)) as response:
            if response.status_code != 200:
                response.read()
                response.raise_for_status()
            yield from _events(response.iter_bytes())
    finally:
        if own:
            http.close()


def _headers(api_key: str | None, headers: dict[str, str] | None, idempotency_key: str | None) -> dict[str, str]:
    out = dict(headers or {})
    if api_key is not None:
        out["authorization"] = f"Bearer {api_key}"
    if idempotency_key is not None:
        out["idempotency-key"] = idempotency_key
    return out


def _events(chunks: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    parser = _Tracker()
    for chunk in chunks:
        for _, event in parser.feed(chunk):
            if event is not None:
                yield event


# -- async ------------------------------------------------------------------------------------------------------


class _AsyncResumingStream(httpx.AsyncByteStream):
    def __init__(self, transport: httpx.AsyncBaseTransport, request: httpx.Request, first: httpx.Response,
                 backoff: Backoff) -> None:
        self.transport = transport
        self.request = request
        self.response = first
        self.backoff = backoff
        self.tracker = _Tracker()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        import asyncio

        tracker = self.tracker
        retries = 0
        while True:
            try:
                async for chunk in self.response.aiter_raw():
                    frames = tracker.feed(chunk)
                    if frames:
                        retries = 0
                        yield b"".join(raw for raw, _ in frames)
                    if tracker.done or tracker.resume_requested:
                        break
            except _BROKEN:
                pass
            finally:
                await self.response.aclose()
            if tracker.finished:
                if not tracker.done:
                    yield b"data: [DONE]\n\n"
                return
            if tracker.response_id is None:
                raise StreamBroken("the stream broke before the response id arrived; it cannot be resumed")
            if retries >= self.backoff.max_retries:
                raise StreamBroken(f"the stream broke and {retries} reconnects failed")
            if not tracker.resume_requested:
                await asyncio.sleep(self.backoff.delay(retries))
            retries += 1
            tracker.reconnected()
            self.response = await self._reconnect()

    async def _reconnect(self) -> httpx.Response:
        url = self.tracker.resume_url(_base_of(self.request))
        request = httpx.Request("GET", url, headers=_resume_headers(self.request))
        try:
            response = await self.transport.handle_async_request(request)
        except _BROKEN:
            return httpx.Response(599, stream=httpx.ByteStream(b""))
        if 400 <= response.status_code < 500:
            await response.aread()
            await response.aclose()
            raise StreamBroken(_refused(response))
        return response

    async def aclose(self) -> None:
        await self.response.aclose()


class AsyncResumingTransport(httpx.AsyncBaseTransport):
    """`ResumingTransport` for `httpx.AsyncClient` (and `openai.AsyncOpenAI`)."""

    def __init__(self, inner: httpx.AsyncBaseTransport | None = None, *, backoff: Backoff | None = None) -> None:
        self.inner = inner or httpx.AsyncHTTPTransport()
        self.backoff = backoff or Backoff()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if not _is_stream_post(request) or response.status_code != 200 \
                or "text/event-stream" not in response.headers.get("content-type", ""):
            return response
        return httpx.Response(200, headers=response.headers, request=request,
                              stream=_AsyncResumingStream(self.inner, request, response, self.backoff))

    async def aclose(self) -> None:
        await self.inner.aclose()


def async_resumable_http_client(*, backoff: Backoff | None = None,
                                transport: httpx.AsyncBaseTransport | None = None,
                                **client_options: Any) -> httpx.AsyncClient:
    """An `httpx.AsyncClient` for `openai.AsyncOpenAI(http_client=...)` whose response streams resume."""
    client_options.setdefault("timeout", httpx.Timeout(600.0, connect=10.0))
    return httpx.AsyncClient(transport=AsyncResumingTransport(transport, backoff=backoff), **client_options)


async def async_stream_events(base_url: str, body: dict[str, Any], *, api_key: str | None = None,
                              headers: dict[str, str] | None = None, idempotency_key: str | None = None,
                              backoff: Backoff | None = None,
                              client: httpx.AsyncClient | None = None) -> AsyncIterator[dict[str, Any]]:
    """`stream_events` for asyncio."""
    own = client is None
    http = client or async_resumable_http_client(backoff=backoff)
    try:
        async with http.stream("POST", f"{base_url.rstrip('/')}/responses", json={**body, "stream": True},
                               headers=_headers(api_key, headers, idempotency_key)) as response:
            if response.status_code != 200:
                await response.aread()
                response.raise_for_status()
            parser = _Tracker()
            async for chunk in response.aiter_bytes():
                for _, event in parser.feed(chunk):
                    if event is not None:
                        yield event
    finally:
        if own:
            await http.aclose()
