"""Bearer JWTs the router verifies itself (`auth.jwt`), with PyJWT: the signature by a key of the configured JWKS
(a file, or a URL fetched and cached by `jwt.PyJWKClient`), the issuer, the audience, the expiry. The caller's tenant
is `jwt:` + the configured claim (api/auth.tenant_of_claim), so a token's subject never collides with an API key's
tenant. Imported only when `auth.jwt` is configured: PyJWT pulls in much of `cryptography` (x509), ~0.1 s of cold
start nobody else should pay.

Every refusal is a 401 `invalid_token` that does not say what was wrong; the reason goes to the log, never the token.
Only asymmetric algorithms from the config are accepted (no `none`, no HMAC with a public key as the secret), and the
key must be of the algorithm's family.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jwt
from jwt import PyJWK, PyJWKClient, PyJWKSet

from unbroken.api.auth import tenant_of_claim
from unbroken.config import JwtSettings
from unbroken.errors import Failure

log = logging.getLogger("unbroken.auth")

# The kty each algorithm family signs with; a key of another type is refused before PyJWT sees it.
_FAMILY = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}
_JWKS_TIMEOUT_SECONDS = 5.0


class Refused(Exception):
    """Why a token was refused, for the log."""


class JwtVerifier:
    def __init__(self, settings: JwtSettings) -> None:
        self.settings = settings
        self.algorithms = list(settings.algorithms)
        self._client: PyJWKClient | None = None
        self._keys: PyJWKSet | None = None
        if settings.jwks_url is not None:
            self._client = PyJWKClient(settings.jwks_url, cache_jwk_set=True, lifespan=settings.jwks_cache_seconds,
                                       timeout=_JWKS_TIMEOUT_SECONDS)
        else:
            assert settings.jwks_file is not None
            # Read once, at start: a bad file is a configuration error the operator sees at once.
            self._keys = PyJWKSet.from_dict(json.loads(Path(settings.jwks_file).read_text(encoding="utf-8")))

    def tenant(self, token: str) -> str:
        """The caller's tenant, or a Failure: 401 for any bad token, 503 when the JWKS cannot be fetched."""
        try:
            claims = self._verify(token)
        except jwt.PyJWKClientConnectionError as exc:
            log.warning("bearer JWT not checked: the JWKS could not be fetched (%s)", exc)
            raise Failure("unavailable", "The token's signing keys could not be fetched; try again.",
                          code="jwks_unavailable", retry_after=5) from None
        except (Refused, jwt.PyJWTError) as exc:
            log.info("bearer JWT refused: %s: %s", type(exc).__name__, exc)
            raise Failure("unauthorized", "The bearer token is not valid.", code="invalid_token") from None
        tenant = tenant_of_claim(claims.get(self.settings.tenant_claim))
        if tenant is None:
            log.info("bearer JWT refused: no string claim %r", self.settings.tenant_claim)
            raise Failure("unauthorized", "The bearer token is not valid.", code="invalid_token")
        return tenant

    def _verify(self, token: str) -> dict[str, Any]:
        header = jwt.get_unverified_header(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise Refused(f"algorithm {alg!r} is not one of {self.algorithms}")
        key = self._key(header.get("kid"))
        if key.key_type != _FAMILY.get(alg[:2]):
            raise Refused(f"key {key.key_id!r} is {key.key_type}, not a key for {alg}")
        claims: dict[str, Any] = jwt.decode(
            token, key.key, algorithms=[alg], audience=self.settings.audience, issuer=self.settings.issuer,
            leeway=self.settings.leeway_seconds, options={"require": ["exp", "iss", "aud"]})
        return claims

    def _key(self, kid: object) -> PyJWK:
        if kid is not None and not isinstance(kid, str):
            raise Refused("kid is not a string")
        if self._client is not None:
            if kid is None:
                keys = self._client.get_signing_keys()
                if len(keys) != 1:
                    raise Refused("no kid, and the JWKS holds more than one key")
                return keys[0]
            # Refetches the set once for an unknown kid (a key rotation), at most once per cooldown.
            return self._client.get_signing_key(kid)
        assert self._keys is not None
        keys = [k for k in self._keys.keys if k.public_key_use in ("sig", None)]
        if kid is None:
            if len(keys) != 1:
                raise Refused("no kid, and the JWKS holds more than one key")
            return keys[0]
        for k in keys:
            if k.key_id == kid:
                return k
        raise Refused(f"unknown kid {kid!r}")
