"""Fixtures for the store contract suite: one `store` fixture parametrized over every implementation.

- memory: `MemoryStore`.
- sqlite: `SQLiteStore` on a fresh file.
- moto: `DynamoDBStore` inside moto's `mock_aws`, its httpx requests handed to moto in process (moto_http.py):
  fast, and still the whole signed JSON exchange.
- ddb_local: `DynamoDBStore` against DynamoDB Local (Amazon's jar, Java 17), started once per test session, that is
  once per xdist worker, on a free port; a fresh table per test. If the jar is not installed these tests FAIL with
  instructions: CI installs it (`make dynamodb-local`), and a silent skip would hide a whole backend.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.support.dynamodb_local import DynamoDBLocal, DynamoDBLocalMissing
from unbroken.journal.store import Store

STORE_KINDS = ["memory", "sqlite", "moto", pytest.param("ddb_local", marks=pytest.mark.dynamodb_local)]


class Clock:
    """Wall-clock time plus an offset the test can move forward (for expiry), never backward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@pytest.fixture(scope="session")
def ddb_local() -> Iterator[DynamoDBLocal]:
    try:
        server = DynamoDBLocal().start()
    except DynamoDBLocalMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def make_store(kind: str, request: pytest.FixtureRequest, tmp_path: object, clock: Clock) -> AsyncIterator[Store]:
    if kind == "memory":
        from unbroken.journal.memory import MemoryStore

        store: Store = MemoryStore(clock=clock)
        yield store
    elif kind == "sqlite":
        from unbroken.journal.sqlite import SQLiteStore

        store = SQLiteStore(f"{tmp_path}/journal.db", clock=clock)
        yield store
        await store.close()
    elif kind == "moto":
        from moto import mock_aws

        from tests.contract.moto_http import MotoTransport
        from unbroken.journal.dynamodb import DynamoDBStore

        with mock_aws():
            store = DynamoDBStore(f"journal-{uuid.uuid4().hex}", region="us-east-1", clock=clock,
                                  http_transport=MotoTransport())
            await store.create_table_if_missing()
            yield store
            await store.close()
    elif kind == "ddb_local":
        from unbroken.journal.dynamodb import DynamoDBStore

        server: DynamoDBLocal = request.getfixturevalue("ddb_local")
        table = f"journal-{uuid.uuid4().hex}"
        store = DynamoDBStore(table, region="us-east-1", endpoint_url=server.endpoint_url, clock=clock)
        await store.create_table_if_missing()
        yield store
        await store._call("DeleteTable", TableName=table)
        await store.close()
    else:  # pragma: no cover
        raise AssertionError(kind)


@pytest.fixture(params=STORE_KINDS)
async def store(request: pytest.FixtureRequest, tmp_path: object, clock: Clock) -> AsyncIterator[Store]:
    async for made in make_store(request.param, request, tmp_path, clock):
        yield made


@pytest.fixture
def store_kind(store: Store, request: pytest.FixtureRequest) -> str:
    return str(request.node.callspec.params["store"])


@pytest.fixture
async def twin(store: Store, clock: Clock) -> AsyncIterator[Store]:
    """A second store instance on the same backend (same file / table), as another process would have."""
    from unbroken.journal.dynamodb import DynamoDBStore
    from unbroken.journal.sqlite import SQLiteStore

    if isinstance(store, SQLiteStore):
        other: Store = SQLiteStore(store.path, clock=clock)
    elif isinstance(store, DynamoDBStore):
        other = DynamoDBStore(
            store.table,
            region=store.region,
            endpoint_url=store.endpoint_url,
            clock=clock,
            http_transport=store._http_transport,
        )
    else:
        yield store  # memory is process-local: the same instance is the only sharing there is
        return
    yield other
    await other.close()
