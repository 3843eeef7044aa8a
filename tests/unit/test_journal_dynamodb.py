"""DynamoDB store failure handling: throttling / 5xx / connection errors retried with a bound, conditional failures
mapped to Fenced, ambiguous failures (the write may have landed) not misreported, big appends split."""

from __future__ import annotations

import base64
import random
import time
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.exceptions import EndpointConnectionError, ReadTimeoutError
from botocore.stub import Stubber
from moto import mock_aws

from unbroken.journal import dynamodb
from unbroken.journal.dynamodb import DynamoDBStore
from unbroken.journal.store import Fenced, ResponseHeader, StoreError, StoreUnavailable, open_store

FAR = 4_000_000_000  # an expiry far in the future


def header_item(rid: str = "r1", **extra: Any) -> dict[str, Any]:
    item = {
        "pk": {"S": f"resp#{rid}"},
        "sk": {"N": "0"},
        "tenant": {"S": "t"},
        "created_at": {"N": "1"},
        "expires_at": {"N": str(FAR)},
        "expires_exact": {"N": str(FAR)},
        "status": {"S": "in_progress"},
        "owner_epoch": {"N": "0"},
        "lease_expires_at": {"N": "0"},
        "last_seq": {"N": "-1"},
        "req_inline": {"B": b"\x00{}"},
    }
    item.update(extra)
    return item


def delta(seq: int, text: str = "x") -> dict[str, Any]:
    return {
        "type": "response.output_text.delta",
        "sequence_number": seq,
        "item_id": "m",
        "output_index": 0,
        "content_index": 0,
        "delta": text,
        "logprobs": [],
    }


@pytest.fixture
def stubbed() -> Iterator[tuple[DynamoDBStore, Stubber]]:
    client = boto3.client("dynamodb", region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="s")
    store = DynamoDBStore("journal", client=client, max_attempts=5, backoff_base=0.0)
    with Stubber(client) as stub:
        yield store, stub
        stub.assert_no_pending_responses()


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("ProvisionedThroughputExceededException", 400),
        ("ThrottlingException", 400),
        ("RequestLimitExceeded", 400),
        ("InternalServerError", 500),
        ("ServiceUnavailable", 503),
    ],
)
async def test_throttling_and_5xx_are_retried(stubbed: tuple[DynamoDBStore, Stubber], code: str, status: int) -> None:
    store, stub = stubbed
    for _ in range(3):
        stub.add_client_error("get_item", service_error_code=code, http_status_code=status)
    stub.add_response("get_item", {"Item": header_item()})
    header = await store.get("r1", snapshots=False)
    assert header is not None and header.status == "in_progress"


async def test_retries_are_bounded(stubbed: tuple[DynamoDBStore, Stubber]) -> None:
    store, stub = stubbed
    for _ in range(5):
        stub.add_client_error("get_item", service_error_code="ThrottlingException", http_status_code=400)
    with pytest.raises(StoreUnavailable):
        await store.get("r1")


async def test_other_client_errors_are_not_retried(stubbed: tuple[DynamoDBStore, Stubber]) -> None:
    store, stub = stubbed
    stub.add_client_error("get_item", service_error_code="AccessDeniedException", http_status_code=400)
    with pytest.raises(StoreError) as caught:
        await store.get("r1")
    assert not isinstance(caught.value, StoreUnavailable)


async def test_transaction_conflict_is_retried(stubbed: tuple[DynamoDBStore, Stubber]) -> None:
    store, stub = stubbed
    stub.add_response("get_item", {"Item": {"expires_at": {"N": str(FAR)}}})
    stub.add_client_error(
        "transact_write_items",
        service_error_code="TransactionCanceledException",
        http_status_code=400,
        modeled_fields={"CancellationReasons": [{"Code": "None"}, {"Code": "TransactionConflict"}]},
    )
    stub.add_response("transact_write_items", {})
    assert await store.append("r1", 0, [delta(0)]) is False


async def test_conditional_failure_is_fenced_without_retry(stubbed: tuple[DynamoDBStore, Stubber]) -> None:
    store, stub = stubbed
    stub.add_response("get_item", {"Item": {"expires_at": {"N": str(FAR)}}})
    current = header_item(owner_epoch={"N": "1"}, last_seq={"N": "-1"})
    stub.add_client_error(
        "transact_write_items",
        service_error_code="TransactionCanceledException",
        http_status_code=400,
        modeled_fields={"CancellationReasons": [{"Code": "None"}, {"Code": "ConditionalCheckFailed", "Item": current}]},
    )
    with pytest.raises(Fenced):
        await store.append("r1", 0, [delta(0)])


# -- against moto: connection errors and ambiguous failures ---------------------------------------------------------


