"""Bearer JWTs verified by the router (`auth.jwt`), through a real server: tokens signed with key pairs the tests
generate, the JWKS served from a file or a loopback HTTP server. A good token is a tenant of its own (`jwt:<sub>`)
whose responses no other tenant sees; every bad token (issuer, audience, expiry, signature, kid, `none`, HS256 with
the public key as secret, a key of the wrong type) is a 401 `invalid_token` error object, never a 500, and the log
says why without the token."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tests.support.client import TIMEOUT, headers
from tests.support.server import API_KEY, RouterThread, base_config, sim_model
from unbroken.journal.memory import MemoryStore

ISSUER = "https://issuer.example.com/"
AUDIENCE = "unbroken-api"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
BODY = {"model": "demo", "input": "hello", "store": True}


def _jwk(key: Any, kid: str) -> dict[str, Any]:
    algo = RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) else ECAlgorithm
    jwk: dict[str, Any] = json.loads(algo.to_jwk(key.public_key()))
    return {**jwk, "kid": kid, "use": "sig"}


JWKS = {"keys": [_jwk(RSA_KEY, "rsa-1"), _jwk(EC_KEY, "ec-1")]}


def token(sub: str = "alice", *, key: Any = RSA_KEY, kid: str | None = "rsa-1", alg: str = "RS256",
          **claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "iat": now, "exp": now + 300, **claims}
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, key, algorithm=alg, headers={"kid": kid} if kid else None)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(alg: str, secret: bytes | None) -> str:
    """A token PyJWT would refuse to make: `alg: none`, or HS256 keyed with the RSA public key's PEM."""
    now = int(time.time())
    head = _b64(json.dumps({"alg": alg, "typ": "JWT", "kid": "rsa-1"}).encode())
    body = _b64(json.dumps({"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory", "exp": now + 300}).encode())
    signing_input = f"{head}.{body}".encode()
    sig = "" if secret is None else _b64(hmac.new(secret, signing_input, hashlib.sha256).digest())
    return f"{head}.{body}.{sig}"


def jwt_config(jwks: dict[str, Any], **jwt_settings: Any) -> dict[str, Any]:
    config = base_config(sim_model("demo", deployments=1))
    config["auth"] = {"jwt": {"issuer": ISSUER, "audience": AUDIENCE, **jwks, **jwt_settings}}
    return config


