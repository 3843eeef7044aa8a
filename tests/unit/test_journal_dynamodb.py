"""DynamoDB store failure handling: throttling / 5xx / connection errors retried with a bound, conditional failures
mapped to Fenced / AlreadyExists / NotFound, ambiguous failures (the write may have landed) not misreported, big
appends split, and what goes on the wire.

Two fakes, both below the store's one transport (so signing, encoding and error parsing always run):
- `Scripted`: an `httpx.MockTransport` answering each request with the next scripted HTTP answer (or failure).
- `Flaky`: moto in process (tests/contract/moto_http.py), with connection failures injected before a request is
  sent or after it was applied (the answer lost).
"""

from __future__ import annotations

import base64
import json
import random
import time
import uuid
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from botocore.credentials import Credentials
from moto import mock_aws

from tests.contract.moto_http import MotoTransport
from unbroken.journal import dynamodb
from unbroken.journal.backends import open_store
from unbroken.journal.codec import encode_events
from unbroken.journal.dynamodb import DynamoDBStore
from unbroken.journal.store import (
    AlreadyExists,
    Fenced,
    NotFound,
    ResponseHeader,
    StoreError,
    StoreUnavailable,
)

FAR = 4_000_000_000  # an expiry far in the future
CREDS = Credentials("AKIDTEST", "secret")


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


def wire(value: Any) -> Any:
    """As DynamoDB's JSON protocol carries it (binary as base64)."""
    return json.loads(json.dumps(value, default=dynamodb._json_default))


def error(code: str, status: int = 400, **fields: Any) -> tuple[int, dict[str, Any]]:
    return status, {"__type": f"com.amazonaws.dynamodb.v20120810#{code}", "message": f"{code} happened", **fields}


Step = tuple[int, Any] | tuple[int, Any, dict[str, str]] | Exception


class Scripted:
    """Each request gets the next step: (status, JSON body or raw bytes[, extra headers]), or an exception raised
    as the transport's failure. Answers carry a correct x-amz-crc32 unless the step's headers say otherwise."""

    def __init__(self, *steps: Step) -> None:
        self.steps = list(steps)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        step = self.steps.pop(0)
        if isinstance(step, Exception):
            raise step
        status, body, *extra = step
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"content-type": "application/x-amz-json-1.0", "x-amz-crc32": str(zlib.crc32(data))}
        headers.update(extra[0] if extra else {})
        return httpx.Response(status, content=data, headers=headers)

    @property
    def ops(self) -> list[str]:
        return [r.headers["x-amz-target"].split(".", 1)[1] for r in self.requests]

    def done(self) -> bool:
        return not self.steps


def scripted(*steps: Step, **kwargs: Any) -> tuple[DynamoDBStore, Scripted]:
    script = Scripted(*steps)
    options: dict[str, Any] = {"max_attempts": 5, "backoff_base": 0.0, **kwargs}
    store = DynamoDBStore(
        "journal",
        region="eu-west-1",
        endpoint_url="https://dynamodb.eu-west-1.amazonaws.com",
        http_transport=httpx.MockTransport(script),
        credentials=CREDS,
        **options,
    )
    return store, script


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
async def test_throttling_and_5xx_are_retried(code: str, status: int) -> None:
    store, script = scripted(*[error(code, status)] * 3, (200, {"Item": wire(header_item())}))
    header = await store.get("r1", snapshots=False)
    assert header is not None and header.status == "in_progress"
    assert script.ops == ["GetItem"] * 4 and script.done()


async def test_retries_are_bounded() -> None:
    store, script = scripted(*[error("ThrottlingException")] * 5)
    with pytest.raises(StoreUnavailable):
        await store.get("r1")
    assert len(script.requests) == 5


