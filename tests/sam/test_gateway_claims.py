"""Behind API Gateway's Cognito authorizer the tenant comes from the verified claims in the request context that the
Web Adapter passes (`x-amzn-request-context` → `authorizer.claims`), through a real server; the same headers sent to
a router outside Lambda are ignored. And the deployment's environment overrides the config (app.config_overrides)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.sam.test_identity import LAMBDA_ENV, _event, lwa_headers
from tests.support.client import TIMEOUT
from tests.support.server import RouterThread, base_config, config_from, sim_model
from unbroken.app import config_overrides
from unbroken.journal.memory import MemoryStore

BODY = {"model": "demo", "input": "hello", "store": True}


def gateway_headers(claims: dict[str, Any] | None, request_id: str = "5f3e0c8a-8b1d-4c2e-9f6a-0d1e2f3a4b5c",
                    ) -> dict[str, str]:
    """What LWA sends uvicorn for an API Gateway event whose Cognito authorizer verified `claims`: the Authorization
    header is the caller's Cognito token, which the router does not verify again."""
    event = _event()
    ctx = dict(event["requestContext"], requestId=request_id)
    ctx["authorizer"] = {"claims": claims} if claims is not None else {}
    event["requestContext"] = ctx
    event["headers"] = {"Authorization": "Bearer eyJraWQiOi.eyJzdWIiOi.c2lnbmF0dXJl",
                        "Content-Type": "application/json"}
    # A deadline 880 s from now: the fixture's fixed one may lie in this machine's past.
    return dict(lwa_headers(event, deadline_ms=int((time.time() + 880) * 1000)).items())


def _claims(sub: str, tenant: str) -> dict[str, Any]:
    return {"sub": sub, "custom:tenant": tenant, "iss": "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_Ab",
            "token_use": "id", "aud": "client123"}


def _config() -> dict[str, Any]:
    config = base_config(sim_model("demo", deployments=1))
    config["auth"] = {"gateway_tenant_claim": "custom:tenant"}
    return config


@pytest.fixture(scope="module")
def lambda_router() -> Iterator[RouterThread]:
    with RouterThread(_config(), store=MemoryStore(), lambda_env=dict(LAMBDA_ENV)) as server:
        yield server


def _post(router: RouterThread, hdrs: dict[str, str]) -> httpx.Response:
    with httpx.Client(timeout=TIMEOUT) as client:
        return client.post(f"{router.base_url}/responses", content=json.dumps(BODY), headers=hdrs)


def _get(router: RouterThread, rid: str, hdrs: dict[str, str]) -> httpx.Response:
    with httpx.Client(timeout=TIMEOUT) as client:
        return client.get(f"{router.base_url}/responses/{rid}", headers=hdrs)


def test_tenant_from_the_authorizer_claims_in_lambda(lambda_router: RouterThread) -> None:
    created = _post(lambda_router, gateway_headers(_claims("alice", "acme")))
    assert created.status_code == 200, created.text
    assert created.headers["x-request-id"] == "5f3e0c8a-8b1d-4c2e-9f6a-0d1e2f3a4b5c"  # API Gateway's request id
    rid = created.json()["id"]
    # Same tenant claim, another user of it: the same tenant. Another tenant: no such response.
    assert _get(lambda_router, rid, gateway_headers(_claims("bob", "acme"))).status_code == 200
    other = _get(lambda_router, rid, gateway_headers(_claims("carol", "globex")))
    assert other.status_code == 404 and other.json()["error"]["code"] == "not_found"
    # A request the authorizer did not verify (no claims) falls back to keys; its JWT-shaped bearer is no key.
    r = _post(lambda_router, gateway_headers(None))
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    # An API key still works beside the authorizer (e.g. a route without one), as its own tenant.
    key = {**gateway_headers(None), "authorization": "Bearer sk-test"}
    assert _get(lambda_router, rid, key).status_code == 404
    assert _post(lambda_router, key).status_code == 200


def test_the_same_headers_are_ignored_outside_lambda() -> None:
    with RouterThread(_config(), store=MemoryStore()) as server:
        r = _post(server, gateway_headers(_claims("alice", "acme")))
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["x-request-id"].startswith("req_")  # not the forged request context's id


def test_claims_are_not_read_unless_configured() -> None:
    with RouterThread(base_config(sim_model("demo", deployments=1)), lambda_env=dict(LAMBDA_ENV)) as server:
        r = _post(server, gateway_headers(_claims("alice", "acme")))
        assert r.status_code == 401


def test_environment_overrides_the_config() -> None:
    assert config_overrides({}) == {}
    assert config_overrides({"UNBROKEN_CORS_ALLOW_ORIGINS": "", "UNBROKEN_GATEWAY_TENANT_CLAIM": ""}) == {}
    overrides = config_overrides({"UNBROKEN_CORS_ALLOW_ORIGINS": "https://a.example.com, http://localhost:5173",
                                  "UNBROKEN_GATEWAY_TENANT_CLAIM": "custom:tenant"})
    assert overrides == {"server": {"cors": {"allow_origins": ["https://a.example.com", "http://localhost:5173"]}},
                         "auth": {"gateway_tenant_claim": "custom:tenant"}}
    from unbroken.config import parse_config

    text = json.dumps({"api_keys": [{"key": "k", "tenant": "t"}],
                       "server": {"heartbeat_seconds": 5, "cors": {"allow_origins": ["https://old.example.com"],
                                                                   "max_age_seconds": 60}}})
    config = parse_config(text, "<env>", env={}, overrides=overrides)
    assert config.server.cors.allow_origins == ["https://a.example.com", "http://localhost:5173"]
    assert config.server.cors.max_age_seconds == 60 and config.server.heartbeat_seconds == 5
    assert config.auth.gateway_tenant_claim == "custom:tenant"
    # A Cognito-only deployment needs no API keys.
    assert parse_config("{}", "<env>", env={}, overrides=overrides).auth.gateway_tenant_claim == "custom:tenant"


@pytest.mark.parametrize("cors", [
    {"allow_origins": ["https://a.example.com/"]},
    {"allow_origins": ["a.example.com"]},
    {"allow_origins": ["*"], "allow_credentials": True},
])
def test_bad_cors_settings_are_config_errors(cors: dict[str, Any]) -> None:
    from unbroken.config import ConfigError

    with pytest.raises(ConfigError):
        config_from(base_config(sim_model("demo"), cors=cors))
