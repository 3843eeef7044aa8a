"""The DynamoDB store's HTTP/1.1 pool (journal/http11.py) against small asyncio servers on 127.0.0.1: keep-alive
reuse, connections that must not be reused (Connection: close, HTTP/1.0, a body read to EOF, closed while idle, an
unasked 408, idle too long), half-read answers, timeouts, cancellation, the bound on connections, closing, TLS
(certificate and hostname checked), and the store's transport on it (Host as signed, x-amz-crc32, errors).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import socket
import ssl
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import botocore.auth
import h11
import pytest
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from unbroken.journal import http11
from unbroken.journal.dynamodb import ServiceError, Transport, Unreachable
from unbroken.journal.http11 import HTTPFailure, Pool


@dataclass
class Received:
    connection: int  # 1 for the server's first connection, 2 for the next...
    method: bytes
    target: bytes
    headers: dict[str, str]
    body: bytes


# An answer writes raw bytes to the connection; it returns whether to wait for another request on it.
Answer = Callable[[Received, asyncio.StreamWriter], Awaitable[bool]]


def ok(body: bytes = b"{}", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def answer_ok(request: Received, writer: asyncio.StreamWriter) -> bool:
    writer.write(ok(b'{"n":%d}' % request.connection))
    return True


class Server:
    """HTTP/1.1 on 127.0.0.1 (TLS if given a context): reads each request with h11, answers with `answer`."""

    def __init__(self, answer: Answer = answer_ok, tls: ssl.SSLContext | None = None) -> None:
        self.answer = answer
        self.tls = tls
        self.requests: list[Received] = []
        self.connections = 0
        self.open = 0
        self.most_open = 0
        self.eofs = 0  # connections the client closed
        self.port = 0
        self.handlers: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for task in self.handlers:
            task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        self.connections += 1
        number = self.connections
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            while True:
                machine = h11.Connection(h11.SERVER)  # answers are written raw: a fresh machine per request
                head: h11.Request | None = None
                body = b""
                while True:
                    event = machine.next_event()
                    if event is h11.NEED_DATA:
                        data = await reader.read(65536)
                        if not data:
                            self.eofs += 1
                            return
                        machine.receive_data(data)
                    elif isinstance(event, h11.Request):
                        head = event
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                assert head is not None
                received = Received(
                    number,
                    head.method,
                    head.target,
                    {k.decode(): v.decode() for k, v in head.headers},
                    body,
                )
                self.requests.append(received)
                keep = await self.answer(received, writer)
                await writer.drain()
                if not keep:
                    return
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            self.open -= 1
            writer.close()


def pool_for(server: Server, **kwargs: Any) -> Pool:
    return Pool("127.0.0.1", server.port, tls=False, **kwargs)


async def get(pool: Pool, body: bytes = b"") -> http11.Response:
    return await pool.request(b"POST", b"/", [(b"host", b"127.0.0.1")], body)


async def test_keep_alive_reuses_one_connection() -> None:
    async with Server() as server:
        pool = pool_for(server)
        answers = [await get(pool, b'{"i":%d}' % i) for i in range(3)]
        await pool.aclose()
    assert [a.status for a in answers] == [200, 200, 200]
    assert [a.body for a in answers] == [b'{"n":1}'] * 3
    assert answers[0].headers == {"content-length": "7"}
    assert server.connections == 1
    assert [r.body for r in server.requests] == [b'{"i":0}', b'{"i":1}', b'{"i":2}']
    assert server.requests[0].headers["content-length"] == "7" and server.requests[0].method == b"POST"


@pytest.mark.parametrize(
    "raw",
    [
        ok(extra=b"connection: close\r\n"),
        b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\n\r\n{}",  # no length: the body runs to EOF
    ],
    ids=["connection-close", "http-1.0", "body-to-eof"],
)
async def test_an_answer_that_ends_the_connection_is_not_reused(raw: bytes) -> None:
    async def answer(request: Received, writer: asyncio.StreamWriter) -> bool:
        writer.write(raw)
        return False

    async with Server(answer) as server:
        pool = pool_for(server)
        first = await get(pool)
        second = await get(pool)
        await pool.aclose()
    assert first.body == second.body == b"{}"
    assert server.connections == 2


async def test_a_connection_the_server_closed_while_idle_is_not_reused() -> None:
    async def answer(request: Received, writer: asyncio.StreamWriter) -> bool:
        writer.write(ok())
        return False  # closes without saying so

    async with Server(answer) as server:
        pool = pool_for(server)
        await get(pool)
        await asyncio.sleep(0.05)  # the FIN arrives
        assert (await get(pool)).status == 200
        await pool.aclose()
    assert server.connections == 2


async def test_an_unasked_answer_on_an_idle_connection_is_not_taken_for_the_next() -> None:
    async def answer(request: Received, writer: asyncio.StreamWriter) -> bool:
        writer.write(ok())
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n\r\n")
        return True

    async with Server(answer) as server:
        pool = pool_for(server)
        await get(pool)
        await asyncio.sleep(0.1)
        assert (await get(pool)).status == 200
        await pool.aclose()
    assert server.connections == 2


async def test_an_idle_connection_expires() -> None:
    async with Server() as server:
        pool = pool_for(server, keepalive_expiry=0.05)
        await get(pool)
        await asyncio.sleep(0.1)
        assert (await get(pool)).body == b'{"n":2}'
        await asyncio.sleep(0.05)
        assert server.eofs == 1  # the expired one was closed
        await pool.aclose()


@pytest.mark.parametrize("then_close", [True, False], ids=["then-closed", "then-silent"])
async def test_a_half_sent_answer_fails_and_its_connection_is_dropped(then_close: bool) -> None:
    async def answer(request: Received, writer: asyncio.StreamWriter) -> bool:
        if request.connection == 1:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"x" * 10)
            if not then_close:
                await writer.drain()
                await asyncio.sleep(5)
            return False
        writer.write(ok())
        return True

    async with Server(answer) as server:
        pool = pool_for(server, read_timeout=0.3)
        with pytest.raises(HTTPFailure):
            await get(pool)
        assert pool._idle == [] and pool._open == set()
        assert (await get(pool)).body == b"{}"
        await pool.aclose()
    assert server.connections == 2


async def test_read_timeout() -> None:
    async def silent(request: Received, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(5)
        return False

    async with Server(silent) as server:
        pool = pool_for(server, read_timeout=0.2)
        start = time.monotonic()
        with pytest.raises(HTTPFailure, match=r"no complete answer within 0\.2 s"):
            await get(pool)
        assert time.monotonic() - start < 2
        assert pool._idle == [] and pool._open == set()
        await pool.aclose()


async def test_connect_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    async def never(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(5)

    monkeypatch.setattr(http11.asyncio, "open_connection", never)
    pool = Pool("127.0.0.1", 9, tls=False, connect_timeout=0.1)
    start = time.monotonic()
    with pytest.raises(HTTPFailure, match=r"timed out after 0\.1 s"):
        await get(pool)
    assert time.monotonic() - start < 2


async def test_connection_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once closed
    with pytest.raises(HTTPFailure, match="ConnectionRefusedError"):
        await get(Pool("127.0.0.1", port, tls=False))


async def test_a_cancelled_request_drops_its_connection() -> None:
    async def answer(request: Received, writer: asyncio.StreamWriter) -> bool:
        if request.connection == 1:
            await asyncio.sleep(5)
            return False
        writer.write(ok())
        return True

    async with Server(answer) as server:
        pool = pool_for(server)
        task = asyncio.create_task(get(pool))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool._idle == [] and pool._open == set()
        assert (await get(pool)).status == 200
        await pool.aclose()
    assert server.connections == 2


async def test_connections_are_bounded() -> None:
    async def slow(request: Received, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.05)
        writer.write(ok())
        return True

    async with Server(slow) as server:
        pool = pool_for(server, max_connections=2)
        answers = await asyncio.gather(*(get(pool) for _ in range(6)))
        await pool.aclose()
    assert [a.status for a in answers] == [200] * 6
    assert server.connections == 2 and server.most_open == 2


async def test_aclose_closes_idle_connections_and_refuses_more() -> None:
    async with Server() as server:
        pool = pool_for(server)
        await get(pool)
        await pool.aclose()
        await asyncio.sleep(0.05)
        assert server.eofs == 1
        with pytest.raises(HTTPFailure, match="closed"):
            await get(pool)


# -- TLS ---------------------------------------------------------------------------------------------------------


def self_signed(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for DNS name `name` and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


@pytest.mark.parametrize("cert_name", ["localhost", "elsewhere.test"])
async def test_tls_checks_the_certificate_and_host_name(
    cert_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = self_signed(tmp_path, cert_name)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    default_context = ssl.create_default_context
    # the pool's context as made by ssl.create_default_context(), trusting this test's certificate instead of the bundle
    monkeypatch.setattr(http11.ssl, "create_default_context", lambda **_: default_context(cafile=str(cert)))
    async with Server(tls=server_context) as server:
        pool = Pool("localhost", server.port, tls=True)
        if cert_name == "localhost":
            assert (await get(pool)).status == 200
            assert (await get(pool)).status == 200
            assert server.connections == 1
        else:
            with pytest.raises(HTTPFailure, match="SSLCertVerificationError"):
                await get(pool)
        await pool.aclose()


# -- the store's transport on the pool ---------------------------------------------------------------------------


def dynamodb_answer(status: int, payload: dict[str, Any], crc: int | None = None) -> bytes:
    body = json.dumps(payload).encode()
    crc = zlib.crc32(body) if crc is None else crc
    extra = b"content-type: application/x-amz-json-1.0\r\nx-amz-crc32: %d\r\n" % crc
    status_line = b"HTTP/1.1 %d X\r\n" % status
    return ok(body, extra).replace(b"HTTP/1.1 200 OK\r\n", status_line, 1)


async def test_transport_sends_the_host_it_signed_and_checks_answers() -> None:
    answers = [
        dynamodb_answer(200, {"TableNames": ["t"]}),
        dynamodb_answer(200, {"TableNames": []}, crc=1),
        dynamodb_answer(400, {"__type": "com.amazonaws.dynamodb.v20120810#ResourceNotFoundException",
                              "message": "no table"}),
    ]

    async def answer(request: Received, writer: asyncio.StreamWriter) -> bool:
        writer.write(answers[len(server.requests) - 1])
        return True

    credentials = Credentials("AKIDTEST", "secret", "token")
    async with Server(answer) as server:
        transport = Transport(f"http://127.0.0.1:{server.port}", "eu-west-1", credentials=credentials)
        assert await transport("ListTables", {}) == {"TableNames": ["t"]}
        with pytest.raises(Unreachable, match="x-amz-crc32"):
            await transport("ListTables", {})
        with pytest.raises(ServiceError) as error:
            await transport("DescribeTable", {"TableName": "x"})
        await transport.aclose()
    assert error.value.response["Error"] == {"Code": "ResourceNotFoundException", "Message": "no table"}
    assert error.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert server.connections == 1
    sent = server.requests[0]
    assert sent.headers["host"] == f"127.0.0.1:{server.port}" and sent.target == b"/"
    # botocore's signature over the request as it went on the wire (its Host and path) is the one sent
    reference = AWSRequest(
        method="POST",
        url=f"http://{sent.headers['host']}{sent.target.decode()}",
        data=sent.body,
        headers={"Content-Type": sent.headers["content-type"], "X-Amz-Target": sent.headers["x-amz-target"]},
    )
    at = datetime.datetime.strptime(sent.headers["x-amz-date"], "%Y%m%dT%H%M%SZ")
    with mock.patch.object(botocore.auth, "get_current_datetime", lambda *a, **k: at):
        botocore.auth.SigV4Auth(credentials, "dynamodb", "eu-west-1").add_auth(reference)
    assert sent.headers["authorization"] == reference.headers["Authorization"]
    assert sent.headers["x-amz-security-token"] == "token"
    assert sent.headers["x-amz-target"] == "DynamoDB_20120810.ListTables"


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("https://dynamodb.eu-west-1.amazonaws.com", b"dynamodb.eu-west-1.amazonaws.com"),
        ("https://dynamodb.eu-west-1.amazonaws.com:443/", b"dynamodb.eu-west-1.amazonaws.com"),
        ("http://localhost:8000", b"localhost:8000"),
        ("http://[::1]:8000", b"[::1]:8000"),
    ],
)
def test_host_header_is_botocores(url: str, host: bytes) -> None:
    transport = Transport(url, "eu-west-1")
    assert transport._host == host
    assert botocore.auth._host_from_url(transport.url) == host.decode()  # what SigV4 signs