async def test_other_client_errors_are_not_retried() -> None:
    store, script = scripted(error("AccessDeniedException"))
    with pytest.raises(StoreError) as caught:
        await store.get("r1")
    assert not isinstance(caught.value, StoreUnavailable)
    assert "AccessDeniedException" in str(caught.value) and len(script.requests) == 1


async def test_connection_failures_and_garbled_answers_are_retried() -> None:
    store, script = scripted(
        httpx.ConnectError("refused"),
        httpx.RemoteProtocolError("connection dropped"),
        (200, {"Item": {}}, {"x-amz-crc32": "1"}),  # body damaged on the way
        (502, b"<html>bad gateway</html>"),  # not JSON, not DynamoDB: a proxy
        (200, {"Item": wire(header_item())}),
    )
    header = await store.get("r1", snapshots=False)
    assert header is not None and script.done()


async def test_the_error_code_may_come_from_the_header_only() -> None:
    store, script = scripted(
        (400, b"", {"x-amzn-ErrorType": "ThrottlingException:http://internal.amazon.com/coral/"}),
        (400, b"{}", {"x-amzn-ErrorType": "UnrecognizedClientException:http://internal.amazon.com/coral/"}),
    )
    with pytest.raises(StoreError) as caught:
        await store.get("r1")
    assert "UnrecognizedClientException" in str(caught.value) and not isinstance(caught.value, StoreUnavailable)
    assert len(script.requests) == 2


async def test_transaction_conflict_is_retried() -> None:
    store, script = scripted(
        (200, {"Item": {"expires_at": {"N": str(FAR)}}}),
        error(
            "TransactionCanceledException",
            CancellationReasons=[{"Code": "None"}, {"Code": "TransactionConflict"}],
        ),
        (200, {}),
    )
    assert await store.append("r1", 0, [delta(0)]) is False
    assert script.ops == ["GetItem", "TransactWriteItems", "TransactWriteItems"]
    first, again = (json.loads(r.content) for r in script.requests[1:])
    assert first["ClientRequestToken"] and first["TransactItems"] == again["TransactItems"]


async def test_conditional_failure_is_fenced_without_retry() -> None:
    current = header_item(owner_epoch={"N": "1"}, last_seq={"N": "-1"})
    store, script = scripted(
        (200, {"Item": {"expires_at": {"N": str(FAR)}}}),
        error(
            "TransactionCanceledException",
            CancellationReasons=[{"Code": "None"}, {"Code": "ConditionalCheckFailed", "Item": wire(current)}],
        ),
    )
    with pytest.raises(Fenced, match="fenced by 1"):
        await store.append("r1", 0, [delta(0)])
    assert script.done()  # the header came with the error: no extra read


async def test_a_commit_to_an_expired_response_is_not_found() -> None:
    gone = header_item(expires_exact={"N": "1"})
    store, _ = scripted(
        (200, {"Item": {"expires_at": {"N": str(FAR)}}}),
        error(
            "TransactionCanceledException",
            CancellationReasons=[{"Code": "None"}, {"Code": "ConditionalCheckFailed", "Item": wire(gone)}],
        ),
    )
    with pytest.raises(NotFound):
        await store.append("r1", 0, [delta(0)])


@pytest.mark.parametrize(
    ("reasons", "what"),
    [
        ([{"Code": "ConditionalCheckFailed"}, {"Code": "None"}], "response id"),
        ([{"Code": "None"}, {"Code": "ConditionalCheckFailed"}], "idempotency key"),
    ],
)
async def test_create_with_a_used_id_or_key_already_exists(reasons: list[dict[str, str]], what: str) -> None:
    store, script = scripted(error("TransactionCanceledException", CancellationReasons=reasons))
    now = time.time()
    header = ResponseHeader(id="r1", tenant="t", created_at=now, expires_at=now + 60, idempotency_key="k")
    with pytest.raises(AlreadyExists, match=what):
        await store.create(header)
    assert script.ops == ["TransactWriteItems"]


