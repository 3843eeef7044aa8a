"""The admin API (`/admin/v1`) through a real server: every route refuses a caller without the admin key, creates,
lists, reads, changes and revokes keys, sets tenants' budgets and limits and reads spend; keys from the store
authenticate, are refused when revoked or expired, are held to their models, budgets and limits; and the spend per
key, tenant, model, deployment and day adds up to the `cost_usd` the responses reported."""

from __future__ import annotations

import concurrent.futures
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.client import TIMEOUT, post_stream
from tests.support.server import RouterThread, base_config, sim_model
from unbroken.journal.sqlite import SQLiteStore

ADMIN_KEY = "sk-admin-test"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
PROMPT = "Tell me about budgets"

# Every admin route with a body that would be valid.
ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/admin/v1/keys", {"tenant": "acme"}),
    ("GET", "/admin/v1/keys", None),
    ("GET", "/admin/v1/keys/key_0000000000000000", None),
    ("PATCH", "/admin/v1/keys/key_0000000000000000", {"name": "x"}),
    ("POST", "/admin/v1/keys/key_0000000000000000/revoke", None),
    ("GET", "/admin/v1/tenants", None),
    ("GET", "/admin/v1/tenants/acme", None),
    ("PATCH", "/admin/v1/tenants/acme", {"budgets": {"daily_usd": 1}}),
    ("GET", "/admin/v1/spend", None),
]


def _config(**auth: Any) -> dict[str, Any]:
    cfg = base_config(sim_model("demo"), sim_model("other"))
    cfg["auth"] = {"admin_keys": [{"key": ADMIN_KEY, "tenant": "ops"}], **auth}
    return cfg


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterThread]:
    path = tmp_path_factory.mktemp("admin") / "router.db"
    with RouterThread(_config(), SQLiteStore(str(path))) as server:
        yield server


def _base(router: RouterThread) -> str:
    return f"http://127.0.0.1:{router.port}"


def _call(router: RouterThread, method: str, path: str, body: Any = None, *,
          headers: dict[str, str] | None = None) -> httpx.Response:
    with httpx.Client(timeout=TIMEOUT) as client:
        return client.request(method, _base(router) + path, json=body,
                              headers=ADMIN if headers is None else headers)


def _create(router: RouterThread, **fields: Any) -> dict[str, Any]:
    r = _call(router, "POST", "/admin/v1/keys", {"tenant": "acme", **fields})
    assert r.status_code == 201, r.text
    created: dict[str, Any] = r.json()
    return created


def _respond(router: RouterThread, secret: str, **body: Any) -> httpx.Response:
    with httpx.Client(timeout=TIMEOUT) as client:
        return client.post(router.base_url + "/responses", json={"model": "demo", "input": PROMPT, **body},
                           headers={"authorization": f"Bearer {secret}"})


def _assert_error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error: dict[str, Any] = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    return error


# -- who may call -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
@pytest.mark.parametrize("auth", [None, "Bearer sk-wrong", "Bearer sk-test"])
def test_every_route_needs_the_admin_key(router: RouterThread, method: str, path: str, body: Any,
                                         auth: str | None) -> None:
    """No key, a wrong one, and a caller's own (valid) API key are all a 401."""
    r = _call(router, method, path, body, headers={"authorization": auth} if auth else {})
    _assert_error(r, 401, "invalid_admin_key")
    assert r.headers["www-authenticate"] == "Bearer"


def test_without_admin_keys_the_routes_are_off(tmp_path: Path) -> None:
    with RouterThread(base_config(sim_model()), SQLiteStore(str(tmp_path / "r.db"))) as server:
        _assert_error(_call(server, "GET", "/admin/v1/keys"), 401, "admin_disabled")


def test_without_a_store_the_routes_say_so() -> None:
    with RouterThread(_config()) as server:
        _assert_error(_call(server, "GET", "/admin/v1/keys"), 503, "store_required")
        _assert_error(_call(server, "GET", "/admin/v1/spend"), 503, "store_required")


