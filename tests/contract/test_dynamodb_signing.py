"""The DynamoDB store's requests are signed right.

- With fixed credentials and a fixed clock, the Authorization and X-Amz-Date the store sends are what botocore's
  own signer gives for the request as it went on the wire, and what a boto3 client sends for the same body.
- DynamoDB Local checks only that a request is signed, not the signature (shown below: a wrong secret passes), so
  a refusal of a bad signature cannot be tested here. Instead: after expiry, requests are signed with refreshed
  credentials (botocore's `RefreshableCredentials`), against DynamoDB Local.
"""

from __future__ import annotations

import asyncio
import datetime
import gc
import json
import uuid
import warnings
from typing import Any
from unittest import mock

import botocore.auth
import httpx
import pytest
from botocore.awsrequest import AWSRequest, AWSResponse
from botocore.credentials import Credentials, RefreshableCredentials

from tests.support.dynamodb_local import DynamoDBLocal
from unbroken.journal.dynamodb import DynamoDBStore

NOW = datetime.datetime(2026, 3, 4, 5, 6, 7)
KEY = {"pk": {"S": "resp#x"}, "sk": {"N": "0"}}


@pytest.fixture
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore's signer reads the time from here (the store's transport signs with it too)."""
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda *a, **k: NOW)


class Capture(httpx.AsyncBaseTransport):
    """Records each request as sent, then passes it on (to `inner`) or answers 200 `{}`."""

    def __init__(self, inner: httpx.AsyncBaseTransport | None = None) -> None:
        self.inner = inner
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        self.requests.append(request)
        if self.inner is not None:
            return await self.inner.handle_async_request(request)
        return httpx.Response(200, content=b"{}", headers={"content-type": "application/x-amz-json-1.0"})

    async def aclose(self) -> None:
        if self.inner is not None:
            await self.inner.aclose()


def botocore_signature(
    request: httpx.Request, credentials: Credentials, region: str, at: datetime.datetime
) -> dict[str, str]:
    """botocore's SigV4 at time `at` over the request as it went on the wire: its URL, body, two protocol headers."""
    reference = AWSRequest(
        method=request.method,
        url=str(request.url),
        data=request.content,
        headers={"Content-Type": request.headers["content-type"], "X-Amz-Target": request.headers["x-amz-target"]},
    )
    with mock.patch.object(botocore.auth, "get_current_datetime", lambda *a, **k: at):
        botocore.auth.SigV4Auth(credentials, "dynamodb", region).add_auth(reference)
    return {k.lower(): v for k, v in reference.headers.items()}


@pytest.mark.parametrize("token", [None, "session-token/with+chars=="])
@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("https://dynamodb.eu-west-1.amazonaws.com", "dynamodb.eu-west-1.amazonaws.com"),
        ("http://127.0.0.1:8123", "127.0.0.1:8123"),
    ],
)
async def test_signature_matches_botocore(fixed_clock: None, token: str | None, url: str, host: str) -> None:
    credentials = Credentials("AKIDEXAMPLE", "secret/key+x", token)
    capture = Capture()
    store = DynamoDBStore("journal", region="eu-west-1", endpoint_url=url, http_transport=capture,
                          credentials=credentials)
    await store._call("GetItem", TableName="journal", Key=KEY, ConsistentRead=True)
    await store.close()
    (sent,) = capture.requests
    expected = botocore_signature(sent, credentials, "eu-west-1", NOW)
    assert sent.headers["x-amz-date"] == expected["x-amz-date"] == "20260304T050607Z"
    assert sent.headers["authorization"] == expected["authorization"]
    assert sent.headers.get("x-amz-security-token") == token
    assert sent.headers["host"] == host  # what was signed (from the URL) is what was sent
    signed = sent.headers["authorization"].split("SignedHeaders=", 1)[1].split(",", 1)[0]
    expected_signed = "content-type;host;x-amz-date;" + ("x-amz-security-token;" if token else "") + "x-amz-target"
    assert signed == expected_signed


@pytest.mark.parametrize("token", [None, "TOKEN"])
def test_signature_matches_a_boto3_client(fixed_clock: None, token: str | None) -> None:
    """The same body, signed by our transport and by a whole boto3 client, gives the same Authorization."""
    import boto3

    seen: list[Any] = []

    class Raw:
        def stream(self, **kwargs: Any) -> Any:
            yield b"{}"

    def capture(request: Any, **kwargs: Any) -> AWSResponse:
        seen.append(request)
        return AWSResponse(request.url, 200, {}, Raw())

    client = boto3.client("dynamodb", region_name="eu-west-1", aws_access_key_id="AKIDEXAMPLE",
                          aws_secret_access_key="secret/key+x", aws_session_token=token)
    client.meta.events.register("before-send", capture)
    client.get_item(TableName="journal", Key=KEY, ConsistentRead=True)
    (boto,) = seen
    store = DynamoDBStore("journal", region="eu-west-1",
                          credentials=Credentials("AKIDEXAMPLE", "secret/key+x", token))
    transport = store._make_transport()
    assert transport.url == boto.url
    ours = transport.sign("DynamoDB_20120810.GetItem", boto.body, Credentials("AKIDEXAMPLE", "secret/key+x", token))
    assert ours["Authorization"] == boto.headers["Authorization"].decode()
    assert ours["X-Amz-Date"] == boto.headers["X-Amz-Date"].decode()


