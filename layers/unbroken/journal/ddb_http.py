"""Transports for the DynamoDB store: a lean one (JSON over http.client, signed with SigV4 here) and one on boto3.

Why a lean one: a botocore call costs about 3 ms of CPU (parameter validation, event hooks, user-agent building,
response parsing), and the journal makes one per committed batch, i.e. every 50 ms of a live stream. A signed JSON
POST over a kept-alive connection costs a small fraction of that, and needs no boto3 import at cold start. Even
http.client costs ~0.4 ms a call parsing headers through the email package, so the HTTP/1.1 exchange (one request,
a response with Content-Length or chunked body) is done here on a plain socket.
Both raise the same two errors, so the store's retry logic does not care which one runs:
- `ServiceError`: DynamoDB answered with an error. `.response` is shaped like botocore's error response
  (`Error.Code`, `ResponseMetadata.HTTPStatusCode`, plus `CancellationReasons` / `Item` when present).
- `Unreachable`: no answer (connect / read failure). The request may or may not have been applied.
Binary attributes travel as base64 in DynamoDB's JSON protocol; both transports take and return `bytes`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlsplit

_API_VERSION = "DynamoDB_20120810"
_SERVICE = "dynamodb"
Credentials = tuple[str, str, str | None]  # access key, secret key, session token


class ServiceError(Exception):
    def __init__(self, response: dict[str, Any]) -> None:
        self.response = response
        error = response.get("Error", {})
        super().__init__(f"{error.get('Code', '?')}: {error.get('Message', '')}")


class Unreachable(Exception):
    pass


def _target(op: str) -> str:
    # boto3-style operation names ("transact_write_items") to API names ("TransactWriteItems").
    return "".join(part.title() for part in op.split("_"))


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


def default_endpoint(region: str) -> str:
    suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"https://dynamodb.{region}.{suffix}"


def resolve_region(region: str | None) -> str:
    return region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def resolve_endpoint(endpoint_url: str | None, region: str) -> str:
    return (
        endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_DYNAMODB")
        or os.environ.get("AWS_ENDPOINT_URL")
        or default_endpoint(region)
    )


def credentials_provider(local_endpoint: bool) -> Callable[[], Credentials]:
    """Environment credentials (what Lambda provides) read per call; otherwise botocore's resolver chain (profiles,
    SSO, container / instance roles), imported only then, whose credentials refresh themselves."""
    env = os.environ
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        return lambda: (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], env.get("AWS_SESSION_TOKEN") or None)
    import botocore.session

    resolved = botocore.session.get_session().get_credentials()
    if resolved is None:
        if local_endpoint:
            return lambda: ("local", "local", None)  # DynamoDB Local accepts any signature
        raise Unreachable("no AWS credentials found for DynamoDB")

    def frozen() -> Credentials:
        creds = resolved.get_frozen_credentials()
        return creds.access_key, creds.secret_key, creds.token

    return frozen


class SigV4:
    """AWS Signature Version 4 for DynamoDB's JSON protocol: POST, no query string, signed content-type, host,
    x-amz-date, x-amz-target (and x-amz-security-token). The derived signing key is cached per day."""

    def __init__(self, region: str, service: str = _SERVICE) -> None:
        self.region = region
        self.service = service
        self._key: tuple[str, str, bytes] | None = None

    def _signing_key(self, secret: str, day: str) -> bytes:
        cached = self._key
        if cached is not None and cached[0] == secret and cached[1] == day:
            return cached[2]
        key = ("AWS4" + secret).encode()
        for part in (day, self.region, self.service, "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        self._key = (secret, day, key)
        return key

    def headers(
        self, host: str, path: str, target: str, body: bytes, credentials: Credentials, now: float | None = None
    ) -> dict[str, str]:
        access_key, secret, token = credentials
        amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
        day = amz_date[:8]
        headers = {
            "content-type": "application/x-amz-json-1.0",
            "host": host,
            "x-amz-date": amz_date,
            "x-amz-target": target,
        }
        if token:
            headers["x-amz-security-token"] = token
        names = sorted(headers)
        signed = ";".join(names)
        canonical = "\n".join(
            [
                "POST",
                quote(path or "/", safe="/~"),
                "",
                *(f"{name}:{' '.join(headers[name].split())}" for name in names),
                "",
                signed,
                hashlib.sha256(body).hexdigest(),
            ]
        )
        scope = f"{day}/{self.region}/{self.service}/aws4_request"
        to_sign = f"AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        signature = hmac.new(self._signing_key(secret, day), to_sign.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, SignedHeaders={signed}, Signature={signature}"
        )
        return headers


class _Connection:
    """One kept-alive HTTP/1.1 connection: send a request, read one response."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None, timeout: float) -> None:
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock: socket.socket = tls.wrap_socket(sock, server_hostname=host) if tls is not None else sock
        self.buf = bytearray()

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed by DynamoDB")
        self.buf += chunk

    def _take(self, size: int) -> bytes:
        while len(self.buf) < size:
            self._fill()
        data = bytes(self.buf[:size])
        del self.buf[:size]
        return data

    def _line(self) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            self._fill()
        line = bytes(self.buf[:end])
        del self.buf[: end + 2]
        return line

    def exchange(self, request: bytes) -> tuple[int, dict[str, str], bytes]:
        self.sock.sendall(request)
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            self._fill()
        head = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
        del self.buf[: end + 4]
        status = int(head[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = self._take(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while size := int(self._line().split(b";", 1)[0], 16):
                parts.append(self._take(size))
                self._take(2)
            while self._line():  # trailers, up to the empty line
                pass
            body = b"".join(parts)
        else:  # no framing: the body runs to the end of the connection
            while True:
                try:
                    self._fill()
                except ConnectionError:
                    break
            body = bytes(self.buf)
            self.buf.clear()
            headers["connection"] = "close"
        return status, headers, body

    def close(self) -> None:
        self.sock.close()


class HttpTransport:
    """One kept-alive connection per calling thread (the store calls from a small thread pool)."""

    def __init__(
        self,
        endpoint_url: str,
        region: str,
        credentials: Callable[[], Credentials],
        *,
        timeout: float = 10.0,
    ) -> None:
        parts = urlsplit(endpoint_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"bad DynamoDB endpoint URL {endpoint_url!r}")
        self.tls = ssl.create_default_context() if parts.scheme == "https" else None
        self.hostname = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        self.host = parts.netloc
        self.path = parts.path or "/"
        self.timeout = timeout
        self.signer = SigV4(region)
        self.credentials = credentials
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: set[_Connection] = set()  # every thread's connection, for close()

    def _connection(self) -> _Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = _Connection(self.hostname, self.port, self.tls, self.timeout)
            self._local.conn = conn
            with self._lock:
                self._open.add(conn)
        return conn

    def _discard(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            with self._lock:
                self._open.discard(conn)
            conn.close()

    def __call__(self, op: str, params: dict[str, Any]) -> dict[str, Any]:
        body = json.dumps(params, default=_json_default, separators=(",", ":")).encode()
        target = f"{_API_VERSION}.{_target(op)}"
        headers = self.signer.headers(self.host, self.path, target, body, self.credentials())
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        request = f"POST {self.path} HTTP/1.1\r\n{head}content-length: {len(body)}\r\n\r\n".encode() + body
        try:
            status, response_headers, data = self._connection().exchange(request)
        except (OSError, ValueError, IndexError) as exc:
            self._discard()  # a half-used connection cannot be reused
            raise Unreachable(f"{type(exc).__name__}: {exc}") from exc
        if response_headers.get("connection", "").lower() == "close":
            self._discard()
        try:
            parsed: dict[str, Any] = json.loads(data) if data else {}
        except ValueError:
            parsed = {"message": data[:200].decode(errors="replace")}
        if status >= 300:
            code = str(parsed.pop("__type", "")).rsplit("#", 1)[-1] or f"HTTP{status}"
            message = parsed.pop("message", None) or parsed.pop("Message", "")
            _decode_binary(parsed)
            raise ServiceError(
                {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}} | parsed
            )
        _decode_binary(parsed)
        return parsed

    def close(self) -> None:
        with self._lock:
            conns, self._open = self._open, set()
        for conn in conns:
            conn.close()


class BotoTransport:
    """The same interface on a boto3 client (used with moto, botocore's Stubber, or when asked for)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def __call__(self, op: str, params: dict[str, Any]) -> dict[str, Any]:
        from botocore.exceptions import ClientError, HTTPClientError
        from botocore.exceptions import ConnectionError as BotoConnectionError

        try:
            return dict(getattr(self.client, op)(**params))
        except ClientError as exc:
            raise ServiceError(exc.response) from exc  # type: ignore[arg-type]
        except (BotoConnectionError, HTTPClientError) as exc:
            raise Unreachable(f"{type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        close = getattr(self.client, "close", None)
        if close is not None:
            close()
