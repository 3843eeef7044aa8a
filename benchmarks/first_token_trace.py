"""Where a first text delta spends its time inside the router, hop by hop, journal on and off.

One router (`unbroken serve`, SQLite or DynamoDB Local) in front of a simulated upstream; the router process stamps
`time.perf_counter()` at each hop of the first `response.output_text.delta` of every stream:

- `request`: the ASGI app is called; `upstream_send` / `upstream_written`: httpx is called / the request's body is
  written (httpcore); `upstream_chunk`: the first content chunk leaves the provider's parser
  (the generation yields the delta);
- journal on: `emit` (into the open batch), `commit_start`, `commit_end` (the store committed its batch),
  `publish` (handed to this process's followers), `follow` (the POST's follower yields it);
- `frame` (rendered as SSE) and `send` (the body chunk holding it handed to the server);
- on the way to the upstream: `generation_start` (the attempt loop starts), and journal on `writer_init` /
  `writer_ready` (the journal writer built); `start` / `start_sent`: the response's status handed to the server /
  back from it (uvicorn writes the status line and headers to the socket in between).

The client stamps the same clock (`perf_counter` is CLOCK_MONOTONIC on Linux, one clock for every process) when it
sends the request, when the response's headers are in and when it reads the first delta (`client_*`).
The upstream (the benchmark's, `benchmarks.first_token upstream`) stamps the same clock when it has read each
request and when it writes its first content (`upstream_received`, `upstream_first_content`): the hops between
the router's request written and the upstream having it are another process's.

For each hop it prints the median time since the previous one over `--n` streams of each kind, the client's
marks against the router's, and the median `upstream_chunk -> send` of journal on minus off.
Run: `python -m benchmarks.first_token_trace [--store sqlite] [--n 40] [--no-pin]` (the router pinned apart from the
client and the upstream, as `benchmarks.first_token` does by default). A diagnosis tool: `benchmarks.first_token` is
the measurement from outside.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from benchmarks.first_token import KEY, UPSTREAM_STATS_PATH, _config, _prompt, _spawn, _stop, pinned

STATS_PATH = "/_bench/trace"
DELTA = "response.output_text.delta"
# In the order they happen: the service call returns before the upstream's first chunk (a journaled stream's
# response is called at once and waits for its first output before it sends its status; a direct one's is built
# on the upstream's first chunk), and the POST's first batch is in hand (no `follow`).
HOPS_ON = ("request", "service_return", "response_call", "upstream_chunk", "emit", "commit_start", "commit_end",
           "start", "iter_start", "frame", "iter_got", "send")
# Each of these is also printed as its time since `request` (medians of each stream's own).
ABS_HOPS = ("service", "writer_init", "writer_ready", "generation_start", "upstream_send", "upstream_written",
            "prepare_start", "prepare_end", "upstream_headers", "upstream_chunk", "emit", "commit_start",
            "create_start", "sql_start", "sql_end", "create_end", "publish", "commit_end", "start", "start_sent",
            "iter_start", "frame", "send")
HOPS_OFF = ("request", "service_return", "upstream_chunk", "response_call", "start", "iter_start", "frame",
            "iter_got", "send")


def _serve(argv: list[str]) -> int:
    import unbroken.api.app
    from unbroken.durable import follow as durable_follow
    from unbroken.journal import feed, writer
    from unbroken.protocol import sse
    from unbroken.resilience import attempts

    traces: list[dict[str, float]] = []
    current: dict[str, float] = {}

    def mark(name: str) -> None:
        if name not in current:
            current[name] = time.perf_counter()

    def is_first_delta(events: list[dict[str, Any]]) -> bool:
        return "upstream_chunk" in current and any(e.get("type") == DELTA for e in events)

    run = attempts.Generation.run

    async def traced_run(self: Any) -> Any:
        mark("generation_start")
        async for event in run(self):
            if event.get("type") == DELTA:
                mark("upstream_chunk")
            yield event

    emit = writer.JournalWriter.emit
    writer_init = writer.JournalWriter.__init__

    def traced_writer_init(self: Any, *args: Any, **kwargs: Any) -> None:
        mark("writer_init")
        writer_init(self, *args, **kwargs)
        mark("writer_ready")

    writer.JournalWriter.__init__ = traced_writer_init  # type: ignore[method-assign]

    async def traced_emit(self: Any, event: dict[str, Any]) -> None:
        if event.get("type") == DELTA:
            mark("emit")
        await emit(self, event)

    commit = writer.JournalWriter._commit

    async def traced_commit(self: Any, batch: Any) -> None:
        first = is_first_delta(batch.events) and "commit_start" not in current
        if first:
            mark("commit_start")
        try:
            await commit(self, batch)
        finally:
            if first:
                mark("commit_end")

    publish = feed.LocalFeeds.publish

    def traced_publish(self: Any, response_id: str, events: list[dict[str, Any]]) -> None:
        if is_first_delta(events):
            mark("publish")
        publish(self, response_id, events)

    follow = durable_follow.follow

    async def traced_follow(*args: Any, **kwargs: Any) -> Any:
        async for event in follow(*args, **kwargs):
            if event.get("type") == DELTA:
                mark("follow")
            yield event

    frame = sse.frame

    def traced_frame(event: dict[str, Any], **kwargs: Any) -> bytes:
        if event.get("type") == DELTA:
            mark("frame")
        return frame(event, **kwargs)

    import httpx as _httpx

    from unbroken.durable import service
    from unbroken.journal import dynamodb as _dynamodb
    from unbroken.journal import sqlite as _sqlite

    create_response = service.create_response

    async def traced_create_response(*args: Any, **kwargs: Any) -> Any:
        mark("service")
        try:
            return await create_response(*args, **kwargs)
        finally:
            mark("service_return")

    from httpcore._async import http11 as _httpcore11

    send_body = _httpcore11.AsyncHTTP11Connection._send_request_body

    async def traced_send_body(self: Any, request: Any) -> None:
        await send_body(self, request)
        mark("upstream_written")  # the request is out: what a journaled run's head start waits for

    _httpcore11.AsyncHTTP11Connection._send_request_body = traced_send_body  # type: ignore[method-assign]
    send = _httpx.AsyncClient.send

    async def traced_send_up(self: Any, request: Any, **kwargs: Any) -> Any:
        mark("upstream_send")
        response = await send(self, request, **kwargs)
        mark("upstream_headers")
        return response

    for cls in (_sqlite.SQLiteStore, _dynamodb.DynamoDBStore):
        def wrap(cls: Any = cls) -> None:
            create = cls.create

            async def traced_create(self: Any, header: Any, events: Any = None) -> None:
                mark("create_start")
                await create(self, header, events)
                mark("create_end")
            cls.create = traced_create
            prepare = cls.prepare

            async def traced_prepare(self: Any, header: Any) -> Any:
                mark("prepare_start")
                try:
                    return await prepare(self, header)
                finally:
                    mark("prepare_end")
            cls.prepare = traced_prepare
        wrap()

    try_inline = _sqlite.SQLiteStore._try_inline

    def traced_try_inline(self: Any, fn: Any) -> Any:
        # The SQLite create's own work on the loop (inline: 1) or its fall back to a thread (inline: 0).
        first = "create_start" in current and "sql_start" not in current
        if first:
            mark("sql_start")
        done = try_inline(self, fn)
        if first:
            mark("sql_end")
            current["inline"] = float(done[0])
        return done

    _sqlite.SQLiteStore._try_inline = traced_try_inline  # type: ignore[method-assign]

    from starlette.responses import StreamingResponse
    sr_call = StreamingResponse.__call__
    sr_stream = StreamingResponse.stream_response

    async def traced_sr_call(self: Any, scope: Any, receive: Any, send: Any) -> None:
        mark("response_call")
        await sr_call(self, scope, receive, send)

    async def traced_sr_stream(self: Any, send: Any) -> None:
        inner = self.body_iterator  # a journaled POST's (`OpeningSSE`) is set once its first output is durable

        async def traced_iter() -> Any:
            mark("iter_start")
            async for chunk in inner:
                mark("iter_got")
                yield chunk

        self.body_iterator = traced_iter()
        await sr_stream(self, send)

    StreamingResponse.__call__ = traced_sr_call  # type: ignore[method-assign]
    StreamingResponse.stream_response = traced_sr_stream  # type: ignore[method-assign]
    service.create_response = traced_create_response
    _httpx.AsyncClient.send = traced_send_up
    attempts.Generation.run = traced_run  # type: ignore[method-assign]
    writer.JournalWriter.emit = traced_emit  # type: ignore[method-assign]
    writer.JournalWriter._commit = traced_commit  # type: ignore[method-assign]
    feed.LocalFeeds.publish = traced_publish  # type: ignore[method-assign]
    durable_follow.follow = traced_follow  # type: ignore[assignment]
    sse.frame = traced_frame  # type: ignore[assignment]
    original = unbroken.api.app.create_app

    def create_app(*args: Any, **kwargs: Any) -> Any:
        app = original(*args, **kwargs)

        @app.get(STATS_PATH, include_in_schema=False)
        async def stats() -> list[dict[str, float]]:
            return traces

        async def traced_app(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http" or scope["path"] != "/v1/responses":
                return await app(scope, receive, send)
            current.clear()
            mark("request")

            async def traced_send(message: Any) -> None:
                if message["type"] == "http.response.start":
                    mark("start")
                if message["type"] == "http.response.body" and b"output_text.delta" in message.get("body", b""):
                    mark("send")
                await send(message)
                if message["type"] == "http.response.start":
                    mark("start_sent")

            await app(scope, receive, traced_send)
            traces.append(dict(current))

        return traced_app

    unbroken.api.app.create_app = create_app  # type: ignore[assignment]
    from unbroken.cli import main as cli_main

    return cli_main(argv)


def _medians(traces: list[dict[str, float]], hops: tuple[str, ...]) -> dict[str, float]:
    out = {}
    for prev, hop in itertools.pairwise(hops):
        values = [t[hop] - t[prev] for t in traces if hop in t and prev in t]
        if values:
            out[f"{prev} -> {hop}"] = round(statistics.median(values) * 1000.0, 3)
    span = [t["send"] - t["upstream_chunk"] for t in traces if "send" in t and "upstream_chunk" in t]
    out["upstream_chunk -> send"] = round(statistics.median(span) * 1000.0, 3)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        return _serve(argv)
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--store", default="sqlite", choices=("sqlite", "dynamodb"))
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--tps", type=float, default=50.0)
    parser.add_argument("--input-chars", type=int, default=2, help="size of the request's input (default \"hi\")")
    parser.add_argument("--upstream-ttft-ms", type=float, default=150.0, help="as in benchmarks.first_token")
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                        help="the router on half of the CPUs, the client and the upstream on the other half (as in "
                             "benchmarks.first_token; --no-pin: anywhere)")
    parser.add_argument("--save", type=Path, default=None, help="every stream's stamps, as JSON, here")
    args = parser.parse_args(argv)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "local")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "local")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "layers"), str(root)])}
    with pinned(args.pin) as router_cpus:
        return _trace(args, env, router_cpus)


def _trace(args: argparse.Namespace, env: dict[str, str], router_cpus: set[int] | None) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="unbroken-trace-"))
    # The benchmark's upstream: it stamps, on the same clock, when it has read each request and when it writes its
    # first content (`benchmarks.first_token upstream`).
    upstream, line = _spawn(["-m", "benchmarks.first_token", "upstream", "--port", "0"], "simulated upstream on",
                            env)
    upstream_url = line.split()[-1]
    ddb = None
    router = None
    try:
        (tmp / "router.yaml").write_text(_config(upstream_url, None))
        extra: list[str] = []
        if args.store == "sqlite":
            url = f"sqlite:///{tmp / 'journal.db'}"
        else:
            from tests.support.dynamodb_local import DynamoDBLocal

            ddb = DynamoDBLocal().start()  # with the client and the upstream, as in benchmarks.first_token
            url = f"dynamodb://trace-{uuid.uuid4().hex[:8]}?region=us-east-1&endpoint_url={ddb.endpoint_url}"
            extra = ["--create-table"]
        router, ready = _spawn(["-m", "benchmarks.first_token_trace", "serve", "--config", str(tmp / "router.yaml"),
                                "--port", "0", "--store", url, "--log-level", "WARNING", *extra],
                               "unbroken ready on", env, router_cpus)
        base = ready.split()[3]
        metadata = {"sim_length": "20", "sim_tps": str(args.tps)} if args.tps else {"sim_length": "20"}
        if args.upstream_ttft_ms:
            metadata["sim_ttft_ms"] = str(args.upstream_ttft_ms)
        body = {"model": "bench", "input": _prompt(args.input_chars), "stream": True, "metadata": metadata}
        hdr = {"authorization": f"Bearer {KEY}"}
        kinds = []
        client_marks: list[dict[str, float | None]] = []
        with httpx.Client(timeout=60) as client:
            tags = []
            for i in range(args.n * 2 + 6):
                on = i % 2 == 0
                tags.append(uuid.uuid4().hex)
                tagged = {**body, "metadata": {**metadata, "sim_bench_id": tags[-1]}}
                sent, first_delta = time.perf_counter(), None
                with client.stream("POST", f"{base}/responses", json=tagged if on else {**tagged, "store": False},
                                   headers=hdr) as response:
                    headers_in = time.perf_counter()
                    for line in response.iter_lines():
                        if first_delta is None and DELTA in line:
                            first_delta = time.perf_counter()
                kinds.append(on)
                client_marks.append({"client_sent": sent, "client_headers": headers_in, "client_delta": first_delta})
            traces = client.get(f"{base.removesuffix('/v1')}{STATS_PATH}").raise_for_status().json()
            stamps_url = f"{upstream_url.removesuffix('/v1')}{UPSTREAM_STATS_PATH.decode()}"
            stamps = client.get(stamps_url).raise_for_status().json()
        for trace, marks, tag in zip(traces, client_marks, tags, strict=True):
            trace.update({k: v for k, v in marks.items() if v is not None})
            trace.update({f"upstream_{k}": v for k, v in stamps.get(tag, {}).items()})
        traces, kinds = traces[6:], kinds[6:]  # the first streams warm the paths
        if args.save is not None:
            args.save.write_text(json.dumps([{**t, "journal": k} for t, k in zip(traces, kinds, strict=True)]))
        on_t = [t for t, k in zip(traces, kinds, strict=True) if k]
        off_t = [t for t, k in zip(traces, kinds, strict=True) if not k]
        result = {"journal_on": _medians(on_t, HOPS_ON), "journal_off": _medians(off_t, HOPS_OFF)}
        for name, ts in (("on", on_t), ("off", off_t)):
            for a, b in (("client_sent", "request"), ("upstream_written", "upstream_received"),
                         ("upstream_received", "upstream_first_content"), ("upstream_first_content", "upstream_chunk"),
                         ("start", "client_headers"), ("send", "client_delta"), ("upstream_chunk", "client_delta")):
                vals = [t[b] - t[a] for t in ts if a in t and b in t]
                if vals:
                    result[f"journal_{name}"][f"{a} -> {b} (one clock)"] = round(statistics.median(vals) * 1e3, 3)
            for hop in ABS_HOPS:
                vals = [t[hop] - t["request"] for t in ts if hop in t]
                if vals:
                    result[f"journal_{name}"][f"request -> {hop} (abs)"] = round(statistics.median(vals) * 1e3, 3)
        inline = [t["inline"] for t in on_t if "inline" in t]
        if inline:
            result["journal_on"]["SQLite creates run inline (share)"] = round(statistics.fmean(inline), 3)
        result["journal_adds_ms"] = round(result["journal_on"]["upstream_chunk -> send"]
                                          - result["journal_off"]["upstream_chunk -> send"], 3)
        print(json.dumps(result, indent=2))
    finally:
        if router is not None:
            _stop(router)
        _stop(upstream)
        if ddb is not None:
            ddb.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