# -- keys ---------------------------------------------------------------------------------------------------------


def test_a_key_is_created_listed_read_changed_and_revoked(router: RouterThread) -> None:
    created = _create(router, name="ci", models=["demo"], budgets={"daily_usd": 5}, limits={"rpm": 100})
    secret, key_id = created.pop("secret"), created["id"]
    assert secret.startswith("sk-ub-") and key_id.startswith("key_")
    assert created["tenant"] == "acme" and created["models"] == ["demo"] and created["revoked"] is False
    assert created["budgets"] == {"daily_usd": 5.0, "monthly_usd": None}
    assert created["limits"] == {"rpm": 100, "tpm": None}
    # The secret is never shown again, and no answer holds its digest.
    digest = hashlib.sha256(secret.encode()).hexdigest()
    listed = _call(router, "GET", "/admin/v1/keys?tenant=acme")
    got = _call(router, "GET", f"/admin/v1/keys/{key_id}")
    for r in (listed, got):
        assert r.status_code == 200 and secret not in r.text and digest not in r.text
    assert key_id in [k["id"] for k in listed.json()["data"]]
    assert got.json() == created
    assert key_id not in _call(router, "GET", "/admin/v1/keys?tenant=nobody").text
    # The key works, for its tenant.
    r = _respond(router, secret)
    assert r.status_code == 200, r.text
    # Changes touch only the fields given; null clears.
    changed = _call(router, "PATCH", f"/admin/v1/keys/{key_id}",
                    {"budgets": {"monthly_usd": 50}, "limits": {"rpm": None, "tpm": 1000}, "models": None})
    assert changed.status_code == 200, changed.text
    body = changed.json()
    assert body["budgets"] == {"daily_usd": 5.0, "monthly_usd": 50.0}
    assert body["limits"] == {"rpm": None, "tpm": 1000} and body["models"] is None and body["name"] == "ci"
    # Revoked: refused at once by this instance, and revoking again changes nothing.
    revoked = _call(router, "POST", f"/admin/v1/keys/{key_id}/revoke")
    assert revoked.status_code == 200 and revoked.json()["revoked"] is True
    assert _call(router, "POST", f"/admin/v1/keys/{key_id}/revoke").json()["revoked_at"] == \
        revoked.json()["revoked_at"]
    _assert_error(_respond(router, secret), 401, "api_key_revoked")


@pytest.mark.parametrize(("method", "suffix", "body"), [
    ("GET", "", None), ("PATCH", "", {"name": "x"}), ("POST", "/revoke", None)])
def test_an_unknown_key_is_a_404(router: RouterThread, method: str, suffix: str, body: Any) -> None:
    _assert_error(_call(router, method, f"/admin/v1/keys/key_nope{suffix}", body), 404, "key_not_found")


@pytest.mark.parametrize(("body", "param", "code"), [
    ({}, "tenant", "invalid_request"),
    ({"tenant": ""}, "tenant", "invalid_request"),
    ({"tenant": "acme", "budgets": {"daily_usd": -1}}, "budgets.daily_usd", "invalid_request"),
    ({"tenant": "acme", "limits": {"rpm": 0}}, "limits.rpm", "invalid_request"),
    ({"tenant": "acme", "limits": {"rpx": 5}}, "limits.rpx", "invalid_request"),
    ({"tenant": "acme", "models": ["no-such-model"]}, "models", "model_not_found"),
    ({"tenant": "acme", "expires_at": "tomorrow"}, "expires_at", "invalid_request"),
    ({"tenant": "acme", "secret": "sk-ub-mine"}, "secret", "invalid_request"),
])
def test_a_bad_key_body_is_a_400_naming_the_parameter(router: RouterThread, body: dict[str, Any], param: str,
                                                      code: str) -> None:
    error = _assert_error(_call(router, "POST", "/admin/v1/keys", body), 400, code)
    assert error["param"] == param