async def test_create_of_an_existing_id_already_exists() -> None:
    store, _ = scripted(error("ConditionalCheckFailedException"))
    now = time.time()
    with pytest.raises(AlreadyExists):
        await store.create(ResponseHeader(id="r1", tenant="t", created_at=now, expires_at=now + 60))


async def test_take_over_fenced_by_the_item_in_the_error() -> None:
    store, script = scripted(error("ConditionalCheckFailedException", Item=wire(header_item(owner_epoch={"N": "3"}))))
    with pytest.raises(Fenced, match="epoch is 3"):
        await store.take_over("r1", 0, 100.0)
    assert script.ops == ["UpdateItem"]


async def test_request_cancel_of_a_missing_response() -> None:
    store, _ = scripted(error("ConditionalCheckFailedException"))
    assert await store.request_cancel("nope") is False


async def test_the_request_on_the_wire() -> None:
    item = header_item(extra={"B": b"\x00\xfe"})
    store, script = scripted((200, {}), (200, {"Item": wire(item)}))
    await store._call("PutItem", TableName="journal", Item={"pk": {"S": "x"}, "d": {"B": b"\xfe\x00"}})
    got = await store._call("GetItem", TableName="journal", Key=store._key("r1"), ConsistentRead=True)
    assert got == {"Item": item}  # binary decoded back to bytes
    put = script.requests[0]
    assert put.method == "POST" and str(put.url) == "https://dynamodb.eu-west-1.amazonaws.com/"
    assert put.headers["content-type"] == "application/x-amz-json-1.0"
    assert put.headers["x-amz-target"] == "DynamoDB_20120810.PutItem"
    assert put.headers["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDTEST/")
    assert "/eu-west-1/dynamodb/aws4_request" in put.headers["authorization"]
    assert json.loads(put.content)["Item"]["d"] == {"B": base64.b64encode(b"\xfe\x00").decode()}


async def test_no_credentials_is_unavailable_without_a_request(monkeypatch: pytest.MonkeyPatch) -> None:
    import botocore.session

    monkeypatch.setattr(botocore.session.Session, "get_credentials", lambda self: None)
    script = Scripted()
    store = DynamoDBStore("journal", region="eu-west-1", http_transport=httpx.MockTransport(script))
    with pytest.raises(StoreUnavailable, match="no AWS credentials"):
        await store.get("r1")
    assert script.requests == []


# -- against moto: connection errors and ambiguous failures ---------------------------------------------------------


class Flaky(httpx.AsyncBaseTransport):
    """moto in process; the listed operations first fail before being sent (`before`) or are applied and then
    lose their answer (`after`)."""

    def __init__(self) -> None:
        self.inner = MotoTransport()
        self.before: dict[str, int] = {}
        self.after: dict[str, int] = {}
        self.calls: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        op = request.headers["x-amz-target"].split(".", 1)[1]
        self.calls.append(op)
        if self.before.get(op, 0) > 0:
            self.before[op] -= 1
            raise httpx.ConnectError("connection refused", request=request)
        response = await self.inner.handle_async_request(request)
        if self.after.get(op, 0) > 0:
            self.after[op] -= 1
            raise httpx.ReadTimeout("applied, but the answer was lost", request=request)
        return response


@pytest.fixture
def flaky() -> Iterator[Flaky]:
    with mock_aws():
        yield Flaky()


async def _ready_store(flaky: Flaky, **kwargs: Any) -> tuple[DynamoDBStore, str]:
    store = DynamoDBStore(f"j-{uuid.uuid4().hex}", region="us-east-1", http_transport=flaky, backoff_base=0.0,
                          **kwargs)
    await store.create_table_if_missing()
    rid = f"resp_{uuid.uuid4().hex}"
    now = time.time()
    await store.create(ResponseHeader(id=rid, tenant="t", created_at=now, expires_at=now + 3600))
    return store, rid


