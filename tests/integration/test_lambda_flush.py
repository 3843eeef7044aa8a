"""On Lambda (the app built with the Web Adapter's environment) a request's spend and rate-window increments are in
the store by the time its response has ended, streamed or not: a frozen environment leaves nothing pending."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from tests.support.client import TIMEOUT, headers, post_stream
from tests.support.server import RouterThread, base_config, sim_model
from unbroken.durable import spend
from unbroken.journal.sqlite import SQLiteStore

LAMBDA_ENV = {"AWS_LAMBDA_FUNCTION_NAME": "unbroken-gateway", "AWS_LAMBDA_EXEC_WRAPPER": "/opt/bootstrap"}


def _stored(path: Path, key: str) -> dict[str, float]:
    async def read() -> dict[str, float]:
        store = SQLiteStore(str(path))  # another connection: only what was written, nothing pending
        try:
            return (await store.get_counters([key])).get(key, {})
        finally:
            await store.close()

    return asyncio.run(read())


def test_on_lambda_the_counters_are_flushed_before_the_response_ends(tmp_path: Path) -> None:
    db = tmp_path / "lambda.db"
    with RouterThread(base_config(sim_model("demo")), SQLiteStore(str(db)), lambda_env=LAMBDA_ENV) as router:
        assert router.runtime.counters.flush_seconds >= 2  # the loop alone would leave a gap this long
        key = spend.spend_key("tenant", "t1", spend.day_of(time.time()))
        with httpx.Client(timeout=TIMEOUT) as client:
            r = client.post(router.base_url + "/responses", headers=headers(),
                            json={"model": "demo", "input": "counted on lambda", "store": False})
        assert r.status_code == 200
        first = _stored(db, key)
        assert first["requests"] == 1 and first["usd"] == float(r.headers["x-unbroken-cost-usd"])
        _, stream = post_stream(router.base_url, {"model": "demo", "input": "streamed on lambda"})
        second = _stored(db, key)
        assert second["requests"] == 2
        assert second["usd"] == pytest.approx(first["usd"] + stream.response["router"]["cost_usd"], abs=1e-12)
