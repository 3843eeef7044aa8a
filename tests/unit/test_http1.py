"""The router's HTTP/1.1 protocol (api/http1.py): a response's head goes to the socket in one write with the first
body chunk that follows it in the same loop turn; a head whose body is not ready goes alone on the next turn; what
is held is written before the transport closes; interim responses and body chunks are never held.

A recording transport stands in for the socket; the loop is a real one, every wait bounded."""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn

from unbroken.api.http1 import H11Protocol, _HeadWithFirstChunk

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
CHUNK = b"1a\r\ndata: {\"type\":\"first\"}\n\n\r\n"


class Socket:
    """What reaches the socket: one entry per write, and the calls in order."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.calls: list[str] = []
        self.extra = {"peername": ("127.0.0.1", 5)}

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self.calls.append("write")

    def close(self) -> None:
        self.calls.append("close")

    def abort(self) -> None:
        self.calls.append("abort")

    def write_eof(self) -> None:
        self.calls.append("write_eof")

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.extra.get(name, default)


async def _turn() -> None:
    await asyncio.sleep(0)  # the loop runs what was scheduled with call_soon before this task's next step


def _transport() -> tuple[_HeadWithFirstChunk, Socket]:
    sock = Socket()
    return _HeadWithFirstChunk(sock, asyncio.get_running_loop()), sock  # type: ignore[arg-type]


def test_a_head_and_the_chunk_after_it_in_the_same_turn_are_one_write() -> None:
    async def main() -> list[bytes]:
        transport, sock = _transport()
        transport.write(HEAD)
        assert sock.writes == []  # held
        transport.write(CHUNK)
        await _turn()
        transport.write(b"0\r\n\r\n")
        return sock.writes

    assert asyncio.run(main()) == [HEAD + CHUNK, b"0\r\n\r\n"]


def test_a_head_whose_body_is_not_ready_goes_alone_on_the_next_turn() -> None:
    async def main() -> list[list[bytes]]:
        transport, sock = _transport()
        transport.write(HEAD)
        seen = [list(sock.writes)]
        await _turn()
        seen.append(list(sock.writes))
        transport.write(CHUNK)
        seen.append(list(sock.writes))
        return seen

    assert asyncio.run(main()) == [[], [HEAD], [HEAD, CHUNK]]


def test_what_is_held_is_written_before_close_and_dropped_on_abort() -> None:
    async def main() -> tuple[Socket, Socket]:
        closing, closed = _transport()
        closing.write(HEAD)
        closing.close()
        aborting, aborted = _transport()
        aborting.write(HEAD)
        aborting.abort()
        await _turn()  # the cancelled flush does not write after the abort
        return closed, aborted

    closed, aborted = asyncio.run(main())
    assert closed.writes == [HEAD] and closed.calls == ["write", "close"]
    assert aborted.writes == [] and aborted.calls == ["abort"]


def test_interim_responses_and_body_chunks_are_never_held() -> None:
    async def main() -> list[bytes]:
        transport, sock = _transport()
        transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        transport.write(CHUNK)
        transport.writelines([b"5\r\n", b"hello\r\n"])
        return sock.writes

    assert asyncio.run(main()) == [b"HTTP/1.1 100 Continue\r\n\r\n", CHUNK, b"5\r\nhello\r\n"]


def test_everything_else_is_the_socket_transports_own() -> None:
    async def main() -> Any:
        transport, _ = _transport()
        return transport.get_extra_info("peername")

    assert asyncio.run(main()) == ("127.0.0.1", 5)


def test_uvicorn_loads_it_by_name_as_the_lambda_entry_point_names_it() -> None:
    config = uvicorn.Config("unbroken.app:lambda_app", http="unbroken.api.http1:H11Protocol")
    config.load()
    assert config.http_protocol_class is H11Protocol