def test_a_body_that_is_no_json_is_a_400(router: RouterThread) -> None:
    with httpx.Client(timeout=TIMEOUT) as client:
        r = client.post(_base(router) + "/admin/v1/keys", content=b"{nope", headers=ADMIN)
    _assert_error(r, 400, "invalid_json")


def test_an_expired_key_is_refused(router: RouterThread) -> None:
    created = _create(router, expires_at=time.time() + 3600)
    assert _respond(router, created["secret"]).status_code == 200
    r = _call(router, "PATCH", f"/admin/v1/keys/{created['id']}", {"expires_at": time.time() - 1})
    assert r.status_code == 200, r.text
    _assert_error(_respond(router, created["secret"]), 401, "api_key_expired")


def test_an_unknown_store_key_is_refused_like_any_wrong_key(router: RouterThread) -> None:
    _assert_error(_respond(router, "sk-ub-made-up"), 401, "invalid_api_key")


def test_a_key_is_held_to_its_models(router: RouterThread) -> None:
    created = _create(router, models=["other"])
    error = _assert_error(_respond(router, created["secret"]), 403, "model_not_allowed")
    assert error["param"] == "model"
    with httpx.Client(timeout=TIMEOUT) as client:
        chat = client.post(router.base_url + "/chat/completions",
                           json={"model": "demo", "messages": [{"role": "user", "content": PROMPT}]},
                           headers={"authorization": f"Bearer {created['secret']}"})
    _assert_error(chat, 403, "model_not_allowed")
    assert _respond(router, created["secret"], model="other").status_code == 200


# -- budgets and limits in one process ------------------------------------------------------------------------------


def test_a_daily_budget_refuses_once_spent(router: RouterThread) -> None:
    created = _create(router, budgets={"daily_usd": 0.000001})
    assert _respond(router, created["secret"]).status_code == 200  # admitted at $0, costs more than the budget
    r = _respond(router, created["secret"])
    _assert_error(r, 429, "budget_exceeded")
    assert 1 <= int(r.headers["retry-after"]) <= 86400


def test_a_monthly_budget_refuses_once_spent(router: RouterThread) -> None:
    created = _create(router, budgets={"monthly_usd": 0.000001})
    assert _respond(router, created["secret"]).status_code == 200
    r = _respond(router, created["secret"])
    _assert_error(r, 429, "budget_exceeded")
    assert 1 <= int(r.headers["retry-after"]) <= 31 * 86400