async def test_connection_errors_are_retried(flaky: Flaky) -> None:
    store, rid = await _ready_store(flaky)
    flaky.before = {"TransactWriteItems": 2, "Query": 2}
    await store.append(rid, 0, [delta(0), delta(1)])
    assert await store.read_events(rid) == [delta(0), delta(1)]
    assert flaky.calls.count("TransactWriteItems") == 3


async def test_a_commit_whose_answer_was_lost_is_not_reported_as_fenced(flaky: Flaky) -> None:
    store, rid = await _ready_store(flaky)
    flaky.after = {"TransactWriteItems": 1}
    await store.append(rid, 0, [delta(0), delta(1)])
    await store.append(rid, 0, [delta(2)])
    assert await store.read_events(rid) == [delta(0), delta(1), delta(2)]


async def test_a_take_over_whose_answer_was_lost_still_wins(flaky: Flaky) -> None:
    store, rid = await _ready_store(flaky)
    flaky.after = {"UpdateItem": 1}
    assert await store.take_over(rid, 0, 123.5) == 1
    header = await store.get(rid)
    assert header is not None and header.owner_epoch == 1


async def test_connection_errors_past_the_bound(flaky: Flaky) -> None:
    store, rid = await _ready_store(flaky, max_attempts=3)
    flaky.before = {"TransactWriteItems": 3}
    with pytest.raises(StoreUnavailable):
        await store.append(rid, 0, [delta(0)])
    flaky.before = {}
    assert await store.read_events(rid) == []


