"""Keys, budgets and rate limits shared by every instance: two `unbroken serve` processes on one SQLite store.

- A key revoked through one process is refused by the other within 10 s (the acceptance bound; the key cache keeps
  an answer at most `auth.key_cache_seconds`, 5 s).
- What one process admitted and spent holds the other to the key's budget, rpm and tpm (429, the error code,
  Retry-After). The first process is stopped gracefully before the second is asked, which flushes its counters:
  the second process has never seen those requests itself.
- The spend of a response taken over from a killed process adds up to its reported cost.
- Under many concurrent requests on both, no request sent later than the counter flush interval plus the read
  cache's age (plus a little slack) after the budget was reached is admitted (benchmarks/budget_overshoot.py).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from benchmarks import budget_overshoot
from tests.support.server import RouterProcess, RouterThread, admin_config, base_config, sim_model
from unbroken.journal.backends import open_store
from unbroken.journal.counters import FLUSH_SECONDS, READ_CACHE_SECONDS
from unbroken.simulator import SimulatedUpstream

ADMIN_KEY = "sk-admin-procs"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
REVOCATION_BOUND_S = 10.0
CONFIG = yaml.safe_dump(admin_config(ADMIN_KEY, sim_model("demo", deployments=1),
                                     api_keys=[{"key": "sk-test", "tenant": "t1"}]))


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, str]:
    config = tmp_path / "router.yaml"
    config.write_text(CONFIG, encoding="utf-8")
    return config, f"sqlite:///{tmp_path / 'shared.db'}"


def _root(router: RouterProcess) -> str:
    return router.base_url.removesuffix("/v1")


def _create_key(router: RouterProcess, **fields: Any) -> dict[str, Any]:
    with httpx.Client(timeout=30) as client:
        r = client.post(_root(router) + "/admin/v1/keys", json={"tenant": "acme", **fields}, headers=ADMIN)
    assert r.status_code == 201, r.text
    created: dict[str, Any] = r.json()
    return created


def _respond(router: RouterProcess, secret: str) -> httpx.Response:
    with httpx.Client(timeout=30) as client:
        return client.post(router.base_url + "/responses", json={"model": "demo", "input": "hi", "store": False},
                           headers={"authorization": f"Bearer {secret}"})


def _refused(r: httpx.Response, code: str, max_retry_after: int) -> None:
    assert r.status_code == 429, r.text
    assert r.json()["error"]["code"] == code
    assert 1 <= int(r.headers["retry-after"]) <= max_retry_after


def test_a_revoked_key_is_refused_by_the_other_process_within_10_s(setup: tuple[Path, str]) -> None:
    config, store = setup
    with RouterProcess(config, store) as a, RouterProcess(config, store) as b:
        created = _create_key(a)
        auth = {"authorization": f"Bearer {created['secret']}"}
        with httpx.Client(timeout=30) as client:
            assert client.get(b.base_url + "/models", headers=auth).status_code == 200  # b caches: a valid key
            r = client.post(f"{_root(a)}/admin/v1/keys/{created['id']}/revoke", headers=ADMIN)
            assert r.status_code == 200 and r.json()["revoked"] is True
            revoked_at = time.monotonic()
            assert client.get(a.base_url + "/models", headers=auth).status_code == 401  # a: at once
            refused: httpx.Response | None = None
            while time.monotonic() - revoked_at < REVOCATION_BOUND_S + 5:  # bounded poll of the second process
                got = client.get(b.base_url + "/models", headers=auth)
                if got.status_code != 200:
                    refused = got
                    break
                time.sleep(0.1)
            elapsed = time.monotonic() - revoked_at
        assert refused is not None, "the second process never refused the revoked key"
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "api_key_revoked"
        assert elapsed <= REVOCATION_BOUND_S, f"refused only {elapsed:.1f} s after the revoke"


def test_a_budget_spent_through_one_process_holds_the_other(setup: tuple[Path, str]) -> None:
    config, store = setup
    with RouterProcess(config, store) as a:
        created = _create_key(a, budgets={"daily_usd": 0.000001})
        assert _respond(a, created["secret"]).status_code == 200  # admitted at $0; costs more than the budget
        _refused(_respond(a, created["secret"]), "budget_exceeded", 86400)  # a: its own spend, unflushed
    with RouterProcess(config, store) as b:
        _refused(_respond(b, created["secret"]), "budget_exceeded", 86400)


def test_a_budget_spent_through_one_running_process_holds_the_other_running_one(setup: tuple[Path, str]) -> None:
    """Both running: once b can see a's flushed spend in the store (b's admin API reads it), b refuses too."""
    config, store = setup
    with RouterProcess(config, store) as a, RouterProcess(config, store) as b, httpx.Client(timeout=30) as client:
        created = _create_key(a, budgets={"daily_usd": 0.000001})
        assert _respond(a, created["secret"]).status_code == 200
        deadline = time.monotonic() + FLUSH_SECONDS + 10
        seen: list[dict[str, Any]] = []

        def spent() -> bool:
            return bool(seen) and seen[0]["usd"] > 0.000001

        # Bounded: until a's flush of the response's cost reaches the store (the request itself is counted at its
        # admission, and a flush may carry that alone).
        while time.monotonic() < deadline and not spent():
            seen = client.get(f"{_root(b)}/admin/v1/spend", params={"by": "key", "id": created["id"]},
                              headers=ADMIN).json()["totals"]
            time.sleep(0.1)
        assert spent(), seen
        _refused(_respond(b, created["secret"]), "budget_exceeded", 86400)


def test_a_tenant_budget_spent_through_one_process_holds_the_other(setup: tuple[Path, str]) -> None:
    config, store = setup
    with RouterProcess(config, store) as a:
        with httpx.Client(timeout=30) as client:
            r = client.patch(_root(a) + "/admin/v1/tenants/t1", json={"budgets": {"monthly_usd": 0.000001}},
                             headers=ADMIN)
        assert r.status_code == 200, r.text
        assert _respond(a, "sk-test").status_code == 200
    with RouterProcess(config, store) as b:
        _refused(_respond(b, "sk-test"), "budget_exceeded", 31 * 86400)


@pytest.mark.parametrize(("limits", "admitted"), [({"rpm": 2}, 2), ({"tpm": 10}, 1)])
def test_rate_limits_count_what_the_other_process_admitted(setup: tuple[Path, str], limits: dict[str, int],
                                                          admitted: int) -> None:
    """rpm 2: two requests through a; tpm 10: one request of more than 10 tokens through a. b then refuses.
    The windows are UTC minutes: a run that straddles a boundary runs again."""
    config, store = setup
    for _ in range(3):
        minute = int(time.time() // 60)
        with RouterProcess(config, store) as a:
            created = _create_key(a, limits=limits)
            for _ in range(admitted):
                assert _respond(a, created["secret"]).status_code == 200
        with RouterProcess(config, store) as b:
            second = _respond(b, created["secret"])
        if int(time.time() // 60) != minute:
            continue
        _refused(second, "rate_limit_exceeded", 60)
        return
    pytest.fail("every run straddled a minute boundary")


def test_concurrent_requests_overshoot_a_budget_only_within_the_counter_lag(tmp_path: Path) -> None:
    """Two processes, twelve clients, a budget of ten requests: every request sent later than
    FLUSH_SECONDS + READ_CACHE_SECONDS (+ slack) after the clients' spend reached the budget is refused."""
    report = budget_overshoot.measure(workers=12, budget_requests=10, after_lag_s=2.0, workdir=tmp_path)
    assert report.lag_bound_s == FLUSH_SECONDS + READ_CACHE_SECONDS + budget_overshoot.LAG_SLACK_SECONDS
    reached, bound = report.reached_monotonic, report.lag_bound_s
    late = [o for o in report.outcomes if o.status == 200 and o.sent_at > reached + bound]
    assert report.late_admissions == 0 and not late, late
    # Requests were sent past the bound, and every one was refused with the spec's error.
    past = [o for o in report.outcomes if o.sent_at > reached + bound]
    assert past and all(o.status == 429 and o.code == "budget_exceeded" for o in past)
    assert report.spent_usd >= report.budget_usd