def test_rpm_counts_concurrent_requests_at_admission(router: RouterThread) -> None:
    """Requests count when admitted: of four sent at once against rpm 2, two are refused (unless the minute turns
    between them, when the test runs again)."""
    for _ in range(3):
        created = _create(router, limits={"rpm": 2})
        minute = int(time.time() // 60)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(_respond, [router] * 4, [created["secret"]] * 4))
        if int(time.time() // 60) != minute:
            continue
        statuses = sorted(r.status_code for r in results)
        assert statuses == [200, 200, 429, 429], statuses
        refused = next(r for r in results if r.status_code == 429)
        _assert_error(refused, 429, "rate_limit_exceeded")
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        return
    pytest.fail("every run straddled a minute boundary")


def test_tpm_counts_the_tokens_of_finished_requests(router: RouterThread) -> None:
    for _ in range(3):
        created = _create(router, limits={"tpm": 10})
        minute = int(time.time() // 60)
        first = _respond(router, created["secret"])
        second = _respond(router, created["secret"])
        if int(time.time() // 60) != minute:
            continue
        assert first.status_code == 200 and first.json()["usage"]["total_tokens"] >= 10
        _assert_error(second, 429, "rate_limit_exceeded")
        return
    pytest.fail("every run straddled a minute boundary")


def test_a_tenant_budget_holds_every_key_of_the_tenant(router: RouterThread) -> None:
    """A YAML key of tenant t2 and a store key of t2 are both held to t2's budget; t1 is not."""
    r = _call(router, "PATCH", "/admin/v1/tenants/t2", {"budgets": {"daily_usd": 0.000001}})
    assert r.status_code == 200 and r.json()["budgets"]["daily_usd"] == 0.000001
    assert _call(router, "GET", "/admin/v1/tenants/t2").json() == r.json()
    assert "t2" in [t["tenant"] for t in _call(router, "GET", "/admin/v1/tenants").json()["data"]]
    assert _respond(router, "sk-other").status_code == 200
    _assert_error(_respond(router, "sk-other"), 429, "budget_exceeded")
    store_key = _call(router, "POST", "/admin/v1/keys", {"tenant": "t2"}).json()
    _assert_error(_respond(router, store_key["secret"]), 429, "budget_exceeded")
    assert _respond(router, "sk-test").status_code == 200
    # Cleared, the tenant may spend again.
    assert _call(router, "PATCH", "/admin/v1/tenants/t2", {"budgets": None}).json()["budgets"] == \
        {"daily_usd": None, "monthly_usd": None}
    assert _respond(router, "sk-other").status_code == 200


def test_a_bad_tenant_body_is_a_400(router: RouterThread) -> None:
    error = _assert_error(_call(router, "PATCH", "/admin/v1/tenants/x", {"budgets": {"weekly_usd": 1}}), 400,
                          "invalid_request")
    assert error["param"] == "budgets.weekly_usd"


# -- spend --------------------------------------------------------------------------------------------------------


def _spend(router: RouterThread, by: str, id_: str) -> dict[str, Any]:
    r = _call(router, "GET", f"/admin/v1/spend?by={by}&id={id_}")
    assert r.status_code == 200, r.text
    spent: dict[str, Any] = r.json()
    return spent


def test_spend_adds_up_to_the_reported_cost(tmp_path: Path) -> None:
    """Streamed, non-streamed (journaled and not), background, chat, a cut answer continued and a failover: the
    spend per key, tenant, model and deployment adds up to the `cost_usd` every response reported."""
    config = _config()
    with RouterThread(config, SQLiteStore(str(tmp_path / "spend.db"))) as router:
        created = _create(router, tenant="ledger")
        secret, key_id = created["secret"], created["id"]
        costs: list[float] = []
        tokens = {"input": 0, "output": 0}
        by_deployment: dict[str, float] = {}
        attempts = [1]  # the chat completion's (it served at once)

        def note(response: dict[str, Any]) -> None:
            costs.append(response["router"]["cost_usd"])
            tokens["input"] += response["usage"]["input_tokens"]
            tokens["output"] += response["usage"]["output_tokens"]
            attempts.append(len(response["router"]["attempts"]))
            for attempt in response["router"]["attempts"]:
                name = f"demo/{attempt['deployment']}"
                by_deployment[name] = by_deployment.get(name, 0.0) + attempt["cost_usd"]

        for metadata in ({}, {"sim_fault": "cut:7"}, {"sim_fault": "http:503"}):
            _, stream = post_stream(router.base_url, {"model": "demo", "input": PROMPT, "metadata": metadata},
                                    key=secret)
            note(stream.response)
        for store in (True, False):
            r = _respond(router, secret, store=store)
            assert r.status_code == 200
            note(r.json())
            assert float(r.headers["x-unbroken-cost-usd"]) == pytest.approx(r.json()["router"]["cost_usd"])
        queued = _respond(router, secret, background=True).json()
        with httpx.Client(timeout=TIMEOUT) as client:
            deadline = time.monotonic() + 30
            while True:
                polled = client.get(f"{router.base_url}/responses/{queued['id']}",
                                    headers={"authorization": f"Bearer {secret}"}).json()
                if polled["status"] == "completed" or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert polled["status"] == "completed"
            note(polled)
            chat = client.post(router.base_url + "/chat/completions",
                               json={"model": "demo", "messages": [{"role": "user", "content": PROMPT}]},
                               headers={"authorization": f"Bearer {secret}"})
        assert chat.status_code == 200
        chat_cost = float(chat.headers["x-unbroken-cost-usd"])
        chat_deployment = f"demo/{chat.headers['x-unbroken-deployment']}"
        by_deployment[chat_deployment] = by_deployment.get(chat_deployment, 0.0) + chat_cost
        total = sum(costs) + chat_cost
        requests = len(costs) + 1
        assert total > 0

        for by, id_ in (("key", key_id), ("tenant", "ledger"), ("model", "demo")):
            spent = _spend(router, by, id_)  # at once: charged before the terminal event the client saw
            (row,) = spent["data"]
            assert row["id"] == id_ and row["day"] == time.strftime("%Y-%m-%d", time.gmtime())
            assert row["usd"] == pytest.approx(total, abs=1e-9)
            if by != "model":  # the model also counts what other tests of this router sent
                assert row["requests"] == requests
        deployments = _call(router, "GET", "/admin/v1/spend?by=deployment").json()["totals"]
        assert {d["id"]: pytest.approx(d["usd"], abs=1e-9) for d in deployments} == by_deployment
        assert sum(d["attempts"] for d in deployments) == sum(attempts) == requests + 2  # the cut, the failover
        key_row = _call(router, "GET", f"/admin/v1/spend?by=key&id={key_id}").json()["data"][0]
        assert key_row["input_tokens"] >= tokens["input"] and key_row["output_tokens"] >= tokens["output"]
        # All keys at once: this one is among them.
        assert key_id in [row["id"] for row in _call(router, "GET", "/admin/v1/spend?by=key").json()["data"]]


@pytest.mark.parametrize(("query", "param"), [
    ("from=yesterday", "from"), ("to=2026-13-01", "to"), ("from=2026-12-02&to=2026-12-01", "from"),
    ("from=2026-01-01&to=2026-12-01", "from"), ("by=user", "by"), ("id=", "id"),
])
def test_a_bad_spend_query_is_a_400(router: RouterThread, query: str, param: str) -> None:
    error = _assert_error(_call(router, "GET", f"/admin/v1/spend?{query}"), 400, "invalid_request")
    assert error["param"] == param


def test_spend_of_a_past_range_is_empty(router: RouterThread) -> None:
    r = _call(router, "GET", "/admin/v1/spend?by=tenant&from=2020-01-01&to=2020-01-31")
    assert r.status_code == 200
    assert r.json() == {"object": "spend", "by": "tenant", "from": "2020-01-01", "to": "2020-01-31", "data": [],
                        "totals": []}


def test_a_store_key_sees_only_its_own_tenants_responses(router: RouterThread) -> None:
    """Tenancy holds for keys from the store: a response is bound to the creating key's tenant, so another key of
    that tenant reads it and a key of another tenant gets the 404 of a response that does not exist."""
    owner, colleague = _create(router, tenant="acme"), _create(router, tenant="acme")
    stranger = _create(router, tenant="globex")
    created = _respond(router, owner["secret"])
    assert created.status_code == 200, created.text
    response_id = created.json()["id"]
    with httpx.Client(timeout=TIMEOUT) as client:
        def get(secret: str) -> httpx.Response:
            return client.get(f"{router.base_url}/responses/{response_id}",
                              headers={"authorization": f"Bearer {secret}"})

        assert get(colleague["secret"]).status_code == 200
        _assert_error(get(stranger["secret"]), 404, "not_found")
        continued = _respond(router, stranger["secret"], previous_response_id=response_id)
        assert continued.status_code == 404, continued.text
        deleted = client.delete(f"{router.base_url}/responses/{response_id}",
                                headers={"authorization": f"Bearer {stranger['secret']}"})
        assert deleted.status_code == 404, deleted.text
        assert get(owner["secret"]).status_code == 200  # the stranger's delete did nothing