# -- against DynamoDB Local ------------------------------------------------------------------------------------------


@pytest.mark.dynamodb_local
async def test_dynamodb_local_checks_only_that_a_signature_is_there(ddb_local: DynamoDBLocal) -> None:
    """Why the next test exists: a wrong secret is accepted by DynamoDB Local, a missing signature is not."""
    wrong = DynamoDBStore("t", region="us-east-1", endpoint_url=ddb_local.endpoint_url,
                          credentials=Credentials("local", "not-the-secret"))
    assert "TableNames" in await wrong._call("ListTables")
    await wrong.close()
    async with httpx.AsyncClient() as client:
        unsigned = await client.post(
            ddb_local.endpoint_url + "/",
            content=b"{}",
            headers={"Content-Type": "application/x-amz-json-1.0", "X-Amz-Target": "DynamoDB_20120810.ListTables"},
        )
    assert unsigned.status_code == 400 and "MissingAuthenticationToken" in unsigned.text


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime.datetime.now(datetime.UTC)

    def __call__(self) -> datetime.datetime:
        return self.now


@pytest.mark.dynamodb_local
async def test_requests_after_expiry_are_signed_with_refreshed_credentials(ddb_local: DynamoDBLocal) -> None:
    clock = FakeClock()
    issued: list[str] = []

    def refresh() -> dict[str, str]:
        issued.append(f"AKID{len(issued) + 2}")
        return {
            "access_key": issued[-1],
            "secret_key": f"secret-{len(issued) + 1}",
            "token": f"token-{len(issued) + 1}",
            "expiry_time": (clock.now + datetime.timedelta(hours=1)).isoformat(),
        }

    credentials = RefreshableCredentials(
        "AKID1", "secret-1", "token-1", clock.now + datetime.timedelta(hours=1), refresh, "test", time_fetcher=clock
    )
    capture = Capture(httpx.AsyncHTTPTransport())
    table = f"signing-{uuid.uuid4().hex}"
    store = DynamoDBStore(table, region="us-east-1", endpoint_url=ddb_local.endpoint_url, http_transport=capture,
                          credentials=credentials)
    try:
        await store.create_table_if_missing()
        await store._call("PutItem", TableName=table, Item={**KEY, "v": {"S": "before"}})
        assert issued == []
        expiring = len(capture.requests)  # requests so far: signed with the first credentials
        clock.now += datetime.timedelta(minutes=55)  # inside botocore's refresh window (15 min before expiry)
        await store._call("PutItem", TableName=table, Item={**KEY, "v": {"S": "after"}})
        got = await store._call("GetItem", TableName=table, Key=KEY, ConsistentRead=True)
        assert got["Item"]["v"] == {"S": "after"}
        assert issued == ["AKID2"]  # refreshed once, not per request
        assert len(capture.requests) == expiring + 2
        for index, request in enumerate(capture.requests):
            expected = Credentials("AKID1", "secret-1", "token-1") if index < expiring else \
                Credentials("AKID2", "secret-2", "token-2")
            assert request.headers["authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={expected.access_key}/")
            assert request.headers["x-amz-security-token"] == expected.token
            at = datetime.datetime.strptime(request.headers["x-amz-date"], "%Y%m%dT%H%M%SZ")
            assert request.headers["authorization"] == botocore_signature(request, expected, "us-east-1", at)[
                "authorization"]
        await store._call("DeleteTable", TableName=table)
    finally:
        await store.close()
        await capture.aclose()  # the caller's transport: the store leaves it open


@pytest.mark.dynamodb_local
def test_one_store_on_two_event_loops(ddb_local: DynamoDBLocal) -> None:
    """The CLI creates the table under one `asyncio.run` and serves under another: the kept-alive pool of the
    first loop must not be reused on the second. (Its idle connection cannot be closed once its loop is gone: it
    is dropped, and collected here so that its ResourceWarning does not land in some later test.)"""
    table = f"loops-{uuid.uuid4().hex}"
    store = DynamoDBStore(table, region="us-east-1", endpoint_url=ddb_local.endpoint_url)

    async def use() -> dict[str, Any]:
        await store._call("PutItem", TableName=table, Item={**KEY, "v": {"S": json.dumps([1])}})
        got = await store._call("GetItem", TableName=table, Key=KEY, ConsistentRead=True)
        await store._call("DeleteTable", TableName=table)
        await store.close()
        return got

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        asyncio.run(store.create_table_if_missing())
        assert asyncio.run(use())["Item"]["v"] == {"S": "[1]"}
        gc.collect()
