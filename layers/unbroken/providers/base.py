"""What every provider adapter is: the interface, its capability flags and its one error type.

An adapter maps a `GenerationRequest` onto one wire protocol and the native stream back onto IR deltas. It raises
`ProviderError` for every failure, before or during the stream, with a `kind` the attempt loop can act on without
knowing which provider raised it.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from unbroken.config import Deployment
from unbroken.ir import Delta, GenerationRequest

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("unbroken.providers")

ErrorKind = Literal[
    "rate_limited",  # 429 / throttling: retry after a delay, or fail over
    "overloaded",  # 503 / 529 / UNAVAILABLE
    "server_error",  # 5xx, provider-side exception mid-stream
    "timeout",  # no first byte / no token within the deployment's limits
    "connection",  # connect refused, reset, truncated body
    "malformed",  # the upstream sent something that is not its protocol
    "truncated",  # the stream ended without the provider's end marker
    "auth",  # 401 / 403: this deployment's credentials are bad; the next deployment may work
    "not_found",  # 404: the deployment's model does not exist there
    "bad_request",  # 400 that no deployment would accept
    "context_length",  # input too long for this deployment's window
    "content_filter",  # the provider refused on policy grounds
    "prefill_rejected",  # the model rejects a trailing assistant message
    "quota",  # out of credit (insufficient_quota, 402): not retryable on this deployment
]

# Kinds worth another attempt on the same deployment (after backoff); the rest move on or stop.
RETRY_SAME_DEPLOYMENT: frozenset[str] = frozenset(
    {"rate_limited", "overloaded", "server_error", "connection", "malformed", "truncated"}
)
# Kinds where no other deployment would do better: the error goes back to the caller.
FATAL_FOR_REQUEST: frozenset[str] = frozenset({"bad_request", "content_filter"})


class ProviderError(Exception):
    """A failure talking to an upstream. `status` is the upstream HTTP status when there was one; `retry_after`
    is in seconds, from `retry-after-ms` / `retry-after` / the provider's own retry hint."""

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        code: str | None = None,
        mid_stream: bool = False,
    ) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind
        self.message = message
        self.status = status
        self.retry_after = retry_after
        self.code = code
        self.mid_stream = mid_stream

    def __repr__(self) -> str:
        return f"ProviderError({self.kind!r}, status={self.status}, code={self.code!r})"


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a deployment can do, as far as the router needs to know.

    literal_continuation: a trailing assistant message is continued exactly (prefill); otherwise the router
        sends a continue-instruction and strips the overlap.
    image_urls: `https` image URLs can be passed through; otherwise only data URLs are accepted.
    native_json_schema: `text.format` json_schema is enforced natively; otherwise a forced tool is used.
    """

    literal_continuation: bool = False
    image_urls: bool = True
    native_json_schema: bool = True


# Told once an adapter's upstream request is out (written to its socket, or handed to the thread that sends it), by
# whoever waits for that in this context: a journaled response's run goes first up to there, so that its request
# does not wait for the work its handler does meanwhile. Adapters call `request_written()`; a context without a
# listener costs them a lookup.
REQUEST_WRITTEN: ContextVar[Callable[[], None] | None] = ContextVar("request_written", default=None)


def request_written() -> None:
    """This context's upstream request is out (see `REQUEST_WRITTEN`)."""
    listener = REQUEST_WRITTEN.get()
    if listener is not None:
        listener()


class Provider(ABC):
    """One adapter instance serves one deployment. `http` is the process-wide client (connection pooling);
    adapters that use another transport (boto3) ignore it."""

    name: ClassVar[str]

    def __init__(self, deployment: Deployment, http: httpx.AsyncClient) -> None:
        self.deployment = deployment
        self.http = http

    # What the provider can do by default; a deployment's `options` may override each flag (documented per provider).
    default_capabilities: ClassVar[Capabilities] = Capabilities()

    @property
    def capabilities(self) -> Capabilities:
        d, opts = self.default_capabilities, self.deployment.options
        return Capabilities(
            literal_continuation=d.literal_continuation if opts.literal_continuation is None
            else opts.literal_continuation,
            image_urls=d.image_urls if opts.image_urls is None else opts.image_urls,
            native_json_schema=d.native_json_schema if opts.native_json_schema is None
            else bool(opts.native_json_schema),
        )

    @abstractmethod
    def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Stream the answer as IR deltas. Raise `ProviderError` on any failure. The last delta of a healthy
        stream is a `Finish` (possibly followed by `Usage`); a stream that ends without one raises
        `ProviderError("truncated")`. Call `request_written()` once the request is out."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release anything the adapter holds beyond the shared HTTP client."""


def error_from_status(status: int, message: str, *, retry_after: float | None = None,
                      code: str | None = None) -> ProviderError:
    """Classify an HTTP error status the way most providers mean it. Adapters refine it from the body
    (context length, content filter, quota) before raising."""
    kind: ErrorKind
    if status == 429:
        kind = "rate_limited"
    elif status in (401, 403):
        kind = "auth"
    elif status == 404:
        kind = "not_found"
    elif status == 402:
        kind = "quota"
    elif status in (408, 504):
        kind = "timeout"
    elif status in (503, 529):
        kind = "overloaded"
    elif status >= 500 or status == 409:
        kind = "server_error"
    elif status == 413:
        kind = "context_length"
    else:
        kind = "bad_request"
    return ProviderError(kind, message, status=status, retry_after=retry_after, code=code)


def parse_retry_after(headers: httpx.Headers | dict[str, str]) -> float | None:
    """Seconds to wait from `retry-after-ms` (preferred) or `retry-after` (seconds or an HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        from email.utils import parsedate_to_datetime
        from time import time

        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time())
        except (TypeError, ValueError):
            return None
