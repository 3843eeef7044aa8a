"""`unbroken serve --store dynamodb://TABLE?region=R&endpoint_url=U` against DynamoDB Local: a journaled stream
and its resume from the store."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import httpx
import yaml

from tests.support.client import TIMEOUT, headers, post_stream
from tests.support.server import RouterProcess, base_config, sim_model
from tests.support.sse import assert_well_formed, parse_sse

ROOT = Path(__file__).resolve().parents[2]


def test_serve_journals_to_dynamodb_local(ddb_local: object, tmp_path: Path) -> None:
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump(base_config(sim_model("demo", deployments=1, length=30))))
    endpoint = ddb_local.endpoint_url  # type: ignore[attr-defined]
    store = f"dynamodb://journal-{uuid.uuid4().hex[:12]}?region=us-east-1&endpoint_url={endpoint}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with RouterProcess(config, store, env=env, extra_args=["--create-table"]) as router:
        response, stream = post_stream(router.base_url, {"model": "demo", "input": "into dynamodb"})
        assert response.status_code == 200
        assert_well_formed(stream)
        rid = stream.response["id"]
        with httpx.Client(timeout=TIMEOUT) as client, client.stream(
                "GET", f"{router.base_url}/responses/{rid}", params={"stream": "true", "starting_after": "4"},
                headers=headers()) as r:
            replay = parse_sse(r.read(), first_seq=5)
    assert replay.events == stream.events[5:]


def test_keys_budgets_and_spend_on_dynamodb_local(ddb_local: object, tmp_path: Path) -> None:
    """The admin API and a store key over DynamoDB: created, used, held to its budget, revoked; spend read back."""
    admin = {"authorization": "Bearer sk-admin-ddb"}
    cfg = base_config(sim_model("demo", deployments=1, length=30))
    cfg["auth"] = {"admin_keys": [{"key": "sk-admin-ddb", "tenant": "ops"}]}
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump(cfg))
    endpoint = ddb_local.endpoint_url  # type: ignore[attr-defined]
    store = f"dynamodb://keys-{uuid.uuid4().hex[:12]}?region=us-east-1&endpoint_url={endpoint}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with RouterProcess(config, store, env=env, extra_args=["--create-table"]) as router, \
            httpx.Client(timeout=TIMEOUT) as client:
        root = router.base_url.removesuffix("/v1")
        created = client.post(f"{root}/admin/v1/keys", headers=admin,
                              json={"tenant": "acme", "budgets": {"daily_usd": 0.000001}})
        assert created.status_code == 201, created.text
        key = created.json()
        auth = {"authorization": f"Bearer {key['secret']}"}
        body = {"model": "demo", "input": "into dynamodb", "store": False}
        first = client.post(f"{router.base_url}/responses", headers=auth, json=body)
        assert first.status_code == 200, first.text
        refused = client.post(f"{router.base_url}/responses", headers=auth, json=body)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "budget_exceeded"
        spent = client.get(f"{root}/admin/v1/spend", params={"by": "key", "id": key["id"]}, headers=admin).json()
        assert spent["totals"][0]["usd"] == float(first.headers["x-unbroken-cost-usd"])
        assert [k["id"] for k in client.get(f"{root}/admin/v1/keys", headers=admin).json()["data"]] == [key["id"]]
        assert client.post(f"{root}/admin/v1/keys/{key['id']}/revoke", headers=admin).status_code == 200
        gone = client.get(f"{router.base_url}/models", headers=auth)
        assert gone.status_code == 401 and gone.json()["error"]["code"] == "api_key_revoked"
