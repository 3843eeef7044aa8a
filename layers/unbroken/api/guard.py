"""The outermost layer of the app, as plain ASGI: the request body limit, and a last line of defence for bugs.

Pure ASGI rather than Starlette's `BaseHTTPMiddleware`, which would copy every streamed chunk through a memory
stream. Starlette's own error middleware answers an unhandled exception with a 500 but then re-raises it, and
uvicorn closes a connection whose app raised: the client's next request on that kept-alive connection is reset.
Here an unhandled exception becomes the spec's 500 error object (or, once a response has started, the end of it)
and is never re-raised, so the connection survives.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from unbroken.api.errors import STATUS, error_body, error_headers
from unbroken.errors import Failure, invalid

log = logging.getLogger("unbroken.api")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class Guard:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.limit = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            receive_body = await self._limited(scope, receive, tracking_send)
            if receive_body is None:
                return
            await self.app(scope, receive_body, tracking_send)
        except Exception as exc:
            log.error("unhandled error on %s %s: %s", scope.get("method"), scope.get("path"), type(exc).__name__,
                      exc_info=exc)
            if not started:
                await _send_failure(send, Failure("internal", "The router failed on this request.",
                                                  code="server_error"))
            # A response that had started simply ends here: its body is what the client got.

    async def _limited(self, scope: Scope, receive: Receive, send: Send) -> Receive | None:
        """`receive` for the app, or None when the body is too large (answered here, 413). A body without a
        Content-Length is counted as it is read, and replayed to the app."""
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.limit
            except ValueError:
                await _send_failure(send, invalid("Invalid Content-Length header.",
                                                  param="content-length"))
                return None
            if too_big:
                await _send_failure(send, self._too_large())
                return None
            return receive
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return receive
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.limit:
                await _send_failure(send, self._too_large())
                return None
            if not message.get("more_body", False):
                break
        replay = iter(messages)

        async def replaying() -> Message:
            return next(replay, None) or await receive()

        return replaying

    def _too_large(self) -> Failure:
        return Failure("too_large", f"The request body is larger than {self.limit} bytes.")


async def _send_failure(send: Send, failure: Failure) -> None:
    body = json.dumps(error_body(failure)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in error_headers(failure).items()]
    await send({"type": "http.response.start", "status": STATUS[failure.kind], "headers": headers})
    await send({"type": "http.response.body", "body": body})