def _noise(rng: random.Random, size: int) -> str:
    return base64.b64encode(rng.randbytes(size * 3 // 4)).decode()


async def test_an_append_too_big_for_one_transaction_is_split(flaky: Flaky, monkeypatch: pytest.MonkeyPatch) -> None:
    store, rid = await _ready_store(flaky)
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


async def test_a_single_event_too_big_is_refused(flaky: Flaky, monkeypatch: pytest.MonkeyPatch) -> None:
    store, rid = await _ready_store(flaky)
    monkeypatch.setattr(dynamodb, "TXN_MAX_BYTES", 10_000)
    with pytest.raises(StoreError):
        await store.append(rid, 0, [delta(0, _noise(random.Random(1), 50_000))])
    assert await store.read_events(rid) == []


async def test_create_table_is_idempotent(flaky: Flaky) -> None:
    store = DynamoDBStore(f"j-{uuid.uuid4().hex}", region="us-east-1", http_transport=flaky)
    assert await store.create_table_if_missing() is True
    assert await store.create_table_if_missing() is False
    ttl = (await store._call("DescribeTimeToLive", TableName=store.table))["TimeToLiveDescription"]
    assert ttl["AttributeName"] == "expires_at" and ttl["TimeToLiveStatus"] in ("ENABLED", "ENABLING")


def test_open_store_urls(tmp_path: Any) -> None:
    store = open_store("dynamodb://my-table?region=eu-west-1&endpoint_url=http://127.0.0.1:8000")
    assert isinstance(store, DynamoDBStore)
    assert (store.table, store.region, store.endpoint_url) == ("my-table", "eu-west-1", "http://127.0.0.1:8000")
    assert type(open_store("memory://")).__name__ == "MemoryStore"
    assert type(open_store(f"sqlite:///{tmp_path}/x.db")).__name__ == "SQLiteStore"


async def test_read_stops_at_a_batch_seen_half_written(flaky: Flaky, monkeypatch: pytest.MonkeyPatch) -> None:
    """Query is read-committed, not a snapshot: it can see some pieces of a transaction committing meanwhile. The
    reader must return the dense prefix of whole batches only."""
    monkeypatch.setattr(dynamodb, "PIECE_BYTES", 1024)
    store, rid = await _ready_store(flaky)
    rng = random.Random(3)
    first = [delta(i, _noise(rng, 1500)) for i in range(3)]
    await store.append(rid, 0, first)
    second = [delta(i, _noise(rng, 1500)) for i in range(3, 6)]
    await store.append(rid, 0, second)
    pieces = (
        await store._call(
            "Query",
            TableName=store.table,
            KeyConditionExpression="pk = :p AND sk >= :lo",
            ExpressionAttributeValues={":p": {"S": f"resp#{rid}"}, ":lo": {"N": str(6 * dynamodb.SEQ_STRIDE)}},
        )
    )["Items"]
    assert len(pieces) > 2  # the second batch spans several items
    await store._call("DeleteItem", TableName=store.table, Key={"pk": pieces[0]["pk"], "sk": pieces[0]["sk"]})
    assert await store.read_events(rid) == first
    assert await store.read_events(rid, 1) == first[2:]


# -- a first batch carried by the header -------------------------------------------------------------------------


async def _fresh(store: DynamoDBStore, **fields: Any) -> ResponseHeader:
    now = time.time()
    return ResponseHeader(id=f"resp_{uuid.uuid4().hex}", tenant="t", created_at=now, expires_at=now + 3600,
                          status="in_progress", lease_expires_at=now + 30, **fields)


async def _header_item(store: DynamoDBStore, rid: str) -> dict[str, Any]:
    got = await store._call("GetItem", TableName=store.table, Key=store._key(rid), ConsistentRead=True)
    item: dict[str, Any] = got["Item"]
    return item


async def test_a_create_with_its_first_batch_is_one_put_item_and_the_next_commit_moves_the_batch_out(
    flaky: Flaky,
) -> None:
    """The write a first token waits for is one PutItem (half a transaction's latency and WRU); the header, which
    every commit rewrites, carries the batch only until the next commit of events."""
    store, _ = await _ready_store(flaky)
    header = await _fresh(store)
    flaky.calls.clear()
    await store.create(header, [delta(0), delta(1)])
    assert flaky.calls == ["PutItem"]
    assert "iev" in await _header_item(store, header.id)
    assert await store.read_events(header.id) == [delta(0), delta(1)]
    assert await store.read_events(header.id, 0) == [delta(1)]
    assert await store.read_events(header.id, 1) == []

    flaky.calls.clear()
    await store.append(header.id, 0, [delta(2)], lease_expires_at=time.time() + 30)
    assert flaky.calls == ["TransactWriteItems"]
    item = await _header_item(store, header.id)
    assert "iev" not in item and "ifs" not in item and item["last_seq"] == {"N": "2"}
    assert await store.read_events(header.id) == [delta(0), delta(1), delta(2)]
    assert await store.read_events(header.id, 0) == [delta(1), delta(2)]
    flaky.calls.clear()
    await store.append(header.id, 0, [delta(3)])  # moved once: the next commit is the plain two-action one
    assert await store.read_events(header.id) == [delta(i) for i in range(4)]
    header_after = await store.get(header.id)
    assert header_after is not None and header_after.last_seq == 3


async def test_a_reader_that_sees_the_first_batch_in_the_header_and_in_its_own_item_takes_it_once(
    flaky: Flaky,
) -> None:
    """Query is read-committed: while the next commit moves the batch, a reader may see the header from before
    and the batch's item from after. Every event comes once, in order."""
    store, _ = await _ready_store(flaky)
    header = await _fresh(store)
    first = [delta(0), delta(1), delta(2)]
    await store.create(header, first)
    blob = (await _header_item(store, header.id))["iev"]["B"]
    # The items the next commit writes (the moved batch, then its own), as a Query sees them if it read the
    # header just before that commit and the items just after.
    moved = store._pieces(header.id, 0, 2, blob, FAR) + store._batch_items(header.id, [delta(3)], encode_events(
        [delta(3)]), FAR)
    for item in moved:
        await store._call("PutItem", TableName=store.table, Item=item)
    assert await store.read_events(header.id) == [*first, delta(3)]
    assert await store.read_events(header.id, 1) == [delta(2), delta(3)]


async def test_a_commit_moving_the_batch_that_loses_to_a_take_over_is_fenced(flaky: Flaky) -> None:
    owner, _ = await _ready_store(flaky)
    header = await _fresh(owner)
    await owner.create(header, [delta(0)])
    other = DynamoDBStore(owner.table, region="us-east-1", http_transport=flaky, backoff_base=0.0)
    assert await other.take_over(header.id, 0, time.time() + 30) == 1
    with pytest.raises(Fenced):
        await owner.append(header.id, 0, [delta(1)])
    assert "iev" in await _header_item(owner, header.id)  # nothing of the refused commit landed
    await other.append(header.id, 1, [delta(1)])  # the new owner learnt of the batch from its take-over
    assert "iev" not in await _header_item(owner, header.id)
    assert await owner.read_events(header.id) == [delta(0), delta(1)]


async def test_a_writer_that_never_saw_the_header_leaves_the_batch_in_it_and_stays_correct(flaky: Flaky) -> None:
    owner, _ = await _ready_store(flaky)
    header = await _fresh(owner)
    await owner.create(header, [delta(0)])
    stranger = DynamoDBStore(owner.table, region="us-east-1", http_transport=flaky, backoff_base=0.0)
    await stranger.append(header.id, 0, [delta(1)])
    assert "iev" in await _header_item(owner, header.id)
    assert await stranger.read_events(header.id) == [delta(0), delta(1)]
    assert await stranger.read_events(header.id, 0) == [delta(1)]


@pytest.mark.parametrize("case", ["idempotency key", "too many events", "too big"])
async def test_a_first_batch_the_header_cannot_carry_goes_by_transaction(
    flaky: Flaky, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _ = await _ready_store(flaky)
    header = await _fresh(store, idempotency_key="k1" if case == "idempotency key" else None)
    count = dynamodb.INLINE_BATCH_MAX_EVENTS + 1 if case == "too many events" else 3
    if case == "too big":
        monkeypatch.setattr(dynamodb, "INLINE_BATCH_MAX_BYTES", 16)
    events = [delta(i) for i in range(count)]
    flaky.calls.clear()
    await store.create(header, events)
    assert flaky.calls == ["TransactWriteItems"]
    assert "iev" not in await _header_item(store, header.id)
    assert await store.read_events(header.id) == events
    assert await store.read_events(header.id, count - 2) == events[-1:]


async def test_readers_starting_up_to_the_last_event_a_header_can_carry_find_it(flaky: Flaky) -> None:
    store, _ = await _ready_store(flaky)
    header = await _fresh(store)
    events = [delta(i) for i in range(dynamodb.INLINE_BATCH_MAX_EVENTS)]
    await store.create(header, events)
    assert "iev" in await _header_item(store, header.id)
    for after in (-1, 0, dynamodb.INLINE_BATCH_MAX_EVENTS - 2):
        assert await store.read_events(header.id, after) == events[after + 1 :]
    assert await store.read_events(header.id, dynamodb.INLINE_BATCH_MAX_EVENTS - 1) == []


async def test_a_read_from_before_the_move_that_lands_after_it_does_not_make_the_next_commit_move_again(
    flaky: Flaky,
) -> None:
    """A GET served by the writer's own instance races its commits: a header read before the move, answered
    after it, must not make the instance believe the header still carries the batch (its next commit would try
    to write the moved item again, and be refused)."""
    store, _ = await _ready_store(flaky)
    header = await _fresh(store)
    await store.create(header, [delta(0)])
    before_move = await _header_item(store, header.id)
    await store.append(header.id, 0, [delta(1)])
    store._remember(header.id, before_move)  # what `get` does with the answer it read before the move
    await store.append(header.id, 0, [delta(2)])
    assert await store.read_events(header.id) == [delta(0), delta(1), delta(2)]
