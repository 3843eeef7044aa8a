"""`unbroken keys create|list|revoke` and `unbroken spend` against a real `unbroken serve`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.server import RouterProcess, admin_config, sim_model

ADMIN_KEY = "sk-admin-cli"
CONFIG = yaml.safe_dump(admin_config(ADMIN_KEY, sim_model("demo", deployments=1), api_keys=[]))


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterProcess]:
    tmp = tmp_path_factory.mktemp("cli-keys")
    config = tmp / "router.yaml"
    config.write_text(CONFIG, encoding="utf-8")
    with RouterProcess(config, f"sqlite:///{tmp / 'r.db'}") as server:
        yield server


def _cli(router: RouterProcess, *args: str, admin_key: str | None = ADMIN_KEY
         ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "UNBROKEN_ADMIN_KEY"}
    if admin_key is not None:
        env["UNBROKEN_ADMIN_KEY"] = admin_key
    return subprocess.run([sys.executable, "-m", "unbroken.cli", *args, "--url", router.base_url],
                          capture_output=True, text=True, env=env, timeout=60)


def _respond(router: RouterProcess, secret: str) -> httpx.Response:
    with httpx.Client(timeout=30) as client:
        return client.post(router.base_url + "/responses", json={"model": "demo", "input": "hi"},
                           headers={"authorization": f"Bearer {secret}"})


def test_create_list_revoke_and_spend(router: RouterProcess) -> None:
    created = _cli(router, "keys", "create", "--tenant", "acme", "--name", "ci", "--model", "demo",
                   "--daily-usd", "5", "--rpm", "100")
    assert created.returncode == 0, created.stderr
    lines = dict(line.split(": ", 1) for line in created.stdout.splitlines() if ": " in line)
    secret = lines["secret"]
    key_id = created.stdout.split()[1]
    assert secret.startswith("sk-ub-") and key_id.startswith("key_")
    answered = _respond(router, secret)
    assert answered.status_code == 200
    cost = float(answered.headers["x-unbroken-cost-usd"])

    listed = _cli(router, "keys", "list", "--tenant", "acme")
    assert listed.returncode == 0 and key_id in listed.stdout and secret not in listed.stdout
    assert "active" in listed.stdout and "daily=$5" in listed.stdout and "rpm=100" in listed.stdout
    as_json = json.loads(_cli(router, "keys", "list", "--json").stdout)
    assert [k["id"] for k in as_json["data"]] == [key_id] and "secret" not in as_json["data"][0]

    # Spend, as JSON and readable.
    report = json.loads(_cli(router, "spend", "--by", "key", "--id", key_id, "--json").stdout)
    assert report["totals"][0]["usd"] == pytest.approx(cost, abs=1e-9)
    readable = _cli(router, "spend", "--by", "tenant")
    assert readable.returncode == 0 and "acme" in readable.stdout and "total" in readable.stdout
    deployments = _cli(router, "spend", "--by", "deployment", "--from", "2020-01-01", "--to", "2020-01-02")
    assert "nothing spent" in deployments.stdout

    revoked = _cli(router, "keys", "revoke", key_id)
    assert revoked.returncode == 0 and f"revoked {key_id}" in revoked.stdout
    assert _respond(router, secret).status_code == 401
    assert "revoked" in _cli(router, "keys", "list").stdout


def test_errors_are_said_plainly(router: RouterProcess) -> None:
    missing = _cli(router, "keys", "list", admin_key=None)
    assert missing.returncode == 1 and "no admin key" in missing.stderr
    wrong = _cli(router, "keys", "list", admin_key="sk-wrong")
    assert wrong.returncode == 1 and "401 invalid_admin_key" in wrong.stderr
    unknown = _cli(router, "keys", "revoke", "key_nope")
    assert unknown.returncode == 1 and "404 key_not_found" in unknown.stderr
    bad = _cli(router, "spend", "--from", "yesterday")
    assert bad.returncode == 1 and "400 invalid_request" in bad.stderr


def test_an_unreachable_router_is_said_plainly(tmp_path: Path) -> None:
    env = {**os.environ, "UNBROKEN_ADMIN_KEY": ADMIN_KEY}
    res = subprocess.run([sys.executable, "-m", "unbroken.cli", "keys", "list", "--url", "http://127.0.0.1:9"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 1 and "cannot reach" in res.stderr
