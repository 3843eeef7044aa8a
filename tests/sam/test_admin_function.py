"""The admin function's entry point (functions/admin/handler.py): Mangum over the same app, every caller trusted
as an operator (the route is IAM-authorised), invoked here with the sample API Gateway event
(events/admin-create-key.json) against a SQLite store."""

from __future__ import annotations

import copy
import importlib.util
import json
import types
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
HANDLER = ROOT / "functions" / "admin" / "handler.py"
EVENT = ROOT / "events" / "admin-create-key.json"
CONFIG = """
auth: {store_keys: true}
models:
  - name: demo
    deployments:
      - {name: sim, provider: simulated, model: sim-1}
"""


class _Context:
    function_name = "unbroken-admin"
    aws_request_id = "0c1d2e3f-4a5b-4c6d-8e7f-9a0b1c2d3e4f"

    def get_remaining_time_in_millis(self) -> int:
        return 30_000


def _load_handler() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("unbroken_admin_entry", HANDLER)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def admin(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> types.ModuleType:
    config = tmp_path / "router.yaml"
    config.write_text(CONFIG, encoding="utf-8")
    for name in ("UNBROKEN_SECRETS", "UNBROKEN_CONFIG_SSM", "UNBROKEN_WORKER_FUNCTION", "AWS_LAMBDA_EXEC_WRAPPER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("UNBROKEN_CONFIG", str(config))
    monkeypatch.setenv("UNBROKEN_STORE", f"sqlite:///{tmp_path / 'admin.db'}")
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "unbroken-admin")
    return _load_handler()


def _event(method: str, path: str, body: Any = None) -> dict[str, Any]:
    event: dict[str, Any] = copy.deepcopy(json.loads(EVENT.read_text(encoding="utf-8")))
    event["httpMethod"] = event["requestContext"]["httpMethod"] = method
    event["path"] = path
    event["pathParameters"] = {"proxy": path.removeprefix("/admin/")}
    event["body"] = None if body is None else json.dumps(body)
    return event


def test_the_sample_event_creates_a_key_and_later_calls_never_show_its_secret(admin: types.ModuleType) -> None:
    event = json.loads(EVENT.read_text(encoding="utf-8"))
    assert event["resource"] == "/admin/{proxy+}" and event["requestContext"]["identity"]["userArn"]
    got = admin.handler(event, _Context())
    assert got["statusCode"] == 201, got
    created = json.loads(got["body"])
    assert created["secret"].startswith("sk-ub-") and created["tenant"] == "acme"
    assert created["budgets"]["daily_usd"] == 5 and created["limits"]["rpm"] == 60
    # The same container answers later events (one app, one store): list, read, revoke.
    listed = admin.handler(_event("GET", "/admin/v1/keys"), _Context())
    assert listed["statusCode"] == 200 and created["secret"] not in listed["body"]
    assert [k["id"] for k in json.loads(listed["body"])["data"]] == [created["id"]]
    revoked = admin.handler(_event("POST", f"/admin/v1/keys/{created['id']}/revoke"), _Context())
    assert revoked["statusCode"] == 200 and json.loads(revoked["body"])["revoked"] is True
    spend = admin.handler(_event("GET", "/admin/v1/spend"), _Context())
    assert spend["statusCode"] == 200 and json.loads(spend["body"])["object"] == "spend"


def test_errors_are_spec_error_objects(admin: types.ModuleType) -> None:
    missing = admin.handler(_event("GET", "/admin/v1/keys/key_nope"), _Context())
    assert missing["statusCode"] == 404
    assert json.loads(missing["body"])["error"]["code"] == "key_not_found"
    bad = admin.handler(_event("POST", "/admin/v1/keys", {"tenant": ""}), _Context())
    assert bad["statusCode"] == 400 and json.loads(bad["body"])["error"]["param"] == "tenant"


def test_the_handler_is_thin() -> None:
    code = [ln for ln in HANDLER.read_text(encoding="utf-8").splitlines() if ln.strip()]
    assert len(code) <= 20


def test_the_health_route_reads_the_figures_other_instances_shared(admin: types.ModuleType, tmp_path: Path) -> None:
    """The admin function routes nothing and runs no refresh loop (Mangum, lifespan off): its health answer reads
    what a gateway instance wrote to the shared store."""
    import asyncio

    from unbroken.journal.counters import CounterBatcher, CounterReader
    from unbroken.journal.sqlite import SQLiteStore
    from unbroken.routing.health import HealthBoard

    async def gateway_traffic() -> None:
        store = SQLiteStore(tmp_path / "admin.db")
        counters = CounterBatcher(store)
        board = HealthBoard()
        board.share(store, counters, CounterReader(store, counters))
        for _ in range(6):
            board.record_success("demo", "sim", 0.2, output_tokens=20, output_seconds=0.1, input_tokens=50)
        await counters.flush()
        await store.close()

    asyncio.run(gateway_traffic())
    got = admin.handler(_event("GET", "/admin/v1/health"), _Context())
    assert got["statusCode"] == 200, got
    body = json.loads(got["body"])
    sim = body["models"][0]["deployments"][0]
    assert body["shared"] is True and body["updated_at"] is not None
    assert sim["samples"] > 5 and sim["ttft_p50_ms"] is not None