@pytest.fixture(scope="module")
def jwks_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("jwks") / "jwks.json"
    path.write_text(json.dumps(JWKS), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def router(jwks_file: Path) -> Iterator[RouterThread]:
    with RouterThread(jwt_config({"jwks_file": str(jwks_file)}), store=MemoryStore()) as server:
        yield server


def post(router: RouterThread, bearer: str, body: dict[str, Any] = BODY) -> httpx.Response:
    with httpx.Client(timeout=TIMEOUT) as client:
        return client.post(f"{router.base_url}/responses", json=body, headers=headers(bearer))


def get(router: RouterThread, bearer: str, path: str) -> httpx.Response:
    with httpx.Client(timeout=TIMEOUT) as client:
        return client.get(f"{router.base_url}{path}", headers=headers(bearer))


def test_good_token_is_its_own_tenant(router: RouterThread) -> None:
    created = post(router, token("alice"))
    assert created.status_code == 200, created.text
    rid = created.json()["id"]
    assert get(router, token("alice"), f"/responses/{rid}").status_code == 200
    # Another subject, an EC-signed token and an API key are all other tenants: the response does not exist.
    for other in (token("bob"), token("bob", key=EC_KEY, kid="ec-1", alg="ES256"), API_KEY):
        r = get(router, other, f"/responses/{rid}")
        assert r.status_code == 404, (other[:10], r.text)
        assert r.json()["error"]["code"] == "not_found"
    # The same subject in an ES256 token is the same tenant.
    assert get(router, token("alice", key=EC_KEY, kid="ec-1", alg="ES256"), f"/responses/{rid}").status_code == 200


def test_api_keys_still_work_beside_jwts(router: RouterThread) -> None:
    assert post(router, API_KEY).status_code == 200
    r = post(router, "sk-not-a-key")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


BAD_TOKENS = {
    "wrong issuer": lambda: token(iss="https://other.example.com/"),
    "wrong audience": lambda: token(aud="someone-else"),
    "expired": lambda: token(exp=int(time.time()) - 3600, iat=int(time.time()) - 7200),
    "no expiry": lambda: token(exp=None),
    "bad signature": lambda: token(key=OTHER_RSA_KEY),
    "unknown kid": lambda: token(kid="rsa-404"),
    "no kid among several keys": lambda: token(kid=None),
    "alg none": lambda: forged("none", None),
    "HS256 with the public key": lambda: forged("HS256", RSA_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)),
    "RS256 header on the EC key": lambda: token(key=RSA_KEY, kid="ec-1"),
    "algorithm not configured": lambda: token(alg="RS512"),
    "garbage in JWT shape": lambda: "eyJhbGciOi.eyJzdWIi.c2ln",
}


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
def test_bad_tokens_are_401_invalid_token(router: RouterThread, case: str,
                                          caplog: pytest.LogCaptureFixture) -> None:
    bad = BAD_TOKENS[case]()
    with caplog.at_level(logging.INFO, logger="unbroken.auth"):
        r = post(router, bad)
    assert r.status_code == 401, (case, r.text)
    assert r.json() == {"error": {"message": "The bearer token is not valid.", "type": "invalid_request_error",
                                  "param": None, "code": "invalid_token"}}
    assert r.headers["www-authenticate"] == "Bearer"
    logged = [rec.getMessage() for rec in caplog.records if rec.name == "unbroken.auth"]
    assert logged and all("refused" in m for m in logged), (case, logged)
    signature = bad.split(".")[2]
    assert not any(bad in m or (signature and signature in m) for m in logged)


def test_tenant_claim_and_leeway(jwks_file: Path) -> None:
    config = jwt_config({"jwks_file": str(jwks_file)}, tenant_claim="custom:tenant", leeway_seconds=120)
    with RouterThread(config, store=MemoryStore()) as server:
        created = post(server, token("alice", **{"custom:tenant": "acme"}))
        assert created.status_code == 200, created.text
        # Same tenant claim, other subject: the same tenant.
        rid = created.json()["id"]
        assert get(server, token("bob", **{"custom:tenant": "acme"}), f"/responses/{rid}").status_code == 200
        assert get(server, token("alice", **{"custom:tenant": "other"}), f"/responses/{rid}").status_code == 404
        # Expired 60 s ago, within the 120 s leeway.
        assert post(server, token(exp=int(time.time()) - 60, **{"custom:tenant": "acme"})).status_code == 200
        # No tenant claim at all.
        r = post(server, token("alice"))
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_token"


class _JwksServer:
    def __init__(self, jwks: dict[str, Any]) -> None:
        self.jwks = jwks
        self.fetches = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.fetches += 1
                body = json.dumps(outer.jwks).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/.well-known/jwks.json"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_jwks_from_a_url_is_fetched_once_and_cached() -> None:
    server = _JwksServer({"keys": [_jwk(RSA_KEY, "rsa-1")]})
    try:
        with RouterThread(jwt_config({"jwks_url": server.url})) as router:
            for sub in ("alice", "bob", "carol"):
                assert post(router, token(sub), {**BODY, "store": False}).status_code == 200
            assert server.fetches == 1
            # An unknown kid refetches at most once per cooldown, and is a 401.
            assert post(router, token(kid="rotated")).status_code == 401
            assert post(router, token(kid="rotated-again")).status_code == 401
            assert server.fetches <= 2
    finally:
        server.close()


def test_unreachable_jwks_is_503_not_500() -> None:
    server = _JwksServer({"keys": []})
    url = server.url
    server.close()
    with RouterThread(jwt_config({"jwks_url": url})) as router:
        r = post(router, token())
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "jwks_unavailable"
        assert "retry-after" in r.headers
