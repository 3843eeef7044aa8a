"""Two `unbroken serve` processes on one SQLite store: a deployment that fails for the first process's traffic only
is avoided by the second within the staleness bound (README "Deployment health": 10 s), although the second never
saw it fail. The second process's view is read from its operator health endpoint, and a request to it shows which
deployment served (`X-Unbroken-Deployment`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.support.client import TIMEOUT, headers, post_json
from tests.support.server import RouterProcess, base_config, sim_model
from unbroken.routing.health import STALENESS_BOUND_SECONDS

ADMIN_KEY = "sk-admin-5c1e"
# Bounded poll: long enough to tell "late" from "never" in the failure message; the assertion is the bound.
POLL_SECONDS = 3 * STALENESS_BOUND_SECONDS


def health_of(process: RouterProcess, deployment: str) -> dict[str, Any]:
    with httpx.Client(timeout=TIMEOUT) as client:
        response = client.get(f"{process.base_url.removesuffix('/v1')}/admin/v1/health", headers=headers(ADMIN_KEY))
    assert response.status_code == 200, response.text
    model = next(m for m in response.json()["models"] if m["name"] == "demo")
    found: dict[str, Any] = next(d for d in model["deployments"] if d["name"] == deployment)
    return found


def served_by(process: RouterProcess, metadata: dict[str, str] | None = None) -> str:
    response = post_json(process.base_url, "/responses",
                         {"model": "demo", "input": "Which one answers?", "metadata": metadata or {}})
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "completed"
    return response.headers["x-unbroken-deployment"]


def test_a_deployment_failing_on_one_process_is_avoided_by_the_other(tmp_path: Path) -> None:
    data = base_config(sim_model("demo", 2))
    data["auth"] = {"admin_keys": [{"key": ADMIN_KEY, "tenant": "ops"}]}
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump(data))
    store = f"sqlite:///{tmp_path / 'journal.db'}"
    with RouterProcess(config, store) as one, RouterProcess(config, store) as two:
        assert served_by(two) == "sim-0"  # both healthy: the first configured serves
        assert health_of(two, "sim-0")["circuit"] == "closed"

        # Process one's traffic: the first attempt of every response fails (on sim-0, first in the ranking); sim-1
        # answers. Three in a row open sim-0's circuit in process one.
        for _ in range(3):
            assert served_by(one, {"sim_fault": "http:503,none"}) == "sim-1"
        failed_at = time.monotonic()
        assert health_of(one, "sim-0")["circuit"] == "open"

        # Process two never saw sim-0 fail; it learns through the store.
        deadline = failed_at + POLL_SECONDS
        seen: dict[str, Any] = {}
        while time.monotonic() < deadline:
            seen = health_of(two, "sim-0")
            if seen["circuit"] == "open":
                break
            time.sleep(0.1)
        avoided_after = time.monotonic() - failed_at
        assert seen["circuit"] == "open", f"process two still sees {seen} after {avoided_after:.1f}s"
        assert avoided_after <= STALENESS_BOUND_SECONDS, f"process two took {avoided_after:.1f}s"
        assert "consecutive failures" in seen["circuit_reason"]
        assert served_by(two) == "sim-1"  # routed away from the failing deployment

        # The figures are shared too: process two shows process one's failures on sim-0 within the same bound.
        while time.monotonic() < deadline:
            seen = health_of(two, "sim-0")
            if (seen["error_rate"] or 0) > 0.5:
                break
            time.sleep(0.1)
        assert seen["error_rate"] is not None and seen["error_rate"] > 0.5
        assert time.monotonic() - failed_at <= STALENESS_BOUND_SECONDS
        assert health_of(two, "sim-1")["samples"] > 2  # one's three answers and two's own, decayed
