"""What every answer carries at the edge of the app, as plain ASGI (no copy of streamed chunks): an `x-request-id`,
and for a browser origin the config allows (`server.cors`) the CORS headers; CORS preflights are answered here.

Not Starlette's CORSMiddleware: it sends `Access-Control-Expose-Headers` (and `-Allow-Credentials`) to every
origin, refused ones included, and answers a refused preflight with a plain-text 400. Here a refused origin gets no
CORS header at all, and a refused preflight the spec's error object (403 for the origin, 400 for a method or header).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Mapping

from unbroken import logs
from unbroken.api.errors import STATUS, error_body, error_headers
from unbroken.api.guard import ASGIApp, Message, Receive, Scope, Send
from unbroken.api.identity import request_context
from unbroken.config import CorsSettings
from unbroken.errors import Failure, invalid

# Request headers a browser client of the router may send, whatever the config adds (`allow_headers`).
ROUTER_REQUEST_HEADERS = ("Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID",
                          "X-Unbroken-Recovery-Events", "X-Unbroken-Policy", "X-Unbroken-Explain", "X-Api-Key",
                          "Api-Key")
# Response headers a browser script may read (beyond the safelisted ones such as Content-Type). The routing and spend
# work sets the two X-Unbroken ones; list every new response header a client needs here.
EXPOSED_HEADERS = ("X-Request-Id", "Retry-After", "X-Unbroken-Deployment", "X-Unbroken-Cost-USD")
ALLOWED_METHODS = ("GET", "POST", "DELETE")
# Always allowed by browsers without a preflight; listed so that a preflight naming them passes.
_SAFELISTED = ("Accept", "Accept-Language", "Content-Language")

REQUEST_ID_HEADER = b"x-request-id"
access = logging.getLogger("unbroken.access")
_VARY_PREFLIGHT = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"


def new_request_id() -> str:
    return "req_" + uuid.uuid4().hex


class Edge:
    """`lambda_env` as for `create_app`: inside Lambda the request id is API Gateway's (`requestContext.requestId`,
    the id in API Gateway's own logs)."""

    def __init__(self, app: ASGIApp, *, cors: CorsSettings, lambda_env: Mapping[str, str],
                 access_log: bool = False) -> None:
        self.app = app
        self.access_log = access_log
        self.lambda_env = lambda_env
        self.cors_on = cors.enabled
        self.any_origin = "*" in cors.allow_origins
        self.origins = frozenset(o for o in cors.allow_origins if o != "*")
        self.any_header = "*" in cors.allow_headers
        names = [*ROUTER_REQUEST_HEADERS, *_SAFELISTED, *(h for h in cors.allow_headers if h != "*")]
        self.allowed_headers = frozenset(h.lower() for h in names)
        self.allow_headers_value = ", ".join(dict.fromkeys(h for h in names if h.lower() not in
                                                           {s.lower() for s in _SAFELISTED}))
        self.credentials = cors.allow_credentials
        self.max_age = str(cors.max_age_seconds)
        # "*" is literal only without credentials; with them (refused by the config) or for listed origins, the
        # request's origin is echoed and caches must key on it.
        self.star = self.any_origin and not self.credentials

    def allowed(self, origin: str) -> bool:
        return self.any_origin or origin in self.origins

    def _request_id(self, headers: Mapping[str, str]) -> str:
        ctx = request_context(headers, self.lambda_env)
        rid = ctx.get("requestId") if ctx else None
        return rid if isinstance(rid, str) and rid else new_request_id()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with logs.request_context() as fields:
            started = time.monotonic()
            status = {"code": 0}

            async def observed_send(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status["code"] = int(message.get("status") or 0)
                await send(message)

            try:
                await self._http(scope, receive, observed_send, fields)
            finally:
                if self.access_log:
                    # No query string (it may carry a key) and no bodies: what was asked, how it went, for whom.
                    access.info("request", extra={
                        "method": scope.get("method"), "path": scope.get("path"), "status": status["code"] or None,
                        "duration_ms": round((time.monotonic() - started) * 1000, 1),
                        "response_id": fields.get("correlation_id")})

    async def _http(self, scope: Scope, receive: Receive, send: Send, fields: dict[str, object]) -> None:
        headers = _headers(scope)
        request_id_text = self._request_id(headers)
        fields["request_id"] = request_id_text
        request_id = request_id_text.encode("latin-1", "replace")
        origin = headers.get("origin") if self.cors_on else None
        if origin is not None and scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            await self._preflight(origin, headers, request_id, send)
            return
        extra: list[tuple[bytes, bytes]] = []
        if origin is not None:
            extra.append((b"vary", b"Origin"))
            if self.allowed(origin):
                extra += self._cors_headers(origin)
                extra.append((b"access-control-expose-headers", ", ".join(EXPOSED_HEADERS).encode()))

        async def edge_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                out = list(message.get("headers") or [])
                if not any(k.lower() == REQUEST_ID_HEADER for k, _ in out):
                    out.append((REQUEST_ID_HEADER, request_id))
                message["headers"] = out + extra
            await send(message)

        await self.app(scope, receive, edge_send)

    def _cors_headers(self, origin: str) -> list[tuple[bytes, bytes]]:
        out = [(b"access-control-allow-origin", b"*" if self.star else origin.encode("latin-1", "replace"))]
        if self.credentials:
            out.append((b"access-control-allow-credentials", b"true"))
        return out

    async def _preflight(self, origin: str, headers: Mapping[str, str], request_id: bytes, send: Send) -> None:
        base = [(b"vary", _VARY_PREFLIGHT.encode()), (REQUEST_ID_HEADER, request_id)]
        if not self.allowed(origin):
            await _send_failure(send, Failure("forbidden", f"The origin {origin} may not call this API "
                                              "(server.cors.allow_origins).", code="cors_origin_not_allowed"), base)
            return
        cors = self._cors_headers(origin)
        method = headers["access-control-request-method"].strip().upper()
        if method not in ALLOWED_METHODS:
            await _send_failure(send, invalid(f"The method {method} is not allowed here.",
                                              param="Access-Control-Request-Method",
                                              code="cors_method_not_allowed"), base + cors)
            return
        requested = headers.get("access-control-request-headers", "")
        names = [h.strip() for h in requested.split(",") if h.strip()]
        if not self.any_header:
            refused = [h for h in names if h.lower() not in self.allowed_headers]
            if refused:
                await _send_failure(send, invalid(f"The request header(s) {', '.join(refused)} are not allowed "
                                                  "(server.cors.allow_headers).",
                                                  param="Access-Control-Request-Headers",
                                                  code="cors_header_not_allowed"), base + cors)
                return
        allow_headers = ", ".join(names) if self.any_header else self.allow_headers_value
        out = base + cors + [
            (b"access-control-allow-methods", ", ".join(ALLOWED_METHODS).encode()),
            (b"access-control-allow-headers", allow_headers.encode("latin-1", "replace")),
            (b"access-control-max-age", self.max_age.encode()),
        ]
        await send({"type": "http.response.start", "status": 204, "headers": out})
        await send({"type": "http.response.body", "body": b""})


def _headers(scope: Scope) -> dict[str, str]:
    """The request's headers, lower-cased names (ASGI already lower-cases them); the last of repeated ones."""
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers") or []}


async def _send_failure(send: Send, failure: Failure, headers: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps(error_body(failure)).encode()
    out = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    out += [(k.encode(), v.encode()) for k, v in error_headers(failure).items()]
    await send({"type": "http.response.start", "status": STATUS[failure.kind], "headers": out})
    await send({"type": "http.response.body", "body": body})
