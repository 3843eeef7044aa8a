"""`GET /admin/v1/health` through a real server: an admin key is needed (401 otherwise, the spec's error object);
after traffic it shows the deployments' live figures and circuit; a switched-off deployment shows why."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.client import TIMEOUT, headers, post_json
from tests.support.server import API_KEY, RouterThread, base_config, sim_model
from unbroken.journal.sqlite import SQLiteStore

ADMIN_KEY = "sk-admin-3b9d"
OFF = {"name": "keyless", "provider": "anthropic", "model": "claude-sonnet-4-5",
       "api_key": "${UNBROKEN_TEST_ABSENT_KEY}"}


def config() -> dict[str, Any]:
    served = sim_model("demo", 2)
    served["deployments"].append(OFF)
    data = base_config(served, sim_model("dark", 1) | {"deployments": [OFF | {"name": "only-off"}]})
    data["auth"] = {"admin_keys": [{"key": ADMIN_KEY, "tenant": "ops"}]}
    return data


@pytest.fixture(scope="module")
def router() -> Iterator[RouterThread]:
    with RouterThread(config()) as server:
        yield server


def health(base_url: str, key: str | None = ADMIN_KEY) -> httpx.Response:
    root = base_url.removesuffix("/v1")
    with httpx.Client(timeout=TIMEOUT) as client:
        return client.get(f"{root}/admin/v1/health", headers=headers(key) if key is not None else {})


def deployment(body: dict[str, Any], model: str, name: str) -> dict[str, Any]:
    m = next(m for m in body["models"] if m["name"] == model)
    return next(d for d in m["deployments"] if d["name"] == name)


@pytest.mark.parametrize("key", [None, "sk-wrong", API_KEY])
def test_refused_without_an_admin_key(router: RouterThread, key: str | None) -> None:
    response = health(router.base_url, key)
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["type"] and error["code"] == "invalid_admin_key" and error["message"]


def test_a_switched_off_deployment_shows_why(router: RouterThread) -> None:
    response = health(router.base_url)
    assert response.status_code == 200, response.text
    body = response.json()
    off = deployment(body, "demo", "keyless")
    assert off["enabled"] is False
    assert off["off_reason"] == "no key in the environment: UNBROKEN_TEST_ABSENT_KEY is unset or empty"
    assert "circuit" not in off
    dark = next(m for m in body["models"] if m["name"] == "dark")
    assert dark["served"] is False and dark["deployments"][0]["off_reason"].startswith("no key in the environment")
    on = deployment(body, "demo", "sim-0")
    assert on["enabled"] is True and on["off_reason"] is None and on["circuit"] == "closed"


def test_figures_after_traffic(router: RouterThread) -> None:
    before = deployment(health(router.base_url).json(), "demo", "sim-1")
    for i in range(3):  # failures_to_open
        # The first attempt of each response fails, whoever gets it: sim-0 fails, sim-1 answers.
        response = post_json(router.base_url, "/responses",
                             {"model": "demo", "input": f"hello {i}", "metadata": {"sim_fault": "http:500,none"}})
        assert response.status_code == 200, response.text
        assert response.headers["x-unbroken-deployment"] == "sim-1"
    for i in range(2):  # sim-0's circuit is open: sim-1 first (five first tokens: enough for quantiles)
        response = post_json(router.base_url, "/responses", {"model": "demo", "input": f"again {i}"})
        assert response.headers["x-unbroken-deployment"] == "sim-1"
    body = health(router.base_url).json()
    assert body["object"] == "router.health" and body["shared"] is False
    first, second = deployment(body, "demo", "sim-0"), deployment(body, "demo", "sim-1")
    assert first["circuit"] == "open" and "consecutive failures" in first["circuit_reason"]
    assert first["error_rate"] == 1.0 and first["samples"] > 2.5  # decayed: about 3
    # Five attempts, each weighed by 0.5 ** (age of its 10 s window's middle / 30 s): at least 0.89 within a window
    # (as low as 4.45 when the test runs late in one), so "more than four" is what tells five from four.
    assert second["samples"] > before["samples"] + 4 and second["error_rate"] == 0
    assert second["circuit"] == "closed"
    assert second["ttft_p50_ms"] is not None and second["ttft_p95_ms"] >= second["ttft_p50_ms"]
    assert second["mean_output_tokens"] == 40 and second["mean_input_tokens"] > 0
    assert second["tokens_per_s"] is not None and second["tokens_per_s"] > 0
    assert second["cache_hit_rate"] == 0 and second["rate_limit_rate"] == 0
    assert second["last_attempt_window"] is not None and second["last_attempt_window"] <= time.time()


def test_with_a_store_the_figures_come_from_the_shared_windows(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "journal.db"))
    with RouterThread(config(), store=store) as server:
        assert health(server.base_url).json()["shared"] is True
        response = post_json(server.base_url, "/responses", {"model": "demo", "input": "hello"})
        assert response.status_code == 200, response.text
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the first flush (2 s) and refresh (1 s) after the request
            body = health(server.base_url).json()
            if body["updated_at"] is not None and deployment(body, "demo", "sim-0")["samples"] > 0:
                break
            time.sleep(0.2)
        assert 0.5 < deployment(body, "demo", "sim-0")["samples"] <= 1  # one attempt, decayed by seconds
        assert body["staleness_bound_seconds"] == 10.0
