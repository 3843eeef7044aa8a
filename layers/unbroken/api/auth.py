"""Who is calling: a `Principal` (tenant, key id, and for a store key its record), from the first of these that
applies.

1. Behind API Gateway with a Cognito authorizer (`auth.gateway_tenant_claim` set, and the process inside Lambda under
   the Web Adapter): the verified claims API Gateway put in the request context; tenant `jwt:<claim>`, no key id.
2. An API key (Authorization: Bearer, or x-api-key):
   a. a YAML key (`api_keys`), exactly as before: compared as SHA-256 digests in constant time
      (config.key_for); key id its `name`, else `yaml-<position>`;
   b. else, a store key (its secret starts `sk-ub-`): looked up by its digest through the per-process cache
      (durable/keys.py, answers at most `auth.key_cache_seconds` old, found or not). Revoked or expired: 401.
   A failure never says which part of a key was wrong; a store key that was revoked or expired says so.
3. With `auth.jwt` configured, a bearer token shaped like a JWT that is no key: verified by the router itself
   (api/tokens.py, in a thread: fetching a JWKS never blocks the event loop); tenant `jwt:<claim>`, no key id.

`authenticate` gives the tenant (what most routes need), `authenticate_principal` the whole principal; both are
FastAPI dependencies and FastAPI resolves the principal once per request. Whether the principal may use a model,
and its budgets and rate limits, are checked after the body is read (durable/limits.admit).
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Annotated, Protocol

from fastapi import Depends, Request

from unbroken import logs
from unbroken.api.identity import authorizer_claims
from unbroken.config import Config
from unbroken.durable.keys import SECRET_PREFIX, Principal
from unbroken.durable.runtime import Runtime
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


async def authenticate_principal(request: Request) -> Principal:
    """FastAPI dependency: the caller, or a 401. The tenant and key id are bound to the request's log lines."""
    principal = await _principal(request)
    logs.bind(tenant=principal.tenant, **({"key_id": principal.key_id} if principal.key_id else {}))
    return principal


async def authenticate(principal: Annotated[Principal, Depends(authenticate_principal)]) -> str:
    """FastAPI dependency: the caller's tenant."""
    return principal.tenant


async def _principal(request: Request) -> Principal:
    runtime: Runtime = request.app.state.runtime
    config: Config = runtime.config
    if config.auth.gateway_tenant_claim is not None:
        tenant = _gateway_tenant(request, config.auth.gateway_tenant_claim)
        if tenant is not None:
            return Principal(tenant)
    key = presented_key(request)
    if key is None:
        if config.allow_anonymous:
            return Principal(ANONYMOUS)
        raise Failure("unauthorized", "Missing API key: send it as 'Authorization: Bearer <key>'.",
                      code="missing_api_key")
    found = config.key_for(key)
    if found is not None:
        return Principal(found[1].tenant, found[0])
    if key.startswith(SECRET_PREFIX) and config.auth.store_keys and runtime.accounts is not None:
        stored = await runtime.accounts.key_for_secret(key)
        if stored is not None:
            if stored.revoked:
                raise Failure("unauthorized", "This API key was revoked.", code="api_key_revoked")
            if stored.expired(time.time()):
                raise Failure("unauthorized", "This API key has expired.", code="api_key_expired")
            return Principal(stored.tenant, stored.id, stored)
    verifier: TokenVerifier | None = request.app.state.jwt_verifier
    if verifier is not None and looks_like_jwt(key):
        return Principal(await asyncio.to_thread(verifier.tenant, key))
    raise Failure("unauthorized", "Incorrect API key provided.", code="invalid_api_key")