class FlakyClient:
    """Delegates to a real client; the listed calls first fail (`before`) or succeed and then fail (`after`)."""

    def __init__(self, real: Any, before: dict[str, int] | None = None, after: dict[str, int] | None = None) -> None:
        self.real = real
        self.before = dict(before or {})
        self.after = dict(after or {})
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.real, name)

        def call(**kwargs: Any) -> Any:
            self.calls.append(name)
            if self.before.get(name, 0) > 0:
                self.before[name] -= 1
                raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
            result = method(**kwargs)
            if self.after.get(name, 0) > 0:
                self.after[name] -= 1
                raise ReadTimeoutError(endpoint_url="http://127.0.0.1:1")  # applied, but the answer was lost
            return result

        return call


@pytest.fixture
def moto_client() -> Iterator[Any]:
    with mock_aws():
        yield boto3.client("dynamodb", region_name="us-east-1")


async def _ready_store(client: Any, **kwargs: Any) -> tuple[DynamoDBStore, str]:
    store = DynamoDBStore(f"j-{uuid.uuid4().hex}", client=client, backoff_base=0.0, **kwargs)
    await store.create_table_if_missing()
    rid = f"resp_{uuid.uuid4().hex}"
    now = time.time()
    await store.create(ResponseHeader(id=rid, tenant="t", created_at=now, expires_at=now + 3600))
    return store, rid


async def test_connection_errors_are_retried(moto_client: Any) -> None:
    flaky = FlakyClient(moto_client)
    store, rid = await _ready_store(flaky)
    flaky.before = {"transact_write_items": 2, "query": 2}
    await store.append(rid, 0, [delta(0), delta(1)])
    assert await store.read_events(rid) == [delta(0), delta(1)]
    assert flaky.calls.count("transact_write_items") == 3


async def test_a_commit_whose_answer_was_lost_is_not_reported_as_fenced(moto_client: Any) -> None:
    flaky = FlakyClient(moto_client)
    store, rid = await _ready_store(flaky)
    flaky.after = {"transact_write_items": 1}
    await store.append(rid, 0, [delta(0), delta(1)])
    await store.append(rid, 0, [delta(2)])
    assert await store.read_events(rid) == [delta(0), delta(1), delta(2)]


async def test_a_take_over_whose_answer_was_lost_still_wins(moto_client: Any) -> None:
    flaky = FlakyClient(moto_client)
    store, rid = await _ready_store(flaky)
    flaky.after = {"update_item": 1}
    assert await store.take_over(rid, 0, 123.5) == 1
    header = await store.get(rid)
    assert header is not None and header.owner_epoch == 1


async def test_connection_errors_past_the_bound(moto_client: Any) -> None:
    flaky = FlakyClient(moto_client)
    store, rid = await _ready_store(flaky, max_attempts=3)
    flaky.before = {"transact_write_items": 3}
    with pytest.raises(StoreUnavailable):
        await store.append(rid, 0, [delta(0)])
    flaky.before = {}
    assert await store.read_events(rid) == []


def _noise(rng: random.Random, size: int) -> str:
    return base64.b64encode(rng.randbytes(size * 3 // 4)).decode()


async def test_an_append_too_big_for_one_transaction_is_split(
    moto_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, rid = await _ready_store(moto_client)
    monkeypatch.setattr(dynamodb, "TXN_MAX_BYTES", 150_000)
    rng = random.Random(5)
    events = [delta(i, _noise(rng, 20_000)) for i in range(40)]  # ~600 KB compressed
    before = store.stats.commits
    await store.append(rid, 0, events, status="in_progress")
    assert store.stats.commits - before >= 4
    assert await store.read_events(rid) == events
    assert await store.read_events(rid, 17) == events[18:]
    header = await store.get(rid)
    assert header is not None and header.last_seq == 39 and header.status == "in_progress"


async def test_a_single_event_too_big_is_refused(moto_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    store, rid = await _ready_store(moto_client)
    monkeypatch.setattr(dynamodb, "TXN_MAX_BYTES", 10_000)
    with pytest.raises(StoreError):
        await store.append(rid, 0, [delta(0, _noise(random.Random(1), 50_000))])
    assert await store.read_events(rid) == []


async def test_create_table_is_idempotent(moto_client: Any) -> None:
    store = DynamoDBStore(f"j-{uuid.uuid4().hex}", client=moto_client)
    assert await store.create_table_if_missing() is True
    assert await store.create_table_if_missing() is False
    ttl = moto_client.describe_time_to_live(TableName=store.table)["TimeToLiveDescription"]
    assert ttl["AttributeName"] == "expires_at" and ttl["TimeToLiveStatus"] in ("ENABLED", "ENABLING")


def test_open_store_urls(tmp_path: Any) -> None:
    store = open_store("dynamodb://my-table?region=eu-west-1&endpoint_url=http://127.0.0.1:8000")
    assert isinstance(store, DynamoDBStore)
    assert (store.table, store.region, store.endpoint_url) == ("my-table", "eu-west-1", "http://127.0.0.1:8000")
    assert type(open_store("memory://")).__name__ == "MemoryStore"
    assert type(open_store(f"sqlite:///{tmp_path}/x.db")).__name__ == "SQLiteStore"
