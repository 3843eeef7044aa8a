"""Browser access through a real server: CORS headers for allowed origins only (on JSON answers, errors and streams),
preflights for every route answered with the router's request headers, a refused preflight as the spec's error
object, and no CORS at all when `server.cors` lists no origin. Every answer carries an x-request-id."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.support.client import TIMEOUT, headers
from tests.support.server import RouterThread, base_config, sim_model
from unbroken.api.edge import EXPOSED_HEADERS, ROUTER_REQUEST_HEADERS

APP = "https://app.example.com"
EVIL = "https://evil.example.net"
BODY = {"model": "demo", "input": "hello"}


@pytest.fixture(scope="module")
def router() -> Iterator[RouterThread]:
    cors = {"allow_origins": [APP, "http://localhost:5173"], "allow_headers": ["X-Custom"], "max_age_seconds": 120}
    with RouterThread(base_config(sim_model("demo", deployments=1), cors=cors)) as server:
        yield server


def _cors_headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("access-control-")}


def _preflight(router: RouterThread, path: str, origin: str, method: str = "POST",
               request_headers: str = "authorization, content-type, idempotency-key") -> httpx.Response:
    with httpx.Client(timeout=TIMEOUT) as client:
        return client.options(f"{router.base_url}{path}", headers={
            "origin": origin, "access-control-request-method": method,
            "access-control-request-headers": request_headers})


def test_allowed_origin_gets_cors_headers_on_a_post(router: RouterThread) -> None:
    with httpx.Client(timeout=TIMEOUT) as client:
        r = client.post(f"{router.base_url}/responses", json=BODY, headers=headers(origin=APP))
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == APP
    assert "origin" in r.headers["vary"].lower()
    exposed = {h.strip().lower() for h in r.headers["access-control-expose-headers"].split(",")}
    assert {h.lower() for h in EXPOSED_HEADERS} <= exposed
    assert {"x-request-id", "retry-after", "x-unbroken-deployment", "x-unbroken-cost-usd"} <= exposed
    assert "access-control-allow-credentials" not in r.headers
    assert r.headers["x-request-id"].startswith("req_")


def test_allowed_origin_gets_cors_headers_on_a_stream(router: RouterThread) -> None:
    with httpx.Client(timeout=TIMEOUT) as client, client.stream(
            "POST", f"{router.base_url}/responses", json={**BODY, "stream": True},
            headers=headers(origin="http://localhost:5173")) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["access-control-allow-origin"] == "http://localhost:5173"
        assert r.read().rstrip().endswith(b"data: [DONE]")


def test_errors_carry_cors_headers_too(router: RouterThread) -> None:
    """A browser can only read a 401 (and its Retry-After on a 429) when the error carries the CORS headers."""
    with httpx.Client(timeout=TIMEOUT) as client:
        r = client.post(f"{router.base_url}/responses", json=BODY, headers=headers("sk-wrong", origin=APP))
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["access-control-allow-origin"] == APP


def test_refused_origin_gets_no_cors_headers(router: RouterThread) -> None:
    with httpx.Client(timeout=TIMEOUT) as client:
        r = client.post(f"{router.base_url}/responses", json=BODY, headers=headers(origin=EVIL))
        plain = client.post(f"{router.base_url}/responses", json=BODY, headers=headers())
    assert r.status_code == 200  # CORS is the browser's business: the server answers, without the headers
    assert _cors_headers(r) == {}
    assert "origin" in r.headers["vary"].lower()
    assert _cors_headers(plain) == {}  # no Origin, no CORS


@pytest.mark.parametrize(("path", "method"), [
    ("/responses", "POST"), ("/chat/completions", "POST"), ("/responses/resp_abc", "GET"),
    ("/responses/resp_abc", "DELETE"), ("/responses/resp_abc/cancel", "POST"), ("/responses/compact", "POST"),
    ("/models", "GET"),
])
def test_preflight_for_every_route(router: RouterThread, path: str, method: str) -> None:
    r = _preflight(router, path, APP, method)
    assert r.status_code in (200, 204), r.text
    assert r.headers["access-control-allow-origin"] == APP
    assert method in {m.strip() for m in r.headers["access-control-allow-methods"].split(",")}
    assert r.headers["access-control-max-age"] == "120"


def test_preflight_allows_the_router_request_headers(router: RouterThread) -> None:
    r = _preflight(router, "/responses", APP, request_headers="Authorization, Idempotency-Key")
    assert r.status_code in (200, 204)
    allowed = {h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")}
    for name in ("Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID", "X-Unbroken-Recovery-Events",
                 "X-Unbroken-Policy", "X-Custom"):
        assert name.lower() in allowed
        assert name in ROUTER_REQUEST_HEADERS or name == "X-Custom"
    everything = ", ".join([*ROUTER_REQUEST_HEADERS, "x-custom", "accept"])
    assert _preflight(router, "/responses", APP, request_headers=everything).status_code in (200, 204)


def test_preflight_from_a_refused_origin_is_an_error_object(router: RouterThread) -> None:
    r = _preflight(router, "/responses", EVIL)
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "cors_origin_not_allowed"
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert _cors_headers(r) == {}


def test_preflight_for_a_header_or_method_not_allowed(router: RouterThread) -> None:
    r = _preflight(router, "/responses", APP, request_headers="authorization, x-not-listed")
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "cors_header_not_allowed"
    assert "x-not-listed" in r.json()["error"]["message"]
    r = _preflight(router, "/responses", APP, method="PUT")
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "Access-Control-Request-Method"


def test_wildcard_origin_and_headers() -> None:
    cors = {"allow_origins": ["*"], "allow_headers": ["*"]}
    with RouterThread(base_config(sim_model("demo", deployments=1), cors=cors)) as server, \
            httpx.Client(timeout=TIMEOUT) as client:
        r = client.get(f"{server.base_url}/models", headers=headers(origin=EVIL))
        assert r.headers["access-control-allow-origin"] == "*"
        p = _preflight(server, "/responses", EVIL, request_headers="authorization, x-stainless-os")
        assert p.status_code in (200, 204)
        assert p.headers["access-control-allow-origin"] == "*"
        assert "x-stainless-os" in p.headers["access-control-allow-headers"]


def test_no_origins_no_cors() -> None:
    """CORS off (the default): a preflight is an ordinary OPTIONS, which no route answers."""
    with RouterThread(base_config(sim_model("demo", deployments=1))) as server, \
            httpx.Client(timeout=TIMEOUT) as client:
        r = client.options(f"{server.base_url}/responses", headers={
            "origin": APP, "access-control-request-method": "POST"})
        assert r.status_code == 405
        assert r.json()["error"]["code"] == "method_not_allowed"
        assert _cors_headers(r) == {}
        g = client.get(f"{server.base_url}/models", headers=headers(origin=APP))
        assert _cors_headers(g) == {}
        assert g.headers["x-request-id"]
