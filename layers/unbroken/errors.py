"""The one failure type a request or a generation ends with, below the HTTP layer.

Every layer under `api/` says what went wrong with a `Failure`: its `kind` is what the caller did or met (a bad
request, a missing response, every upstream down...), `code` and `param` are what the spec's error object carries.
Only `api/errors.py` turns a kind into an HTTP status; nothing here knows HTTP.
"""

from __future__ import annotations

from typing import Literal

FailureKind = Literal[
    "invalid_request",  # the request itself is wrong: no retry of it will work
    "unauthorized",  # no credentials, or credentials that are not valid
    "forbidden",  # valid credentials that may not do this
    "not_found",  # no such model, response or route for this caller
    "conflict",  # the request collides with the state of a stored response
    "too_large",  # the request is larger than the router accepts
    "rate_limited",  # every deployment (or the caller's own limit) says: later
    "unavailable",  # nothing can serve it now (no deployment left, all overloaded or timing out)
    "deadline",  # the response ran out of time before it could be finished
    "upstream_error",  # the upstreams failed in a way another try did not fix
    "internal",  # the router itself failed: a bug or a broken dependency (the store)
]


class Failure(Exception):
    """A failure with what the spec's error object needs. `retry_after` (seconds) is a hint for the caller."""

    def __init__(self, kind: FailureKind, message: str, *, code: str | None = None, param: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind: FailureKind = kind
        self.message = message
        self.code = code
        self.param = param
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"Failure({self.kind!r}, code={self.code!r}, param={self.param!r})"


def invalid(message: str, *, param: str | None = None, code: str | None = None) -> Failure:
    """The common case: a 400-class complaint about one parameter."""
    return Failure("invalid_request", message, param=param, code=code)
