"""Who is calling: a tenant, from the first of these that applies.

1. Behind API Gateway with a Cognito authorizer (`auth.gateway_tenant_claim` set, and the process inside Lambda under
   the Web Adapter): the verified claims API Gateway put in the request context; tenant `jwt:<claim>`.
2. An API key (Authorization: Bearer, or x-api-key) mapped to its tenant. Keys are compared as SHA-256 digests in
   constant time (config.tenant_for_key); a failure never says which part was wrong.
3. With `auth.jwt` configured, a bearer token shaped like a JWT that is no key: verified by the router itself
   (api/tokens.py); tenant `jwt:<claim>`.
"""

from __future__ import annotations

import re
from typing import Protocol

from fastapi import Request

from unbroken import logs
from unbroken.api.identity import authorizer_claims
from unbroken.config import Config
from unbroken.errors import Failure

ANONYMOUS = "anonymous"
# A verified token's tenant is this + its tenant claim: never equal to an API key's tenant unless configured so.
JWT_TENANT_PREFIX = "jwt:"
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


class TokenVerifier(Protocol):
    """`api/tokens.JwtVerifier`, built by create_app only when `auth.jwt` is configured."""

    def tenant(self, token: str) -> str: ...


def looks_like_jwt(token: str) -> bool:
    """Three dot-separated base64url parts (the JWS compact form)."""
    return _JWT_SHAPE.fullmatch(token) is not None


def tenant_of_claim(value: object) -> str | None:
    return JWT_TENANT_PREFIX + value if isinstance(value, str) and value else None


def presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return None
    return request.headers.get("x-api-key") or request.headers.get("api-key")


def _gateway_tenant(request: Request, claim: str) -> str | None:
    claims = authorizer_claims(request.headers, request.app.state.lambda_env)
    return tenant_of_claim(claims.get(claim)) if claims else None


def authenticate(request: Request) -> str:
    """FastAPI dependency: the caller's tenant, or a 401. A sync function, so FastAPI runs it in its thread pool:
    fetching a JWKS never blocks the event loop. The tenant is bound to the request's log lines."""
    tenant = _tenant(request)
    logs.bind(tenant=tenant)
    return tenant


def _tenant(request: Request) -> str:
    config: Config = request.app.state.runtime.config
    if config.auth.gateway_tenant_claim is not None:
        tenant = _gateway_tenant(request, config.auth.gateway_tenant_claim)
        if tenant is not None:
            return tenant
    key = presented_key(request)
    if key is None:
        if config.allow_anonymous:
            return ANONYMOUS
        raise Failure("unauthorized", "Missing API key: send it as 'Authorization: Bearer <key>'.",
                      code="missing_api_key")
    tenant = config.tenant_for_key(key)
    if tenant is not None:
        return tenant
    verifier: TokenVerifier | None = request.app.state.jwt_verifier
    if verifier is not None and looks_like_jwt(key):
        return verifier.tenant(key)
    raise Failure("unauthorized", "Incorrect API key provided.", code="invalid_api_key")
