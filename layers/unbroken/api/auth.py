"""Who is calling: the API key (Authorization: Bearer, or x-api-key) maps to a tenant. Keys are compared as SHA-256
digests in constant time (config.tenant_for_key); a failure never says which part was wrong."""

from __future__ import annotations

from fastapi import Request

from unbroken.config import Config
from unbroken.errors import Failure

ANONYMOUS = "anonymous"


def presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return None
    return request.headers.get("x-api-key") or request.headers.get("api-key")


def authenticate(request: Request) -> str:
    """FastAPI dependency: the caller's tenant, or a 401."""
    config: Config = request.app.state.runtime.config
    key = presented_key(request)
    if key is None:
        if config.allow_anonymous:
            return ANONYMOUS
        raise Failure("unauthorized", "Missing API key: send it as 'Authorization: Bearer <key>'.",
                      code="missing_api_key")
    tenant = config.tenant_for_key(key)
    if tenant is None:
        raise Failure("unauthorized", "Incorrect API key provided.", code="invalid_api_key")
    return tenant