def test_the_spend_of_a_response_taken_over_from_a_killed_process_adds_up(tmp_path: Path) -> None:
    """a produces a background response and is killed mid-way (SIGKILL: it charges nothing); b's poll takes the
    response over and charges both its own attempts and the estimate of what a streamed: the key's spend is the
    response's `router.cost_usd`."""
    with SimulatedUpstream.start_in_thread() as sim:
        slow = sim_model("slow", deployments=1, length=80, tps=25)
        slow["deployments"][0]["base_url"] = sim.base_url
        config = base_config(slow, lease_seconds=1.0)
        config["auth"] = {"admin_keys": [{"key": ADMIN_KEY, "tenant": "ops"}]}
        path = tmp_path / "router.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        db = f"sqlite:///{tmp_path / 'shared.db'}"
        with RouterProcess(path, db) as a, RouterThread(config, store=open_store(db)) as b, \
                httpx.Client(timeout=30) as client:
            created = _create_key(a)
            auth = {"authorization": f"Bearer {created['secret']}"}
            queued = client.post(a.base_url + "/responses", headers=auth,
                                 json={"model": "slow", "input": "outlive the producer", "background": True}).json()
            url = f"/responses/{queued['id']}"
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # bounded: until a has streamed part of the answer
                polled = client.get(a.base_url + url, headers=auth).json()
                if any(i["type"] == "message" and i["content"] and i["content"][0]["text"]
                       for i in polled["output"]):
                    break
                time.sleep(0.05)
            a.kill()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # bounded: b's polls take it over and finish it
                polled = client.get(b.base_url + url, headers=auth).json()
                if polled["status"] == "completed":
                    break
                time.sleep(0.1)
            assert polled["status"] == "completed"
            attempts = polled["router"]["attempts"]
            assert attempts[0]["outcome"] == "taken_over" and attempts[0]["usage_estimated"] is True
            cost = polled["router"]["cost_usd"]
            spent = client.get(f"http://127.0.0.1:{b.port}/admin/v1/spend?by=key&id={created['id']}",
                               headers=ADMIN).json()["totals"]
        assert spent and spent[0]["usd"] == pytest.approx(cost, abs=1e-9)
        assert spent[0]["output_tokens"] == polled["usage"]["output_tokens"]
