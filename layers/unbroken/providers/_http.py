"""Shared HTTP plumbing for the adapters that speak SSE over httpx: open a stream, turn HTTP and transport failures
into `ProviderError`s, and iterate parsed SSE events (httpx-sse does the parsing)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
from httpx_sse import EventSource, ServerSentEvent, SSEError

from unbroken.providers.base import REQUEST_WRITTEN, ProviderError, error_from_status, parse_retry_after

# Connect quickly; reads are bounded by the attempt loop's first-token and stall timeouts, not here.
DEFAULT_TIMEOUT = httpx.Timeout(connect=10.0, read=None, write=30.0, pool=10.0)
MAX_ERROR_BODY = 64 * 1024
# After an upstream's end marker, what `_finish_body` reads at most of what is left before it gives the connection up.
FINISH_BODY_SECONDS = 0.05
FINISH_BODY_EVENTS = 16

# Refines an HTTP error into a more specific ProviderError from its (parsed) body; returns None to keep the default.
ErrorRefiner = Callable[[int, Any, ProviderError], ProviderError | None]


def _error_message(body: Any, fallback: str) -> tuple[str, str | None]:
    """(message, code) from the common error body shapes: {"error": {"message", "code"|"type"}}, {"message"}."""
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            msg = err.get("message") or fallback
            code = err.get("code") or err.get("type") or err.get("status")
            return str(msg), (str(code) if code is not None else None)
        if isinstance(err, str):
            return err, None
    return fallback, None


async def raise_for_status(response: httpx.Response, refine: ErrorRefiner | None = None) -> None:
    if response.status_code < 400:
        return
    raw = b""
    try:
        async for chunk in response.aiter_bytes():
            raw += chunk
            if len(raw) > MAX_ERROR_BODY:
                break
    except httpx.HTTPError:
        pass
    try:
        body: Any = json.loads(raw)
    except ValueError:
        body = raw.decode("utf-8", "replace")
    message, code = _error_message(body, f"upstream returned HTTP {response.status_code}")
    err = error_from_status(response.status_code, message, retry_after=parse_retry_after(response.headers),
                            code=code)
    if refine is not None:
        err = refine(response.status_code, body, err) or err
    raise err


def transport_error(exc: httpx.HTTPError, *, mid_stream: bool) -> ProviderError:
    if isinstance(exc, httpx.TimeoutException):
        return ProviderError("timeout", f"upstream timed out: {type(exc).__name__}", mid_stream=mid_stream)
    return ProviderError("connection", f"upstream connection failed: {type(exc).__name__}", mid_stream=mid_stream)


@asynccontextmanager
async def open_stream(
    http: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    headers: dict[str, str],
    json_body: Any = None,
    params: dict[str, str] | None = None,
    refine: ErrorRefiner | None = None,
    timeout: httpx.Timeout = DEFAULT_TIMEOUT,
) -> AsyncIterator[httpx.Response]:
    """An upstream response whose status is known to be < 400; every failure is a `ProviderError`. A listener
    for `REQUEST_WRITTEN` is told when the request's body has been written (httpcore's `trace` extension)."""
    listener = REQUEST_WRITTEN.get()
    extensions = None if listener is None else {"trace": _tell_when_written(listener)}
    try:
        async with http.stream(method, url, headers=headers, json=json_body, params=params,
                               timeout=timeout, extensions=extensions) as response:
            await raise_for_status(response, refine)
            yield response
    except httpx.HTTPError as exc:
        raise transport_error(exc, mid_stream=False) from None


def _tell_when_written(listener: Callable[[], None]) -> Callable[[str, dict[str, Any]], Any]:
    async def trace(event: str, info: dict[str, Any]) -> None:
        if event.endswith(".send_request_body.complete"):  # http11. or http2.
            listener()

    return trace


async def iter_sse(response: httpx.Response) -> AsyncGenerator[ServerSentEvent, None]:
    """Parsed SSE events of a streaming response; a broken connection is a mid-stream `ProviderError`."""
    try:
        # aclosing: a reader that stops early closes the parser on this loop, not later in the garbage collector.
        async with contextlib.aclosing(EventSource(response).aiter_sse()) as events:
            async for event in events:
                yield event
    except SSEError:
        # 200 but not an event stream: some proxies answer errors this way. Surface the body's message.
        ctype = response.headers.get("content-type", "")
        raise ProviderError("malformed", f"upstream answered 200 with content-type {ctype!r}, not SSE") from None
    except httpx.HTTPError as exc:
        raise transport_error(exc, mid_stream=True) from None


@asynccontextmanager
async def open_sse(http: httpx.AsyncClient, method: str, url: str,
                   **options: Any) -> AsyncIterator[AsyncGenerator[ServerSentEvent, None]]:
    """`open_stream(http, method, url, **options)`'s parsed SSE events (`iter_sse`), for an adapter to read up to its
    stream's end marker. Left without an error, the rest of the body is read (`_finish_body`), so the connection
    goes back to the pool."""
    async with open_stream(http, method, url, **options) as response:
        events = iter_sse(response)
        yield events
        await _finish_body(events)


async def _finish_body(events: AsyncGenerator[ServerSentEvent, None]) -> None:
    """Read the rest of a stream whose end marker (`[DONE]`, `message_stop`, `response.completed`) the adapter has
    seen: the bytes after it (the chunked body's last chunk) are what lets httpcore put the connection back in the
    pool. Closed unread, the connection is dropped, and the next request pays a new TCP (and TLS) handshake
    before its first token. Bounded: an upstream that goes on after its marker is cut, as before."""
    try:
        async with asyncio.timeout(FINISH_BODY_SECONDS):
            for _ in range(FINISH_BODY_EVENTS):
                await anext(events)
    except (StopAsyncIteration, TimeoutError, ProviderError):
        pass
    finally:
        await events.aclose()


def parse_json(data: str) -> Any:
    """JSON of one SSE data field; a malformed chunk is a retryable `malformed` failure."""
    try:
        return json.loads(data)
    except ValueError:
        raise ProviderError("malformed", "upstream sent a chunk that is not valid JSON", mid_stream=True) from None
