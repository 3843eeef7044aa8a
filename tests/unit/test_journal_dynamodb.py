"""DynamoDB store failure handling: throttling / 5xx / connection errors retried with a bound, conditional failures
mapped to Fenced, ambiguous failures (the write may have landed) not misreported, big appends split."""

from __future__ import annotations

import base64
import json
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
from unbroken.journal.backends import open_store
from unbroken.journal.dynamodb import DynamoDBStore
from unbroken.journal.store import Fenced, ResponseHeader, StoreError, StoreUnavailable

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


# -- the lean HTTP transport ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "session-token/with+chars=="])
@pytest.mark.parametrize("url", ["https://dynamodb.eu-west-1.amazonaws.com", "http://127.0.0.1:8123"])
def test_sigv4_matches_botocore(monkeypatch: pytest.MonkeyPatch, token: str | None, url: str) -> None:
    import datetime

    import botocore.auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    from unbroken.journal.ddb_http import SigV4

    now = datetime.datetime(2026, 3, 4, 5, 6, 7)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda *a, **k: now)
    body = b'{"TableName":"journal","Key":{"pk":{"S":"resp#x"},"sk":{"N":"0"}}}'
    target = "DynamoDB_20120810.GetItem"
    request = AWSRequest(
        method="POST",
        url=url + "/",
        data=body,
        headers={"Content-Type": "application/x-amz-json-1.0", "X-Amz-Target": target},
    )
    botocore.auth.SigV4Auth(Credentials("AKIDEXAMPLE", "secret/key+x", token), "dynamodb", "eu-west-1").add_auth(
        request
    )
    host = url.split("://", 1)[1]
    when = now.replace(tzinfo=datetime.UTC).timestamp()
    ours = SigV4("eu-west-1").headers(host, "/", target, body, ("AKIDEXAMPLE", "secret/key+x", token), now=when)
    assert ours["authorization"] == request.headers["Authorization"]
    assert ours["x-amz-date"] == request.headers["X-Amz-Date"]


class ScriptedDynamoDB:
    """A stdlib HTTP server on 127.0.0.1 answering each POST with the next scripted (status, body), or dropping
    the connection for None."""

    def __init__(self, script: list[tuple[int, dict[str, Any]] | None]) -> None:
        import http.server
        import threading

        self.script = list(script)
        self.requests: list[tuple[dict[str, str], bytes]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                step = outer.script.pop(0)
                if step is None:
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                status, payload = step
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/x-amz-json-1.0")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


async def test_http_transport_retries_and_decodes() -> None:
    item = header_item(req_inline={"B": base64.b64encode(b'\x00{"a":1}').decode()}, extra={"B": "AAE="})
    server = ScriptedDynamoDB(
        [
            (500, {"__type": "com.amazonaws.dynamodb.v20120810#InternalServerError", "message": "oops"}),
            None,  # connection dropped
            (400, {"__type": "com.amazonaws.dynamodb.v20120810#ThrottlingException", "message": "slow down"}),
            (200, {"Item": item}),
            (400, {"__type": "com.amazonaws.dynamodb.v20120810#AccessDeniedException", "Message": "no"}),
        ]
    )
    store = DynamoDBStore("journal", region="eu-west-1", endpoint_url=server.url, backoff_base=0.0)
    try:
        header = await store.get("r1")
        assert header is not None and header.request == {"a": 1}
        assert len(server.requests) == 4
        headers, body = server.requests[-1]
        assert headers["x-amz-target"] == "DynamoDB_20120810.GetItem"
        assert headers["authorization"].startswith("AWS4-HMAC-SHA256 Credential=")
        assert "/eu-west-1/dynamodb/aws4_request" in headers["authorization"]
        assert json.loads(body) == {"TableName": "journal", "Key": store._key("r1"), "ConsistentRead": True}
        with pytest.raises(StoreError) as caught:
            await store.get("r1")
        assert "AccessDenied" in str(caught.value) and not isinstance(caught.value, StoreUnavailable)
    finally:
        await store.close()
        server.close()


async def test_http_transport_sends_binary_as_base64() -> None:
    from unbroken.journal.ddb_http import HttpTransport

    server = ScriptedDynamoDB([(200, {"Attributes": {"d": {"B": base64.b64encode(b"\xfe\x00").decode()}}})])
    transport = HttpTransport(server.url, "us-east-1", lambda: ("a", "b", None))
    try:
        result = transport("put_item", {"TableName": "t", "Item": {"d": {"B": b"\xfe\x00"}}})
        assert result == {"Attributes": {"d": {"B": b"\xfe\x00"}}}
        assert json.loads(server.requests[0][1])["Item"]["d"]["B"] == base64.b64encode(b"\xfe\x00").decode()
    finally:
        transport.close()
        server.close()


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'5\r\n{"Ite\r\n9;x=y\r\nm": {}}  \r\n0\r\nX-Trailer: 1\r\n\r\n',
        b'HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{"Item": {}}',
        b'HTTP/1.1 200 OK\r\ncontent-length: 12\r\nx-amz-crc32: 1\r\n\r\n{"Item": {}}',
    ],
)
def test_http_transport_reads_every_framing(response: bytes) -> None:
    import socket
    import threading

    from unbroken.journal.ddb_http import HttpTransport

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)  # every wait in the fake server is bounded

    def serve() -> None:
        conn, _ = listener.accept()
        conn.settimeout(10)
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(
                next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
            )
            while len(body) < length:
                body += conn.recv(65536)
            conn.sendall(response)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    transport = HttpTransport(f"http://127.0.0.1:{listener.getsockname()[1]}", "us-east-1", lambda: ("a", "b", None))
    try:
        assert transport("get_item", {"TableName": "t"}) == {"Item": {}}
    finally:
        transport.close()
        thread.join(10)
        listener.close()


async def test_read_stops_at_a_batch_seen_half_written(moto_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Query is read-committed, not a snapshot: it can see some pieces of a transaction committing meanwhile. The
    reader must return the dense prefix of whole batches only."""
    monkeypatch.setattr(dynamodb, "PIECE_BYTES", 1024)
    store, rid = await _ready_store(moto_client)
    rng = random.Random(3)
    first = [delta(i, _noise(rng, 1500)) for i in range(3)]
    await store.append(rid, 0, first)
    second = [delta(i, _noise(rng, 1500)) for i in range(3, 6)]
    await store.append(rid, 0, second)
    pieces = moto_client.query(
        TableName=store.table,
        KeyConditionExpression="pk = :p AND sk >= :lo",
        ExpressionAttributeValues={":p": {"S": f"resp#{rid}"}, ":lo": {"N": str(6 * dynamodb.SEQ_STRIDE)}},
    )["Items"]
    assert len(pieces) > 2  # the second batch spans several items
    moto_client.delete_item(TableName=store.table, Key={"pk": pieces[0]["pk"], "sk": pieces[0]["sk"]})
    assert await store.read_events(rid) == first
    assert await store.read_events(rid, 1) == first[2:]
