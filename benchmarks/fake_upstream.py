"""A small, fast OpenAI-compatible upstream for `make bench`: Chat Completions over SSE on 127.0.0.1.

Every gateway in the benchmark (unbroken, LiteLLM) and the direct baseline talk to this one server, so whatever it
costs is the same for all of them and cancels out of every "added" figure.

The answer is chosen by the model name, which every gateway forwards unchanged:
- `t200`        200 content chunks (one word each), written as fast as the socket takes them;
- `t50-g20`     50 content chunks, 20 ms apart (a live model at 50 tokens/s), scheduled on absolute times so the
                pace does not drift.
Each token is one SSE event in one HTTP chunk (chunked transfer encoding), like OpenAI's own streams: a first chunk
with the role and empty content, the content chunks, a chunk with `finish_reason`, a usage chunk when the request
asks for it (`stream_options.include_usage`), then `data: [DONE]`. `stream: false` gets one JSON completion.

HTTP/1.1 keep-alive, Content-Length bodies only; parsed by hand on `asyncio.start_server` (no framework) so that the
upstream's own CPU per stream stays small next to the gateways'. Run: `python -m benchmarks.fake_upstream --port 0`;
it prints `fake upstream on http://127.0.0.1:PORT/v1` once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import sys
import time

_WORDS = (
    "the quick river carries light across a quiet valley while the router keeps every token it has sent safe "
    "in its journal so that nothing a client saw is ever lost"
).split()
_MODEL = re.compile(r"^t(\d{1,5})(?:-g(\d{1,4}))?$")
_MAX_BODY = 1 << 20
_CREATED = 1_700_000_000


def _chunk(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk holding `payload`."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _event(obj: dict) -> bytes:
    return _chunk(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")


class Answer:
    """The precomputed frames of one model's answer (the id is fixed: nobody here checks it)."""

    def __init__(self, model: str, tokens: int, gap_ms: int) -> None:
        self.model, self.tokens, self.gap = model, tokens, gap_ms / 1000.0
        base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": _CREATED, "model": model}
        words = [(" " if i else "") + _WORDS[i % len(_WORDS)] for i in range(tokens)]
        self.text = "".join(words)

        def choice(delta: dict, finish: str | None = None) -> dict:
            return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        self.head = _event(choice({"role": "assistant", "content": ""}))
        self.deltas = [_event(choice({"content": w})) for w in words]
        self.finish = _event(choice({}, "stop"))
        usage = {"prompt_tokens": 12, "completion_tokens": tokens, "total_tokens": 12 + tokens}
        self.usage = _event({**base, "choices": [], "usage": usage})
        self.done = _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
        self.json = json.dumps(
            {
                "id": "chatcmpl-bench",
                "object": "chat.completion",
                "created": _CREATED,
                "model": model,
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": self.text}, "finish_reason": "stop"}
                ],
                "usage": usage,
            },
            separators=(",", ":"),
        ).encode()


_answers: dict[str, Answer] = {}


def answer_for(model: str) -> Answer | None:
    found = _answers.get(model)
    if found is None:
        m = _MODEL.match(model)
        if m is None:
            return None
        found = _answers[model] = Answer(model, int(m.group(1)), int(m.group(2) or 0))
    return found


_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)


def _plain(status: str, body: bytes, ctype: bytes = b"application/json") -> bytes:
    return b"HTTP/1.1 %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s" % (
        status.encode(), ctype, len(body), body)


async def _stream(writer: asyncio.StreamWriter, answer: Answer, usage: bool) -> None:
    writer.write(_STREAM_HEAD + answer.head)
    if answer.gap:
        start = time.monotonic()
        for i, frame in enumerate(answer.deltas):
            delay = start + i * answer.gap - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            writer.write(frame)
    else:
        for frame in answer.deltas:
            writer.write(frame)
            if writer.transport.get_write_buffer_size() > 65536:
                await writer.drain()
    writer.write(answer.finish + (answer.usage if usage else b"") + answer.done)
    await writer.drain()


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            lines = head.decode("latin-1").split("\r\n")
            method, path = [*lines[0].split(" "), "", ""][:2]
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip() or 0)
            if length > _MAX_BODY:
                writer.write(_plain("413 Payload Too Large", b'{"error":{"message":"too large"}}'))
                await writer.drain()
                return
            body = await reader.readexactly(length) if length else b""
            path = path.split("?", 1)[0]
            if method == "GET" and path.rstrip("/") in ("/v1/models", "/models"):
                writer.write(_plain("200 OK", b'{"object":"list","data":[]}'))
                continue
            if method != "POST" or not path.endswith("/chat/completions"):
                writer.write(_plain("404 Not Found", b'{"error":{"message":"no such route"}}'))
                continue
            try:
                request = json.loads(body)
                answer = answer_for(str(request.get("model", "")))
            except (ValueError, AttributeError):
                answer = None
            if answer is None:
                writer.write(_plain("400 Bad Request", b'{"error":{"message":"unknown model; use t<N>[-g<ms>]"}}'))
                continue
            if request.get("stream"):
                usage = bool((request.get("stream_options") or {}).get("include_usage"))
                await _stream(writer, answer, usage)
            else:
                writer.write(_plain("200 OK", answer.json))
                await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def serve(port: int) -> None:
    server = await asyncio.start_server(_handle, "127.0.0.1", port, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    print(f"fake upstream on http://127.0.0.1:{bound}/v1", flush=True)
    async with server:
        await server.serve_forever()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.port))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
