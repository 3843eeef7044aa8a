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
