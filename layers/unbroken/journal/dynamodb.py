"""DynamoDB store: one on-demand table, `pk` (S) + `sk` (N), TTL on `expires_at`.

Items of one response, all under `pk = resp#<id>`:
- `sk = 0`: the header. Kept small (it is rewritten by every commit and a write costs 1 WRU per KB), so request and
  response snapshots live inline only when tiny and otherwise in snapshot items. A response created with its
  first batch (no Idempotency-Key, a small batch) carries that batch in the header too (`iev`, from `ifs`), so its
  create is one PutItem, not a transaction: the write its first token waits for is the cheapest DynamoDB has. The
  next commit of events moves the batch to its own item (one more Put in its transaction, and REMOVE), so the
  header, rewritten by every commit, is small again from there on; a reader whose start could fall in that batch
  includes the header in its Query and takes each event once, wherever it finds it.
- `sk = (last_seq + 1) * 1000 + piece`: event batches. A batch is one compressed blob (see codec.py) cut into pieces
  of at most `PIECE_BYTES`; every piece carries `first_seq`, `last_seq` and `pieces`. Keying by `last_seq` lets a
  resume after N start its Query at the first batch holding N + 1, without an index.
- `sk = -(nonce * 1000 + i + 1)`: piece i of a snapshot blob. The nonce is random per snapshot write, so the pieces
  are written (plain, cheaper writes) before the header that references them, and never overwrite a live snapshot.
  A superseded snapshot is left for TTL / `delete` rather than deleted, so a reader can never see a half-gone one.
Plus the idempotency item `pk = idem#<len(tenant)>:<tenant>#<key>`, `sk = 0`, written with the header on create.

Counters are one item each, `pk = ctr#<key>`, `sk = 0`, a number attribute `c_<field>` per field grown with `ADD`
(one UpdateItem per key; increments commute, so no condition beyond "not expired"). Records of a kind share
`pk = rec#<kind>` so a Query lists them; `sk` is a 48-bit hash of the name, which is kept in `name`.

A commit of events is one `TransactWriteItems`: Put of each piece (`attribute_not_exists(pk)`) + Update of the header
conditional on `owner_epoch` and `last_seq`, so a zombie writer can never make anything visible. Transactions carry a
`ClientRequestToken`, so retrying after an ambiguous failure (timeout, 5xx) cannot apply a commit twice. Every item
carries `expires_at` (epoch seconds, integer); reads drop expired items because TTL deletion is lazy.

Calls go through one transport (`Transport` below): DynamoDB's JSON protocol on the event loop over kept-alive
HTTP/1.1 connections (h11 on asyncio streams, journal/http11.py), signed by botocore's SigV4 signer with credentials
from botocore's chain. No boto3 client: its per-call machinery (validation, event hooks, parsing) costs milliseconds
of CPU, and there is a call per committed batch; httpx's pool (httpcore + anyio) cost twice the CPU of h11 alone.
Retries (throttling, 5xx, connection errors; bounded, exponential with full jitter) are the store's.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import math
import os
import random
import secrets
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest

from unbroken.journal.codec import check_dense, decode_events, decode_json, encode_events, encode_json
from unbroken.journal.http11 import HTTPFailure, Pool, Response
from unbroken.journal.store import (
    TERMINAL_STATUSES,
    AlreadyExists,
    Fenced,
    NotFound,
    Prepared,
    Record,
    ResponseHeader,
    Store,
    StoreError,
    StoreStats,
    StoreUnavailable,
    first_batch_span,
    prepared_work,
    snapshot_blobs,
)

PIECE_BYTES = 64 * 1024  # cap on one item's payload: far below the 400 KB item limit
SEQ_STRIDE = 1000  # sk of a batch piece = (last_seq + 1) * SEQ_STRIDE + piece index
SNAP_STRIDE = 1000
# A transaction holds at most 100 actions and 4 MB; keep headroom for the header update and attribute overhead.
TXN_MAX_PIECES = 90
TXN_MAX_BYTES = 3_500_000
# Snapshots up to this size stay inline in the header; bigger ones would make every header rewrite cost more.
INLINE_SNAPSHOT_MAX = 256
# A first batch up to this size (compressed) and this many events goes in the header item with it (one PutItem).
# Readers starting before event INLINE_BATCH_MAX_EVENTS read the header with the events; bigger batches go by
# transaction, as appends do.
INLINE_BATCH_MAX_BYTES = 8 * 1024
INLINE_BATCH_MAX_EVENTS = 64
_MAX_PAGES = 100_000  # bound on Query pagination (1 MB per page)

# Error codes worth another attempt: throttling, server-side trouble, transaction races.
_RETRY_CODES = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "ThrottlingException",
        "RequestLimitExceeded",
        "InternalServerError",
        "InternalFailure",
        "ServiceUnavailable",
        "TransactionInProgressException",
        "TransactionConflictException",
    }
)
_RETRY_REASONS = frozenset(
    {"ThrottlingError", "ProvisionedThroughputExceeded", "RequestLimitExceeded", "TransactionConflict"}
)
_TERMINAL = sorted(TERMINAL_STATUSES)
_API_VERSION = "DynamoDB_20120810"
_CONTENT_TYPE = "application/x-amz-json-1.0"


class _CallFailed(Exception):
    """A non-retryable ClientError, with whether an earlier attempt of the same call may have been applied."""

    def __init__(self, error: Any, ambiguous: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.ambiguous = ambiguous

    @property
    def code(self) -> str:
        return str(self.error.response.get("Error", {}).get("Code", ""))

    @property
    def reasons(self) -> list[dict[str, Any]]:
        return list(self.error.response.get("CancellationReasons") or [])


def _n(value: int | float) -> dict[str, str]:
    return {"N": repr(value) if isinstance(value, float) else str(value)}


def _num(attr: dict[str, Any] | None, default: float = 0) -> float:
    return float(attr["N"]) if attr else default


def _int(attr: dict[str, Any] | None, default: int = 0) -> int:
    return int(attr["N"]) if attr else default


def _cut(blob: bytes) -> list[bytes]:
    size = PIECE_BYTES  # read at call time (tests lower it)
    return [blob[i : i + size] for i in range(0, len(blob), size)] or [b""]


def item_size(item: dict[str, Any]) -> int:
    """An item's size as DynamoDB meters it (attribute names + values), close enough for WRU accounting."""
    total = 0
    for name, value in item.items():
        total += len(name.encode())
        if "S" in value:
            total += len(value["S"].encode("utf-8", "surrogatepass"))
        elif "N" in value:
            total += len(value["N"]) // 2 + 2
        elif "B" in value:
            total += len(value["B"])
        else:
            total += 1
    return total


def _idem_pk(tenant: str, key: str) -> str:
    # Length-prefixed so that tenant "a#b" + key "c" and tenant "a" + key "b#c" never collide. A partition key may
    # not exceed 2048 bytes: long ones are replaced by their digest.
    pk = f"idem#{len(tenant)}:{tenant}#{key}"
    if len(pk.encode("utf-8", "surrogatepass")) > 512:
        digest = hashlib.sha256(f"{len(tenant)}:{tenant}#{key}".encode("utf-8", "surrogatepass")).hexdigest()
        pk = f"idem#sha256:{digest}"
    return pk


