"""Every error the router returns is the spec's error object `{"error": {message, type, param, code}}` with the
right HTTP status; these helpers build them and map upstream failures onto them."""

from __future__ import annotations

from typing import Any

from unbroken.providers.base import ProviderError

_DEFAULT_TYPE = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
                 404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
                 422: "invalid_request_error", 429: "too_many_requests"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 type_: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or {400: "invalid_request", 401: "invalid_api_key", 404: "not_found", 409: "conflict",
                             413: "request_too_large", 429: "rate_limit_exceeded"}.get(status, "server_error")
        self.param = param
        self.type = type_ or _DEFAULT_TYPE.get(status, "server_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def from_provider_error(err: ProviderError | None, *, attempts: int) -> APIError:
    """The HTTP error for a request that got no output from any deployment."""
    if err is None:
        return APIError(503, "No deployment is available for this model.", code="upstream_unavailable")
    if err.kind in ("rate_limited", "quota"):
        headers = {}
        if err.retry_after is not None:
            headers["retry-after"] = str(max(1, round(err.retry_after)))
        return APIError(429, f"All deployments are rate limited ({attempts} attempts): {err.message}",
                        code="rate_limit_exceeded", headers=headers)
    if err.kind == "bad_request":
        return APIError(400, f"The upstream rejected the request: {err.message}", code="invalid_request")
    if err.kind == "context_length":
        return APIError(400, f"The input is too long for every deployment of this model: {err.message}",
                        code="context_length_exceeded", param="input")
    if err.kind == "content_filter":
        return APIError(400, f"The request was refused by the provider's content policy: {err.message}",
                        code="content_filter")
    if err.kind in ("overloaded", "timeout"):
        return APIError(503, f"Upstream unavailable after {attempts} attempts: {err.message}",
                        code="upstream_unavailable")
    return APIError(502, f"Upstream failed after {attempts} attempts: {err.message}", code="upstream_error")
