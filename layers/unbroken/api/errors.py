"""The one place a `Failure` becomes HTTP: its status, its headers and the spec's error object
`{"error": {message, type, param, code}}`. Every error the router answers goes through `error_response`."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from unbroken.errors import Failure, FailureKind

STATUS: dict[FailureKind, int] = {
    "invalid_request": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "conflict": 409,
    "too_large": 413,
    "rate_limited": 429,
    "internal": 500,
    "upstream_error": 502,
    "unavailable": 503,
    "deadline": 504,
}

# The spec's `type` for each kind, and the `code` when the failure names none.
_TYPE: dict[FailureKind, str] = {"rate_limited": "too_many_requests"}
_DEFAULT_CODE: dict[FailureKind, str] = {
    "invalid_request": "invalid_request", "unauthorized": "invalid_api_key", "forbidden": "forbidden",
    "not_found": "not_found", "conflict": "conflict", "too_large": "request_too_large",
    "rate_limited": "rate_limit_exceeded", "internal": "server_error", "upstream_error": "upstream_error",
    "unavailable": "upstream_unavailable", "deadline": "stream_deadline",
}


def error_type(kind: FailureKind) -> str:
    if kind in _TYPE:
        return _TYPE[kind]
    return "invalid_request_error" if STATUS[kind] < 500 else "server_error"


def error_body(failure: Failure) -> dict[str, Any]:
    return {"error": {"message": failure.message, "type": error_type(failure.kind), "param": failure.param,
                      "code": failure.code or _DEFAULT_CODE[failure.kind]}}


def error_headers(failure: Failure) -> dict[str, str]:
    headers: dict[str, str] = {}
    if failure.retry_after is not None:
        headers["retry-after"] = str(max(1, round(failure.retry_after)))
    if failure.kind == "unauthorized":
        headers["www-authenticate"] = "Bearer"
    return headers


def error_response(failure: Failure, *, status: int | None = None) -> JSONResponse:
    """`status` overrides the kind's own for the few purely HTTP answers (405)."""
    return JSONResponse(error_body(failure), status_code=status or STATUS[failure.kind],
                        headers=error_headers(failure))