# -- transport --------------------------------------------------------------------------------------------------------


class ServiceError(Exception):
    """DynamoDB answered with an error. `.response` is shaped like botocore's error response: `Error.Code`,
    `Error.Message`, `ResponseMetadata.HTTPStatusCode`, plus the body's other fields (`CancellationReasons`, `Item`)
    with binary values decoded."""

    def __init__(self, response: dict[str, Any]) -> None:
        self.response = response
        error = response.get("Error", {})
        super().__init__(f"{error.get('Code', '?')}: {error.get('Message', '')}")


class Unreachable(Exception):
    """No usable answer (connect / send / read failure, or a garbled body). The request may have been applied."""


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _decode_binary(node: Any) -> None:
    """Turn `{"B": "<base64>"}` attribute values back into bytes, in place, anywhere in a response."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "B" and isinstance(value, str) and len(node) == 1:
                node[key] = base64.b64decode(value)
            elif isinstance(value, dict | list):
                _decode_binary(value)
    elif isinstance(node, list):
        for value in node:
            if isinstance(value, dict | list):
                _decode_binary(value)


def _error_code(body: dict[str, Any], headers: dict[str, str], status: int) -> str:
    # `__type` is "com.amazonaws.dynamodb.v20120810#Code"; front ends may only send x-amzn-ErrorType "Code:uri".
    raw = str(body.get("__type") or headers.get("x-amzn-errortype") or "")
    return raw.split(":", 1)[0].rsplit("#", 1)[-1] or f"HTTP{status}"


def resolve_region(region: str | None) -> str:
    return region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def resolve_endpoint(endpoint_url: str | None, region: str) -> str:
    suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return (
        endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_DYNAMODB")
        or os.environ.get("AWS_ENDPOINT_URL")
        or f"https://dynamodb.{region}.{suffix}"
    )


class Transport:
    """DynamoDB's JSON protocol (`X-Amz-Target: DynamoDB_20120810.<Op>`) over a kept-alive HTTP/1.1 pool (h11 on
    asyncio streams, `journal.http11.Pool`), each request signed by botocore's `SigV4Auth`. Credentials come from
    botocore's chain (environment — what Lambda gives —, profiles, SSO, container / instance roles), resolved once;
    refreshable ones are re-frozen, off the event loop, when botocore says they are due. Retries are the store's.

    `http_transport` (an `httpx.AsyncBaseTransport`: tests' moto in process, fault injection) replaces the pool.
    A pool belongs to the event loop it was used on: a call from another loop (a CLI that creates the table under
    one `asyncio.run` and serves under another) gets a pool of its own."""

    def __init__(
        self,
        endpoint_url: str,
        region: str,
        *,
        local: bool = False,
        credentials: Any = None,
        http_transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int = 32,
        connect_timeout: float = 3.0,
        read_timeout: float = 10.0,
    ) -> None:
        parts = urlsplit(endpoint_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"bad DynamoDB endpoint URL {endpoint_url!r}")
        self.url = endpoint_url if parts.path else endpoint_url + "/"
        self.region = region
        self._local = local  # an explicit endpoint (DynamoDB Local): dummy credentials if the chain has none
        self._credentials = credentials  # botocore Credentials / RefreshableCredentials, or None until resolved
        self._frozen: Any = None  # botocore ReadOnlyCredentials the next request is signed with
        self._credentials_lock = threading.Lock()  # resolution and refresh run in worker threads
        self._http_transport = http_transport
        self._origin = (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), parts.scheme == "https")
        self._target = (parts.path or "/").encode() + (b"?" + parts.query.encode() if parts.query else b"")
        # Host as botocore signs it: the URL's host, bracketed if IPv6, with its port unless the scheme's default.
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        if parts.port is not None and parts.port != (443 if parts.scheme == "https" else 80):
            host = f"{host}:{parts.port}"
        self._host = host.encode("ascii")
        self._max_connections = max_connections
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._pool: Pool | _Injected | None = None
        self._pool_loop: asyncio.AbstractEventLoop | None = None

    # -- credentials

    def _freeze(self) -> Any:
        """Resolve the chain if not done yet, and freeze (refreshing if due). Blocking: runs in a worker thread."""
        from botocore.credentials import Credentials

        with self._credentials_lock:
            if self._credentials is None:
                import botocore.session

                resolved = botocore.session.get_session().get_credentials()
                if resolved is None:
                    if not self._local:
                        raise Unreachable("no AWS credentials found for DynamoDB")
                    resolved = Credentials("local", "local")  # DynamoDB Local checks only that a signature is there
                self._credentials = resolved
            if self._frozen is None or self._refresh_due():
                self._frozen = self._credentials.get_frozen_credentials()
            return self._frozen

    def _refresh_due(self) -> bool:
        refresh_needed = getattr(self._credentials, "refresh_needed", None)  # RefreshableCredentials only
        return bool(refresh_needed is not None and refresh_needed())

    async def credentials(self) -> Any:
        """Frozen credentials for the next request; resolving or refreshing them (network, maybe) off the loop."""
        frozen = self._frozen
        if frozen is not None and not self._refresh_due():
            return frozen
        return await asyncio.to_thread(self._freeze)

    # -- requests

    def sign(self, target: str, body: bytes, credentials: Any) -> dict[str, str]:
        """The headers of a signed request: Content-Type, X-Amz-Target, X-Amz-Date, (X-Amz-Security-Token),
        Authorization. Host is signed as taken from the URL, which is what `__call__` sends (`self._host`)."""
        request = AWSRequest(
            method="POST",
            url=self.url,
            data=body,
            headers={"Content-Type": _CONTENT_TYPE, "X-Amz-Target": target},
        )
        SigV4Auth(credentials, "dynamodb", self.region).add_auth(request)
        return dict(request.headers.items())

    def _http(self) -> Pool | _Injected:
        loop = asyncio.get_running_loop()
        if self._pool is None or self._pool_loop is not loop:
            if self._http_transport is not None:
                self._pool = _Injected(self._http_transport, self.url, self._connect_timeout, self._read_timeout)
            else:
                host, port, tls = self._origin
                self._pool = Pool(
                    host,
                    port,
                    tls=tls,
                    max_connections=self._max_connections,
                    connect_timeout=self._connect_timeout,
                    read_timeout=self._read_timeout,
                )
            self._pool_loop = loop
        return self._pool

    async def __call__(self, op: str, params: dict[str, Any]) -> dict[str, Any]:
        body = json.dumps(params, default=_json_default, separators=(",", ":")).encode()
        signed = self.sign(f"{_API_VERSION}.{op}", body, await self.credentials())
        headers = [(b"host", self._host)]
        headers += [(name.encode("latin-1"), value.encode("latin-1")) for name, value in signed.items()]
        # identity: DynamoDB's x-amz-crc32 is over the bytes sent, and small JSON gains little from gzip
        headers += [(b"accept-encoding", b"identity"), (b"user-agent", b"unbroken")]
        try:
            response = await self._http().request(b"POST", self._target, headers, body)
        except HTTPFailure as exc:
            raise Unreachable(str(exc)) from exc
        data = response.body
        crc = response.headers.get("x-amz-crc32")
        if crc is not None and crc.isdigit() and zlib.crc32(data) != int(crc):
            raise Unreachable(f"{op}: response body does not match its x-amz-crc32")
        status = response.status
        try:
            parsed: dict[str, Any] = json.loads(data) if data else {}
        except ValueError:
            if status < 300:
                raise Unreachable(f"{op}: answer is not JSON: {data[:200]!r}") from None
            parsed = {"message": data[:200].decode(errors="replace")}
        _decode_binary(parsed)
        if status >= 300:
            code = _error_code(parsed, response.headers, status)
            parsed.pop("__type", None)
            message = parsed.pop("message", None) or parsed.pop("Message", "")
            raise ServiceError(
                {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}} | parsed
            )
        return parsed

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        loop, self._pool_loop = self._pool_loop, None
        # A pool of another (finished) loop is just dropped (its connections went with that loop).
        if pool is not None and loop is asyncio.get_running_loop():
            await pool.aclose()


class _Injected:
    """An `httpx.AsyncBaseTransport` given by the caller (tests: moto in process, fault injection) in the place of
    the h11 pool. It is the caller's to close."""

    def __init__(self, transport: httpx.AsyncBaseTransport, url: str, connect_timeout: float, read_timeout: float):
        self._transport = transport
        self._url = url
        self._timeout = httpx.Timeout(read_timeout, connect=connect_timeout).as_dict()

    async def request(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> Response:
        request = httpx.Request(
            method.decode(), self._url, content=body, headers=headers, extensions={"timeout": self._timeout}
        )
        try:
            response = await self._transport.handle_async_request(request)
            try:
                data = await response.aread()
            finally:
                await response.aclose()
        except httpx.TransportError as exc:
            raise HTTPFailure(f"{type(exc).__name__}: {exc}") from exc
        return Response(response.status_code, {k.lower(): v for k, v in response.headers.items()}, data)

    async def aclose(self) -> None:
        pass


class DynamoDBStore(Store):
    def __init__(
        self,
        table: str,
        region: str | None = None,
        endpoint_url: str | None = None,
        *,
        max_attempts: int = 8,
        backoff_base: float = 0.025,
        backoff_cap: float = 1.0,
        max_connections: int = 32,
        http_transport: httpx.AsyncBaseTransport | None = None,
        credentials: Any = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`http_transport` (an httpx transport) replaces the h11 pool (tests: moto in-process, fault injection);
        `credentials` (botocore `Credentials` / `RefreshableCredentials`) replaces botocore's credential chain."""
        self.stats = StoreStats()
        self._clock = clock  # epoch seconds, for expiry checks; tests move it forward
        self.table = table
        self.region = region
        self.endpoint_url = endpoint_url
        self._http_transport = http_transport
        self._credentials = credentials
        self._max_connections = max_connections
        self._transport: Transport | None = None
        self._max_attempts = max(1, max_attempts)
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        # Per-response facts this instance learnt, to avoid a read per commit. Cleared when large.
        self._expires: dict[str, int] = {}
        self._header_size: dict[str, int] = {}
        self._cancel_seen: set[tuple[str, int]] = set()
        # Headers known to carry their first batch: response id -> (first seq, blob), from this instance's create
        # or take-over (a writer's own operations, in order with its commits; a concurrent read could be from
        # before the move and would have the next commit move it again). The next commit of events moves it out;
        # one this instance does not know of stays (correct, only a bigger header to rewrite).
        self._inline_batch: dict[str, tuple[int, bytes]] = {}

    # -- plumbing ---------------------------------------------------------------------------------------------------

    def _make_transport(self) -> Transport:
        if self._transport is None:
            region = resolve_region(self.region)
            self._transport = Transport(
                resolve_endpoint(self.endpoint_url, region),
                region,
                local=bool(self.endpoint_url),
                credentials=self._credentials,
                http_transport=self._http_transport,
                max_connections=self._max_connections,
            )
        return self._transport

    async def _call(self, op: str, **kwargs: Any) -> dict[str, Any]:
        """One DynamoDB call (`op` as the API names it: "TransactWriteItems") with bounded exponential backoff and
        full jitter. Raises `StoreUnavailable` when the attempts run out, `_CallFailed` for an error retrying cannot
        fix."""
        transport = self._transport or self._make_transport()
        try:
            await transport.credentials()
        except Unreachable as exc:
            raise StoreUnavailable(f"dynamodb: {exc}") from exc
        ambiguous = False
        last: Exception | None = None
        for attempt in range(self._max_attempts):
            try:
                return await transport(op, kwargs)
            except ServiceError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0
                retry = code in _RETRY_CODES or status >= 500
                if code == "TransactionCanceledException":
                    codes = {r.get("Code") for r in exc.response.get("CancellationReasons") or []} - {None, "None"}
                    retry = bool(codes) and codes <= _RETRY_REASONS
                if not retry:
                    raise _CallFailed(exc, ambiguous) from exc
                ambiguous = ambiguous or status >= 500
                last = exc
            except Unreachable as exc:
                ambiguous = True  # the request may have reached DynamoDB and been applied
                last = exc
            if attempt + 1 < self._max_attempts:
                await asyncio.sleep(random.uniform(0, min(self._backoff_cap, self._backoff_base * 2**attempt)))
        raise StoreUnavailable(f"dynamodb {op} failed {self._max_attempts} times: {last}") from last

    def _key(self, response_id: str, sk: int = 0) -> dict[str, dict[str, str]]:
        return {"pk": {"S": f"resp#{response_id}"}, "sk": {"N": str(sk)}}

    def _remember(self, response_id: str, item: dict[str, Any]) -> None:
        if len(self._expires) > 4096:
            self._expires.clear()
            self._header_size.clear()
            self._cancel_seen.clear()
            self._inline_batch.clear()
        if "iev" not in item:  # learnt only from this instance's own create / take-over (`_carries`): a read
            self._inline_batch.pop(response_id, None)  # may be from before the move
        if "expires_at" in item:
            self._expires[response_id] = _int(item["expires_at"])
        self._header_size[response_id] = item_size(item)

    def _carries(self, response_id: str, item: dict[str, Any]) -> None:
        """`item`, the header as this instance's own create or take-over left it, may carry the first batch: the
        next commit of events moves it out."""
        if "iev" in item:
            self._inline_batch[response_id] = (_int(item["ifs"]), item["iev"]["B"])

    async def _query(self, **kwargs: Any) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        for _ in range(_MAX_PAGES):
            page = await self._call("Query", TableName=self.table, ConsistentRead=True, **kwargs)
            items.extend(page.get("Items", []))
            if "LastEvaluatedKey" not in page:
                return items
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]
        raise StoreError("query did not finish within the page bound")

    async def _batch_write(self, requests: list[dict[str, Any]]) -> None:
        """BatchWriteItem in groups of 25, retrying unprocessed items with the same bound as `_call`."""
        for start in range(0, len(requests), 25):
            pending: dict[str, Any] = {self.table: requests[start : start + 25]}
            for attempt in range(self._max_attempts):
                result = await self._call("BatchWriteItem", RequestItems=pending)
                pending = result.get("UnprocessedItems") or {}
                if not pending:
                    break
                await asyncio.sleep(random.uniform(0, min(self._backoff_cap, self._backoff_base * 2**attempt)))
            else:
                raise StoreUnavailable("dynamodb batch_write_item: items left unprocessed past the retry bound")

    async def _write_snapshot(self, response_id: str, blob: bytes, expires: int) -> dict[str, dict[str, Any]]:
        """Header attributes referencing a snapshot: inline when tiny, else pieces written first under a fresh nonce."""
        if len(blob) <= INLINE_SNAPSHOT_MAX:
            return {"inline": {"B": blob}}
        nonce = secrets.randbits(40)
        pieces = _cut(blob)
        puts = []
        for i, piece in enumerate(pieces):
            sk = -(nonce * SNAP_STRIDE + i + 1)
            item = {**self._key(response_id, sk), "d": {"B": piece}, "expires_at": _n(expires)}
            puts.append({"PutRequest": {"Item": item}})
        await self._batch_write(puts)
        self.stats.commits += 1
        for put in puts:
            self.stats.add_item(item_size(put["PutRequest"]["Item"]), wru_factor=1)
        return {"nonce": _n(nonce), "pieces": _n(len(pieces))}

    async def _snapshot_attributes(self, header: ResponseHeader, expires: int) -> dict[str, dict[str, Any]]:
        """The header item's attributes for its request and response snapshots, their pieces written first."""
        out: dict[str, dict[str, Any]] = {}
        for prefix, blob in zip(("req", "resp"), snapshot_blobs(header, self), strict=True):
            if blob is not None:
                for name, attr in (await self._write_snapshot(header.id, blob, expires)).items():
                    out[f"{prefix}_{name}"] = attr
        return out

    async def _read_snapshot(self, response_id: str, header: dict[str, Any], prefix: str) -> Any:
        if f"{prefix}_inline" in header:
            return decode_json(header[f"{prefix}_inline"]["B"])
        if f"{prefix}_nonce" not in header:
            return None
        nonce = _int(header[f"{prefix}_nonce"])
        count = _int(header[f"{prefix}_pieces"])
        items = await self._query(
            KeyConditionExpression="pk = :p AND sk BETWEEN :lo AND :hi",
            ExpressionAttributeValues={
                ":p": {"S": f"resp#{response_id}"},
                ":lo": _n(-(nonce * SNAP_STRIDE + count)),
                ":hi": _n(-(nonce * SNAP_STRIDE + 1)),
            },
        )
        if len(items) != count:
            raise StoreError(f"snapshot of {response_id} has {len(items)} of {count} pieces")
        items.sort(key=lambda it: -int(it["sk"]["N"]))
        return decode_json(b"".join(it["d"]["B"] for it in items))

    async def _expires_for(self, response_id: str) -> int:
        expires = self._expires.get(response_id)
        if expires is None:
            got = await self._call(
                "GetItem",
                TableName=self.table,
                Key=self._key(response_id),
                ConsistentRead=True,
                ProjectionExpression="expires_at",
            )
            if "Item" not in got:
                raise NotFound(f"response {response_id} not found")
            expires = _int(got["Item"]["expires_at"])
            self._expires[response_id] = expires
        return expires

    async def _current_header(self, failure: _CallFailed, index: int, response_id: str) -> dict[str, Any] | None:
        """The header as of a failed conditional write: from ALL_OLD in the error if the backend gave it, else read."""
        item: dict[str, Any] | None = None
        if failure.code == "ConditionalCheckFailedException" and "Item" in failure.error.response:
            item = failure.error.response["Item"]
        elif index < len(failure.reasons) and "Item" in failure.reasons[index]:
            item = failure.reasons[index]["Item"]
        if item is not None:
            return item
        got = await self._call("GetItem", TableName=self.table, Key=self._key(response_id), ConsistentRead=True)
        return got.get("Item")

    # -- Store ------------------------------------------------------------------------------------------------------

    async def prepare(self, header: ResponseHeader) -> ResponseHeader:
        """The snapshots encoded and, when too big to stay inline in the header, their items written now (plain
        writes under a fresh nonce, which nothing references until the header does): the create is then one
        transaction, not a BatchWriteItem and then a transaction, on the first token's path."""
        attributes = await self._snapshot_attributes(header, math.ceil(header.expires_at))
        return dataclasses.replace(header, prepared=Prepared(self, header.request, header.response, attributes))

    async def create(self, header: ResponseHeader, events: list[dict[str, Any]] | None = None) -> None:
        span = first_batch_span(header, events)
        # A first batch too large for one transaction (rare: it is one batch window of output) goes in with the
        # header as far as it fits; the rest follows as an append, as an append splits a batch.
        groups = _split(events) if span is not None and events else []
        expires = math.ceil(header.expires_at)
        item: dict[str, dict[str, Any]] = {
            **self._key(header.id),
            "tenant": {"S": header.tenant},
            "created_at": _n(header.created_at),
            "expires_at": _n(expires),
            "expires_exact": _n(float(header.expires_at)),
            "status": {"S": header.status},
            "owner_epoch": _n(header.owner_epoch),
            "lease_expires_at": _n(float(header.lease_expires_at)),
            "last_seq": _n(groups[0][0][-1]["sequence_number"] if groups else header.last_seq),
            "background": {"BOOL": header.background},
        }
        if header.cancel_requested:
            item["cancel_requested"] = {"BOOL": True}
        if header.idempotency_key is not None:
            item["idempotency_key"] = {"S": header.idempotency_key}
        if header.body_hash is not None:
            item["body_hash"] = {"S": header.body_hash}
        # The snapshot items went in at `prepare` (while the upstream call was in flight), or go in now.
        attributes = prepared_work(header, self)
        item.update(attributes if attributes is not None else await self._snapshot_attributes(header, expires))
        put_header = {
            "TableName": self.table,
            "Item": item,
            "ConditionExpression": "attribute_not_exists(pk)",
        }
        puts: list[dict[str, Any]] = []
        if groups:
            first_events, blob = groups[0]
            if len(groups) == 1 and _inline(header, first_events, blob):
                item.update({"iev": {"B": blob}, "ifs": _n(first_events[0]["sequence_number"])})
            else:
                puts = self._batch_items(header.id, first_events, blob, expires)
        try:
            if header.idempotency_key is None and not puts:
                await self._call("PutItem", **put_header)
                self.stats.add_item(item_size(item), wru_factor=1)
            else:
                # The header first: a refused transaction's first reason says whether the id was taken.
                actions: list[dict[str, Any]] = [{"Put": put_header}]
                actions += [
                    {"Put": {"TableName": self.table, "Item": piece, "ConditionExpression": "attribute_not_exists(pk)"}}
                    for piece in puts
                ]
                written = [item, *puts]
                if header.idempotency_key is not None:
                    idem = {
                        "pk": {"S": _idem_pk(header.tenant, header.idempotency_key)},
                        "sk": {"N": "0"},
                        "response_id": {"S": header.id},
                        "expires_at": _n(expires),
                    }
                    actions.append(
                        {
                            "Put": {
                                "TableName": self.table,
                                "Item": idem,
                                # A lapsed key (TTL not yet run) may be reused.
                                "ConditionExpression": "attribute_not_exists(pk) OR expires_at < :now",
                                "ExpressionAttributeValues": {":now": _n(int(self._clock()))},
                            }
                        }
                    )
                    written.append(idem)
                await self._call("TransactWriteItems", TransactItems=actions, ClientRequestToken=str(uuid.uuid4()))
                for written_item in written:
                    self.stats.add_item(item_size(written_item), wru_factor=2)
        except _CallFailed as failure:
            if failure.code == "ConditionalCheckFailedException":
                raise AlreadyExists(f"response {header.id} exists") from None
            if failure.code == "TransactionCanceledException":
                reasons = [r.get("Code") for r in failure.reasons]
                what = "response id" if reasons and reasons[0] == "ConditionalCheckFailed" else "idempotency key"
                raise AlreadyExists(f"{what} already used ({header.id})") from None
            raise StoreError(f"dynamodb create: {failure}") from failure.error
        self.stats.commits += 1
        self._remember(header.id, item)
        self._carries(header.id, item)
        for rest, _blob in groups[1:]:
            await self.append(header.id, header.owner_epoch, rest)

    async def get(self, response_id: str, *, snapshots: bool = True) -> ResponseHeader | None:
        try:
            got = await self._call("GetItem", TableName=self.table, Key=self._key(response_id), ConsistentRead=True)
        except _CallFailed as failure:
            raise StoreError(f"dynamodb get: {failure}") from failure.error
        item = got.get("Item")
        if item is None or _num(item.get("expires_exact")) <= self._clock():
            return None
        self._remember(response_id, item)
        request: Any = {}
        response: Any = None
        if snapshots:
            try:
                request = await self._read_snapshot(response_id, item, "req")
                response = await self._read_snapshot(response_id, item, "resp")
            except _CallFailed as failure:
                raise StoreError(f"dynamodb get: {failure}") from failure.error
        return ResponseHeader(
            id=response_id,
            tenant=item["tenant"]["S"],
            created_at=_num(item.get("created_at")),
            expires_at=_num(item.get("expires_exact")),
            status=item["status"]["S"],
            owner_epoch=_int(item.get("owner_epoch")),
            lease_expires_at=_num(item.get("lease_expires_at")),
            last_seq=_int(item.get("last_seq"), -1),
            request=request if request is not None else {},
            response=response,
            idempotency_key=item["idempotency_key"]["S"] if "idempotency_key" in item else None,
            body_hash=item["body_hash"]["S"] if "body_hash" in item else None,
            cancel_requested=bool(item.get("cancel_requested", {}).get("BOOL", False)),
            background=bool(item.get("background", {}).get("BOOL", False)),
        )

    async def find_by_idempotency_key(self, tenant: str, key: str) -> ResponseHeader | None:
        try:
            got = await self._call(
                "GetItem",
                TableName=self.table,
                Key={"pk": {"S": _idem_pk(tenant, key)}, "sk": {"N": "0"}},
                ConsistentRead=True,
            )
        except _CallFailed as failure:
            raise StoreError(f"dynamodb get: {failure}") from failure.error
        item = got.get("Item")
        if item is None or _int(item.get("expires_at")) <= self._clock():
            return None
        header = await self.get(item["response_id"]["S"])
        if header is None or header.tenant != tenant or header.idempotency_key != key:
            return None
        return header

    def _header_update(
        self,
        lease_expires_at: float | None,
        status: str | None,
        snapshot: dict[str, dict[str, Any]] | None,
    ) -> tuple[list[str], list[str], dict[str, str], dict[str, Any]]:
        sets: list[str] = []
        removes: list[str] = []
        names: dict[str, str] = {"#ep": "owner_epoch", "#xx": "expires_exact"}
        values: dict[str, Any] = {}
        if lease_expires_at is not None:
            sets.append("#le = :le")
            names["#le"] = "lease_expires_at"
            values[":le"] = _n(float(lease_expires_at))
        if status is not None:
            sets.append("#st = :st")
            names["#st"] = "status"
            values[":st"] = {"S": status}
        if snapshot is not None:
            names.update({"#ri": "resp_inline", "#rn": "resp_nonce", "#rp": "resp_pieces"})
            if "inline" in snapshot:
                sets.append("#ri = :ri")
                values[":ri"] = snapshot["inline"]
                removes += ["#rn", "#rp"]
            else:
                sets += ["#rn = :rn", "#rp = :rp"]
                values[":rn"] = snapshot["nonce"]
                values[":rp"] = snapshot["pieces"]
                removes.append("#ri")
        return sets, removes, names, values

    async def append(
        self,
        response_id: str,
        epoch: int,
        events: list[dict[str, Any]],
        *,
        lease_expires_at: float | None = None,
        status: str | None = None,
        response: dict[str, Any] | None = None,
    ) -> bool:
        span = check_dense(events) if events else None
        snapshot = None
        if response is not None:
            snapshot = await self._write_snapshot(
                response_id, encode_json(response), await self._expires_for(response_id)
            )
        if span is None:
            return await self._update_header_only(response_id, epoch, lease_expires_at, status, snapshot)
        expires = await self._expires_for(response_id)
        groups = _split(events)
        cancel = False
        for index, (group, blob) in enumerate(groups):
            last = index == len(groups) - 1
            cancel = await self._commit_batch(
                response_id,
                epoch,
                group,
                blob,
                expires,
                lease_expires_at=lease_expires_at,
                status=status if last else None,
                snapshot=snapshot if last else None,
            )
        return cancel

    async def _update_header_only(
        self,
        response_id: str,
        epoch: int,
        lease_expires_at: float | None,
        status: str | None,
        snapshot: dict[str, dict[str, Any]] | None,
    ) -> bool:
        sets, removes, names, values = self._header_update(lease_expires_at, status, snapshot)
        if not sets:
            sets.append("#ep = :e")  # nothing to change: still a fenced round trip that reports the cancel flag
        values[":e"] = _n(epoch)
        values[":now"] = _n(self._clock())
        expression = "SET " + ", ".join(sets) + (" REMOVE " + ", ".join(removes) if removes else "")
        try:
            result = await self._call(
                "UpdateItem",
                TableName=self.table,
                Key=self._key(response_id),
                UpdateExpression=expression,
                ConditionExpression="#ep = :e AND #xx > :now",
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
                ReturnValues="ALL_NEW",
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except _CallFailed as failure:
            if failure.code != "ConditionalCheckFailedException":
                raise StoreError(f"dynamodb update: {failure}") from failure.error
            current = await self._current_header(failure, 0, response_id)
            if current is None or _num(current.get("expires_exact")) <= self._clock():
                raise NotFound(f"response {response_id} not found") from None
            raise Fenced(f"epoch {epoch} fenced by {_int(current.get('owner_epoch'))}") from None
        item = result.get("Attributes", {})
        self._remember(response_id, item)
        self.stats.commits += 1
        self.stats.add_item(item_size(item), wru_factor=1)
        return bool(item.get("cancel_requested", {}).get("BOOL", False))

    def _batch_items(self, response_id: str, events: list[dict[str, Any]], blob: bytes, expires: int
                     ) -> list[dict[str, Any]]:
        """The items of one batch: its blob cut into pieces, keyed by the batch's last sequence number."""
        return self._pieces(response_id, events[0]["sequence_number"], events[-1]["sequence_number"], blob, expires)

    def _pieces(self, response_id: str, first: int, last: int, blob: bytes, expires: int) -> list[dict[str, Any]]:
        pieces = _cut(blob)
        return [
            {
                **self._key(response_id, (last + 1) * SEQ_STRIDE + i),
                "first_seq": _n(first),
                "last_seq": _n(last),
                "pieces": _n(len(pieces)),
                "ev": {"B": piece},
                "expires_at": _n(expires),
            }
            for i, piece in enumerate(pieces)
        ]

    async def _commit_batch(
        self,
        response_id: str,
        epoch: int,
        events: list[dict[str, Any]],
        blob: bytes,
        expires: int,
        *,
        lease_expires_at: float | None,
        status: str | None,
        snapshot: dict[str, dict[str, Any]] | None,
    ) -> bool:
        first, last = events[0]["sequence_number"], events[-1]["sequence_number"]
        puts = self._batch_items(response_id, events, blob, expires)
        sets, removes, names, values = self._header_update(lease_expires_at, status, snapshot)
        inline = self._inline_batch.get(response_id)
        if inline is not None:  # the first batch leaves the header for an item of its own, in this transaction
            inline_first, inline_blob = inline
            puts = self._pieces(response_id, inline_first, first - 1, inline_blob, expires) + puts
            removes += ["#iv", "#if"]
            names.update({"#iv": "iev", "#if": "ifs"})
        sets.append("#ls = :new")
        names.update({"#ls": "last_seq", "#cx": "cancel_requested"})
        values.update({":new": _n(last), ":prev": _n(first - 1), ":e": _n(epoch), ":now": _n(self._clock())})
        expression = "SET " + ", ".join(sets) + (" REMOVE " + ", ".join(removes) if removes else "")
        # While no cancel has been seen, the header condition also requires the flag to be absent: a commit then
        # fails exactly when a cancel arrived, which is how the owner learns of it without an extra read.
        cancel_known = (response_id, epoch) in self._cancel_seen
        ambiguous = False
        for _ in range(3):  # at most: cancel discovered, then the plain commit
            condition = "#ep = :e AND #ls = :prev AND #xx > :now"
            if not cancel_known:
                condition += " AND attribute_not_exists(#cx)"
            used_names = dict(names)
            if cancel_known:
                del used_names["#cx"]
            actions: list[dict[str, Any]] = [
                {"Put": {"TableName": self.table, "Item": item, "ConditionExpression": "attribute_not_exists(pk)"}}
                for item in puts
            ]
            actions.append(
                {
                    "Update": {
                        "TableName": self.table,
                        "Key": self._key(response_id),
                        "UpdateExpression": expression,
                        "ConditionExpression": condition,
                        "ExpressionAttributeNames": used_names,
                        "ExpressionAttributeValues": values,
                        "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
                    }
                }
            )
            try:
                await self._call("TransactWriteItems", TransactItems=actions, ClientRequestToken=str(uuid.uuid4()))
            except _CallFailed as failure:
                ambiguous = ambiguous or failure.ambiguous
                if failure.code != "TransactionCanceledException":
                    raise StoreError(f"dynamodb transact_write_items: {failure}") from failure.error
                current = await self._current_header(failure, len(puts), response_id)
                if current is None or _num(current.get("expires_exact")) <= self._clock():
                    raise NotFound(f"response {response_id} not found") from None
                current_epoch = _int(current.get("owner_epoch"))
                current_last = _int(current.get("last_seq"), -1)
                if current_epoch != epoch:
                    raise Fenced(f"epoch {epoch} fenced by {current_epoch}") from None
                if ambiguous and current_last == last:
                    break  # an earlier attempt of this very commit went through
                if current_last != first - 1:
                    raise Fenced(f"batch starts at {first} but last_seq is {current_last}") from None
                if not cancel_known and "cancel_requested" in current:
                    cancel_known = True
                    self._cancel_seen.add((response_id, epoch))
                    continue
                raise Fenced(f"commit of {first}..{last} refused: {failure.reasons}") from None
            else:
                break
        else:
            raise StoreError("dynamodb commit did not settle")
        self.stats.commits += 1
        for item in puts:
            self.stats.add_item(item_size(item), wru_factor=2)
        self.stats.add_item(self._header_size.get(response_id, 300), wru_factor=2)  # billed at its larger size
        if inline is not None:
            self._inline_batch.pop(response_id, None)
            if response_id in self._header_size:
                self._header_size[response_id] -= len(inline[1])
        return cancel_known

    async def read_events(self, response_id: str, after_seq: int = -1) -> list[dict[str, Any]]:
        # From the header (sk 0) when the wanted events may still be the first batch it carries.
        lo = 0 if after_seq + 1 < INLINE_BATCH_MAX_EVENTS else (after_seq + 2) * SEQ_STRIDE
        try:
            items = await self._query(
                KeyConditionExpression="pk = :p AND sk >= :lo",
                ExpressionAttributeValues={":p": {"S": f"resp#{response_id}"}, ":lo": _n(lo)},
            )
        except _CallFailed as failure:
            raise StoreError(f"dynamodb query: {failure}") from failure.error
        now = self._clock()
        out: list[dict[str, Any]] = []
        expected = after_seq + 1
        index = 0
        while index < len(items):
            head = items[index]
            if _int(head.get("expires_at")) <= now:
                return []  # every item of a response shares its expiry: the response is gone
            if head["sk"]["N"] == "0":  # the header: its first batch, if it still carries it
                index += 1
                if "iev" in head:
                    events = decode_events(head["iev"]["B"])
                    first = _int(head["ifs"])
                    if first <= expected < first + len(events):
                        out.extend(events[expected - first :])
                        expected = first + len(events)
                continue
            count = _int(head["pieces"])
            group = items[index : index + count]
            block = int(head["sk"]["N"]) // SEQ_STRIDE
            # Query is read-committed, not a snapshot: it may see part of a transaction that commits meanwhile.
            # Stop at the first incomplete or non-contiguous batch; the caller gets the rest on its next read.
            if len(group) != count or any(int(it["sk"]["N"]) != block * SEQ_STRIDE + i for i, it in enumerate(group)):
                break
            first, last = _int(head["first_seq"]), _int(head["last_seq"])
            if last < expected:  # already taken from the header: the Query saw the batch in both places
                index += count
                continue
            if not first <= expected:
                break
            events = decode_events(b"".join(it["ev"]["B"] for it in group))
            out.extend(events[expected - first :])
            expected = last + 1
            index += count
        return out

    async def take_over(self, response_id: str, expected_epoch: int, lease_expires_at: float) -> int:
        names = {"#ep": "owner_epoch", "#le": "lease_expires_at", "#st": "status", "#xx": "expires_exact"}
        values: dict[str, Any] = {
            ":exp": _n(expected_epoch),
            ":new": _n(expected_epoch + 1),
            ":le": _n(float(lease_expires_at)),
            ":now": _n(self._clock()),
        }
        terminal = []
        for i, status in enumerate(_TERMINAL):
            values[f":t{i}"] = {"S": status}
            terminal.append(f":t{i}")
        try:
            result = await self._call(
                "UpdateItem",
                TableName=self.table,
                Key=self._key(response_id),
                UpdateExpression="SET #ep = :new, #le = :le",
                ConditionExpression=f"#ep = :exp AND #xx > :now AND NOT (#st IN ({', '.join(terminal)}))",
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
                ReturnValues="ALL_NEW",
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except _CallFailed as failure:
            if failure.code != "ConditionalCheckFailedException":
                raise StoreError(f"dynamodb take_over: {failure}") from failure.error
            current = await self._current_header(failure, 0, response_id)
            if current is None or _num(current.get("expires_exact")) <= self._clock():
                raise NotFound(f"response {response_id} not found") from None
            current_epoch = _int(current.get("owner_epoch"))
            if (
                failure.ambiguous
                and current_epoch == expected_epoch + 1
                and _num(current.get("lease_expires_at")) == float(lease_expires_at)
            ):
                return current_epoch  # our own earlier attempt went through
            if current_epoch != expected_epoch:
                raise Fenced(f"epoch is {current_epoch}, not {expected_epoch}") from None
            raise Fenced(f"response {response_id} is {current.get('status', {}).get('S')}") from None
        item = result.get("Attributes", {})
        self._remember(response_id, item)
        self._carries(response_id, item)  # the new owner's first commit moves the batch out, as the creator's would
        self.stats.commits += 1
        self.stats.add_item(item_size(item), wru_factor=1)
        return expected_epoch + 1

    async def request_cancel(self, response_id: str) -> bool:
        try:
            await self._call(
                "UpdateItem",
                TableName=self.table,
                Key=self._key(response_id),
                UpdateExpression="SET #cx = :t",
                ConditionExpression="attribute_exists(pk) AND #xx > :now",
                ExpressionAttributeNames={"#cx": "cancel_requested", "#xx": "expires_exact"},
                ExpressionAttributeValues={":t": {"BOOL": True}, ":now": _n(self._clock())},
            )
        except _CallFailed as failure:
            if failure.code == "ConditionalCheckFailedException":
                return False
            raise StoreError(f"dynamodb request_cancel: {failure}") from failure.error
        self.stats.commits += 1
        self.stats.add_item(self._header_size.get(response_id, 300), wru_factor=1)
        return True

    async def delete(self, response_id: str) -> bool:
        try:
            got = await self._call(
                "DeleteItem", TableName=self.table, Key=self._key(response_id), ReturnValues="ALL_OLD"
            )
            header = got.get("Attributes")
            # The header went first, so a writer still running is fenced (NotFound) from here on.
            keys = await self._query(
                KeyConditionExpression="pk = :p",
                ExpressionAttributeValues={":p": {"S": f"resp#{response_id}"}},
                ProjectionExpression="pk, sk",
            )
            await self._batch_write([{"DeleteRequest": {"Key": key}} for key in keys])
            if header is not None and "idempotency_key" in header:
                try:
                    await self._call(
                        "DeleteItem",
                        TableName=self.table,
                        Key={
                            "pk": {"S": _idem_pk(header["tenant"]["S"], header["idempotency_key"]["S"])},
                            "sk": {"N": "0"},
                        },
                        ConditionExpression="response_id = :r",
                        ExpressionAttributeValues={":r": {"S": response_id}},
                    )
                except _CallFailed as failure:
                    if failure.code != "ConditionalCheckFailedException":
                        raise
        except _CallFailed as failure:
            raise StoreError(f"dynamodb delete: {failure}") from failure.error
        self._expires.pop(response_id, None)
        self._header_size.pop(response_id, None)
        return header is not None or bool(keys)

    # -- counters and records ----------------------------------------------------------------------------------------

    async def add_counters(self, increments: Mapping[str, Mapping[str, float]], *, expires_at: float) -> None:
        expires = _n(math.ceil(expires_at))
        for key, deltas in increments.items():
            if not deltas:
                continue
            names = {f"#f{i}": f"c_{field}" for i, field in enumerate(deltas)}
            values = {f":v{i}": _n(delta) for i, delta in enumerate(deltas.values())}
            adds = ", ".join(f"#f{i} :v{i}" for i in range(len(deltas)))
            key_attrs = {"pk": {"S": f"ctr#{key}"}, "sk": {"N": "0"}}
            try:
                for _ in range(3):  # an expired item is replaced by a fresh one at most once per race; bounded
                    try:
                        await self._call(
                            "UpdateItem",
                            TableName=self.table,
                            Key=key_attrs,
                            UpdateExpression=f"SET #x = :x ADD {adds}",
                            ConditionExpression="attribute_not_exists(pk) OR #x > :now",
                            ExpressionAttributeNames={**names, "#x": "expires_at"},
                            ExpressionAttributeValues={**values, ":x": expires, ":now": _n(int(self._clock()))},
                        )
                        break
                    except _CallFailed as failure:
                        if failure.code != "ConditionalCheckFailedException":
                            raise
                    # Expired but not yet removed by TTL: start again from zero, as the other stores do.
                    try:
                        await self._call(
                            "DeleteItem",
                            TableName=self.table,
                            Key=key_attrs,
                            ConditionExpression="#x <= :now",
                            ExpressionAttributeNames={"#x": "expires_at"},
                            ExpressionAttributeValues={":now": _n(int(self._clock()))},
                        )
                    except _CallFailed as failure:
                        if failure.code != "ConditionalCheckFailedException":
                            raise
                else:
                    raise StoreUnavailable(f"dynamodb add_counters: {key} kept expiring under concurrent updates")
            except _CallFailed as failure:
                raise StoreError(f"dynamodb add_counters: {failure}") from failure.error
            self.stats.commits += 1
            self.stats.add_item(40 + 16 * len(deltas), wru_factor=1)

    async def get_counters(self, keys: Sequence[str]) -> dict[str, dict[str, float]]:
        wanted = list(dict.fromkeys(keys))
        found: dict[str, dict[str, float]] = {}
        now = self._clock()
        try:
            for start in range(0, len(wanted), 100):  # BatchGetItem takes at most 100 keys
                pending: dict[str, Any] = {
                    self.table: {
                        "Keys": [{"pk": {"S": f"ctr#{key}"}, "sk": {"N": "0"}} for key in wanted[start : start + 100]],
                        "ConsistentRead": True,
                    }
                }
                for attempt in range(self._max_attempts):
                    result = await self._call("BatchGetItem", RequestItems=pending)
                    for item in result.get("Responses", {}).get(self.table, []):
                        if _num(item.get("expires_at")) <= now:
                            continue
                        fields = {k[2:]: _num(v) for k, v in item.items() if k.startswith("c_")}
                        found[item["pk"]["S"][4:]] = fields
                    pending = result.get("UnprocessedKeys") or {}
                    if not pending:
                        break
                    await asyncio.sleep(random.uniform(0, min(self._backoff_cap, self._backoff_base * 2**attempt)))
                else:
                    raise StoreUnavailable("dynamodb batch_get_item: keys left unprocessed past the retry bound")
        except _CallFailed as failure:
            raise StoreError(f"dynamodb get_counters: {failure}") from failure.error
        return found

    @staticmethod
    def _record_key(kind: str, name: str) -> dict[str, dict[str, str]]:
        digest = int.from_bytes(hashlib.sha256(name.encode()).digest()[:6], "big")
        return {"pk": {"S": f"rec#{kind}"}, "sk": {"N": str(digest)}}

    def _record_live(self, item: dict[str, Any] | None) -> bool:
        return item is not None and ("expires_at" not in item or _num(item["expires_at"]) > self._clock())

    async def get_record(self, kind: str, name: str) -> Record | None:
        try:
            got = await self._call(
                "GetItem", TableName=self.table, Key=self._record_key(kind, name), ConsistentRead=True
            )
        except _CallFailed as failure:
            raise StoreError(f"dynamodb get_record: {failure}") from failure.error
        item = got.get("Item")
        if not self._record_live(item) or item is None or item["name"]["S"] != name:
            return None
        return Record(name, decode_json(item["d"]["B"]), _int(item.get("v")))

    async def put_record(
        self,
        kind: str,
        name: str,
        data: dict[str, Any],
        *,
        expected_version: int | None = None,
        expires_at: float | None = None,
    ) -> int:
        blob = encode_json(data)
        names = {"#d": "d", "#n": "name", "#v": "v", "#x": "expires_at"}
        values: dict[str, Any] = {":d": {"B": blob}, ":n": {"S": name}, ":one": _n(1)}
        # A create starts at 1 even over an expired item that TTL has not removed yet.
        version = ":one" if expected_version == 0 else "if_not_exists(#v, :zero) + :one"
        if expected_version != 0:
            values[":zero"] = _n(0)
        update = f"SET #d = :d, #n = :n, #v = {version}"
        update += ", #x = :x" if expires_at is not None else " REMOVE #x"
        if expires_at is not None:
            values[":x"] = _n(math.ceil(expires_at))
        live = "(attribute_not_exists(#x) OR #x > :now)"
        condition: str | None = None
        if expected_version == 0:
            condition = f"attribute_not_exists(pk) OR NOT {live}"
        elif expected_version is not None:
            condition = f"#v = :expected AND {live}"
            values[":expected"] = _n(expected_version)
        if condition is not None:
            values[":now"] = _n(self._clock())
        extra = {"ConditionExpression": condition} if condition is not None else {}
        try:
            got = await self._call(
                "UpdateItem",
                TableName=self.table,
                Key=self._record_key(kind, name),
                UpdateExpression=update,
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
                ReturnValues="UPDATED_NEW",
                **extra,
            )
        except _CallFailed as failure:
            if failure.code == "ConditionalCheckFailedException":
                if expected_version == 0:
                    raise AlreadyExists(f"record {kind}/{name} exists") from failure.error
                raise Fenced(f"record {kind}/{name} is not at version {expected_version}") from failure.error
            raise StoreError(f"dynamodb put_record: {failure}") from failure.error
        self.stats.commits += 1
        self.stats.add_item(60 + len(blob), wru_factor=1)
        return _int(got.get("Attributes", {}).get("v"), 1)

    async def list_records(self, kind: str) -> list[Record]:
        try:
            items = await self._query(
                KeyConditionExpression="pk = :p", ExpressionAttributeValues={":p": {"S": f"rec#{kind}"}}
            )
        except _CallFailed as failure:
            raise StoreError(f"dynamodb list_records: {failure}") from failure.error
        records = [
            Record(item["name"]["S"], decode_json(item["d"]["B"]), _int(item.get("v")))
            for item in items
            if self._record_live(item)
        ]
        return sorted(records, key=lambda record: record.name)

    async def delete_record(self, kind: str, name: str) -> bool:
        try:
            got = await self._call(
                "DeleteItem", TableName=self.table, Key=self._record_key(kind, name), ReturnValues="ALL_OLD"
            )
        except _CallFailed as failure:
            raise StoreError(f"dynamodb delete_record: {failure}") from failure.error
        return self._record_live(got.get("Attributes"))

    async def create_table_if_missing(self, *, wait_seconds: float = 120.0) -> bool:
        """Create the table (on-demand, TTL on `expires_at`) unless it exists. True if it was created here."""
        created = True
        try:
            await self._call(
                "CreateTable",
                TableName=self.table,
                AttributeDefinitions=[
                    {"AttributeName": "pk", "AttributeType": "S"},
                    {"AttributeName": "sk", "AttributeType": "N"},
                ],
                KeySchema=[
                    {"AttributeName": "pk", "KeyType": "HASH"},
                    {"AttributeName": "sk", "KeyType": "RANGE"},
                ],
                BillingMode="PAY_PER_REQUEST",
            )
        except _CallFailed as failure:
            if failure.code != "ResourceInUseException":
                raise StoreError(f"dynamodb create_table: {failure}") from failure.error
            created = False
        deadline = time.monotonic() + wait_seconds
        while True:  # bounded by the deadline
            described = await self._call("DescribeTable", TableName=self.table)
            if described["Table"].get("TableStatus") == "ACTIVE":
                break
            if time.monotonic() > deadline:
                raise StoreUnavailable(f"table {self.table} not ACTIVE after {wait_seconds} s")
            await asyncio.sleep(0.5)
        try:
            await self._call(
                "UpdateTimeToLive",
                TableName=self.table,
                TimeToLiveSpecification={"Enabled": True, "AttributeName": "expires_at"},
            )
        except _CallFailed as failure:
            # Already enabled (or being enabled): UpdateTimeToLive refuses a repeat with a ValidationException.
            if failure.code != "ValidationException":
                raise StoreError(f"dynamodb update_time_to_live: {failure}") from failure.error
        return created

    async def close(self) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            await transport.aclose()


def _inline(header: ResponseHeader, events: list[dict[str, Any]], blob: bytes) -> bool:
    """Whether `create` puts its (whole) first batch in the header item (one PutItem), not an item of its own."""
    return (
        header.idempotency_key is None  # that create is a transaction anyway (the key's item)
        and len(blob) <= INLINE_BATCH_MAX_BYTES
        and events[-1]["sequence_number"] < INLINE_BATCH_MAX_EVENTS
    )


def _split(events: list[dict[str, Any]]) -> list[tuple[list[dict[str, Any]], bytes]]:
    """Events grouped so that each group's blob fits one transaction; groups keep the order. Usually one group."""
    blob = encode_events(events)
    if len(blob) <= TXN_MAX_BYTES and -(-len(blob) // PIECE_BYTES) <= TXN_MAX_PIECES:
        return [(events, blob)]
    if len(events) == 1:
        raise StoreError(f"event {events[0].get('sequence_number')} is {len(blob)} bytes compressed: too large")
    middle = len(events) // 2
    return _split(events[:middle]) + _split(events[middle:])
