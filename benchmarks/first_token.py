"""What durability costs the first token: added time to the first text delta, and the longest gap between delivered
deltas, with the journal off and on (SQLite, DynamoDB Local), against what one store commit costs in the same run.

A simulated OpenAI-compatible upstream is paced at `--tps` tokens per second (50 tokens, 20 ms apart by default). One
router per store runs in front of it at the same time (`--store none`, SQLite, DynamoDB Local when its jar is
there), each started through this module (`serve`: `unbroken serve` plus a count and a clock on the store's
`create` / `append` and on the first text delta's way through the router, read at `GET /_bench/first_token`). The
script streams `POST /v1/responses` in rounds: every round sends the same request straight to the upstream, once
through every router, and once more through every journaled router with `store: false` (the same process with the
journal off for that request: the baseline the journal's share is paired with), in an order that puts each
router's journal-on and journal-off streams half a round apart, the one or the other first in turn (`_round`), so
that neither always follows the longer idle on that router; between rounds it times, on a store like each router's
and from this process,
one header `create`, one `append` of a small batch, and a header created with a first batch built like a
router's ("one commit": the write a first token waits for, since the header goes in with the first output), once
back to back with those and once after the idle wait a router's first commit follows.
`--repeat` blocks of `--n` rounds each show whether the figures are stable; the summary is the median over the
blocks.

Per target it reports:
- added TTFT p50 / p95: the router's first `response.output_text.delta` minus the upstream's first content chunk
  of the same round; for a journaled store also the journal's share, paired round by round with the same router's
  `store: false` stream (`journal_added_ttft_ms_p50` / `_p95`), in milliseconds and in commits, and inside the
  router (`in_router_journal_added_ms_p50`: from the generation yielding the first delta to its SSE frame, journal
  on minus off);
- the same with the upstream's own time to its first token taken out (`_net_`): the upstream (`_upstream`, the
  simulator with two stamps) notes when it has read each tagged request and when it writes its first content
  chunk, on the clock this process reads too, so every stream's time splits into the way to the upstream
  (`journal_added_pre_ms_p50`: sent to read), the upstream's own time (not the router's: its request handling and
  its timer's wake-up, a millisecond of spread) and the way back (`journal_added_post_ms_p50`: first content
  written to the first delta read). `journal_added_ttft_net_ms_p50` is the paired share without the middle part;
- one commit: p50 of the probe's header created with a first batch after the upstream's time to its first token
  of idle (`--upstream-ttft-ms`), as a router's first commit always comes (the write a first token waits for, what
  the first-token goal compares with); the same write back to back with the probe's others, which finds the
  process and the store warm and costs less; p50 / p95 of its `append` of 5 deltas (what the gap goal adds), the
  bare create, and p50 / p95 of the router's own commits and of its first commits, for comparison;
- max gap: per stream the longest time between two consecutive deltas the client received; p50 / p95 / worst over
  the streams (the bound: `journal_batch_ms` + one commit, plus the jitter the same router shows with the journal
  off in the same run beyond the upstream's pacing interval);
- writes per stream: the router's creates + appends (batches and lease renewals) / journaled streams, next to the
  bound `ceil(stream time / journal_batch_ms) + 1 (the create) + 3 per output item (its first content, its end,
  the terminal batch)`.

`--check` prints, per journaled store, whether the goals hold (journal-added TTFT p50, net, within one commit p50, with
the difference over all rounds pooled and its 95% bootstrap interval beside it; max
gap p50 and p95 within their bounds; writes within the bound) and exits 1 if one does not. `--write` puts the
figures into `docs/bench/results.json` (key `first_token`) and re-renders `docs/bench/results.md` and the README's
generated blocks (`benchmarks.report`). `make bench` runs it as one of its steps.

Run: `python -m benchmarks.first_token [--n 20] [--repeat 3] [--stores none,sqlite,dynamodb] [--check] [--write]`.
`--root` runs the routers (and the upstream) from another checkout's `layers/` (e.g. main), so the same script
measures before and after a change. Separate processes on 127.0.0.1, nothing else shared.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-bench"
DELTA = "response.output_text.delta"
STATS_PATH = "/_bench/first_token"
STORES = ("none", "sqlite", "dynamodb")
# Per output item, the writes the journal may add to one per batch window: the item's first content (at once), its
# end (a boundary), and the terminal batch; plus the header's create once per response.
WRITES_PER_ITEM = 3
ITEMS_PER_STREAM = 1  # the simulated answer is one message


# -- the router side: `python -m benchmarks.first_token serve <unbroken serve arguments>` ---------------------------

def _serve(argv: list[str]) -> int:
    """`unbroken serve` with the store's creates and appends counted and timed (a list append per call, next to a
    store round trip), and `GET /_bench/first_token` returning them."""
    import unbroken.api.app
    from unbroken.journal import dynamodb, memory, sqlite

    writes = {"creates": 0, "appends": 0, "renewals": 0}
    commit_s: list[float] = []
    first_commit_s: list[float] = []

    def clock(cls: Any) -> None:
        create, append = cls.create, cls.append

        async def timed_create(self: Any, header: Any, events: list[dict[str, Any]] | None = None) -> None:
            t0 = time.perf_counter()
            await create(self, header, events)
            if events:  # the header written with the first batch: the commit a first token waits for
                commit_s.append(time.perf_counter() - t0)
                first_commit_s.append(commit_s[-1])
            writes["creates"] += 1

        async def timed_append(self: Any, response_id: str, epoch: int, events: list[dict[str, Any]],
                               **kwargs: Any) -> bool:
            t0 = time.perf_counter()
            result: bool = await append(self, response_id, epoch, events, **kwargs)
            if events:
                commit_s.append(time.perf_counter() - t0)
                writes["appends"] += 1
            else:
                writes["renewals"] += 1
            return result

        cls.create, cls.append = timed_create, timed_append

    for cls in (sqlite.SQLiteStore, dynamodb.DynamoDBStore, memory.MemoryStore):
        clock(cls)

    # Inside the router, per response: the generation yields its first text delta -> that delta's SSE frame is
    # rendered (journal off: a queue hop; on: the commit it waits for, and the follower's hops). Keyed by item id.
    from unbroken.protocol import sse
    from unbroken.resilience import attempts

    emitted: dict[str, float] = {}
    seen: set[str] = set()
    held_s: list[float] = []
    run, frame = attempts.Generation.run, sse.frame

    async def timed_run(self: Any) -> Any:
        async for event in run(self):
            if event.get("type") == DELTA and event["item_id"] not in seen:
                seen.add(event["item_id"])
                emitted[event["item_id"]] = time.perf_counter()
            yield event

    def timed_frame(event: dict[str, Any], **kwargs: Any) -> bytes:
        if event.get("type") == DELTA:
            started = emitted.pop(event["item_id"], None)
            if started is not None:
                held_s.append(time.perf_counter() - started)
        return frame(event, **kwargs)

    attempts.Generation.run, sse.frame = timed_run, timed_frame  # type: ignore[assignment]
    original = unbroken.api.app.create_app

    def create_app(*args: Any, **kwargs: Any) -> Any:
        app = original(*args, **kwargs)

        @app.get(STATS_PATH, include_in_schema=False)
        async def stats() -> dict[str, Any]:
            return {**writes, "commit_ms": [round(s * 1000.0, 3) for s in commit_s],
                    "first_commit_ms": [round(s * 1000.0, 3) for s in first_commit_s],
                    "first_delta_held_ms": [round(s * 1000.0, 3) for s in held_s]}

        return app

    unbroken.api.app.create_app = create_app  # what `serve` calls
    from unbroken.cli import main as cli_main

    return cli_main(argv)


# -- the upstream side: `python -m benchmarks.first_token upstream <simulator arguments>` ---------------------------

UPSTREAM_STATS_PATH = b"/_bench/upstream"


def _upstream(argv: list[str]) -> int:
    """The simulated upstream, stamping (`time.perf_counter()`, one clock for every process on Linux) when each
    chat request tagged `sim_bench_id` has been read and when its first content chunk is written, read at `GET
    /_bench/upstream`: so the bench can take the upstream's own time to its first token (its request handling,
    its timer's wake-up) out of every stream's, the router's and the direct ones alike."""
    from unbroken.simulator import __main__ as simulator_main
    from unbroken.simulator.exchange import Exchange
    from unbroken.simulator.server import SimulatedUpstream

    stamps: dict[str, dict[str, float]] = {}
    chat, respond, data = SimulatedUpstream._chat, SimulatedUpstream._respond, Exchange.data

    async def stamped_chat(self: Any, ex: Any, raw: bytes) -> None:
        received = time.perf_counter()
        metadata = json.loads(raw).get("metadata") or {}
        if isinstance(metadata, dict) and isinstance(metadata.get("sim_bench_id"), str):
            ex.bench_stamp = stamps[metadata["sim_bench_id"]] = {"received": received}
        await chat(self, ex, raw)

    async def stamped_data(self: Any, payload: bytes) -> None:
        stamp = getattr(self, "bench_stamp", None)
        if stamp is not None and "first_content" not in stamp and b'{"content":' in payload:
            stamp["first_content"] = time.perf_counter()  # the chunk leaves in this write
        await data(self, payload)

    async def stats_or_respond(self: Any, ex: Any, request: Any, raw: bytes) -> None:
        if request.target == UPSTREAM_STATS_PATH:
            await ex.json(200, stamps)
            stamps.clear()
            return
        await respond(self, ex, request, raw)

    SimulatedUpstream._chat = stamped_chat  # type: ignore[method-assign]
    SimulatedUpstream._respond = stats_or_respond  # type: ignore[method-assign]
    Exchange.data = stamped_data  # type: ignore[method-assign]
    simulator_main.main(argv)
    return 0


# -- the client side --------------------------------------------------------------------------------------------

def _spawn(args: list[str], ready: str, env: dict[str, str],
           cpus: set[int] | None = None) -> tuple[subprocess.Popen[str], str]:
    """Start `python args...` and wait for its first line, which must start with `ready`; `cpus`: the CPUs the
    process (and every thread it starts) may run on."""
    pin = None if cpus is None else (lambda: os.sched_setaffinity(0, cpus))
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=env, cwd=ROOT, preexec_fn=pin)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith(ready):
        proc.kill()
        raise RuntimeError(f"{args[:3]} did not start: {line!r}")
    return proc, line


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _config(upstream_url: str, batch_ms: float | None) -> str:
    server = "" if batch_ms is None else f"server: {{journal_batch_ms: {batch_ms:g}}}\n"
    # Every request reads its tenant's record (budgets, limits) through a cache of at most 5 s. A round sends a
    # router its journal-on and journal-off streams back to back and then nothing for longer than that, so with
    # the cache on the journal-on stream found it cold and paid the read (DynamoDB Local ~3 ms) that the
    # journal-off stream right after it did not: a cost that is not the journal's, in the journal's share. Read
    # every time, both streams of a pair pay it alike.
    return f"""{server}
auth: {{key_cache_seconds: 0}}
api_keys: [{{key: {KEY}, tenant: bench}}]
models:
  - name: bench
    deployments:
      - name: sim
        provider: simulated
        model: sim
        base_url: {upstream_url}
"""


def _times(client: httpx.Client, url: str, body: dict[str, Any], headers: dict[str, str], direct: bool,
           target: _Target) -> None:
    """One stream, tagged for the upstream's stamps: into `target`, the arrival times (seconds after the request
    was sent) of its content deltas, the time it was sent and its tag."""
    tag = uuid.uuid4().hex
    body = {**body, "metadata": {**body["metadata"], "sim_bench_id": tag}}
    out: list[float] = []
    start = time.perf_counter()
    with client.stream("POST", url, json=body, headers=headers) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url}: {response.status_code} {response.read().decode(errors='replace')[:500]}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter() - start
            event = json.loads(line[6:])
            if direct:
                choices = event.get("choices") or [{}]
                if (choices[0].get("delta") or {}).get("content"):
                    out.append(now)
            elif event.get("type") == DELTA:
                out.append(now)
    if not out:
        raise RuntimeError(f"no content from {url}")
    target.streams.append(out)
    target.sent_at.append(start)
    target.tags.append(tag)


def _prompt(chars: int) -> str:
    """"hi", or a prompt of about `chars` characters of made-up words (as compressible as prose, roughly)."""
    if chars <= 2:
        return "hi"
    rng = random.Random(7)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    out: list[str] = []
    size = 0
    while size < chars:
        out.append(rng.choice(words))
        size += len(out[-1]) + 1
    return " ".join(out)[:chars]


def _max_gap(times: list[float]) -> float:
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def _pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation; the median for q=0.5."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _ms(x: float) -> float:
    return round(x * 1000.0, 2)


class _StoreProbe:
    """Times one header `create` and one `append` of a small batch on a store like a router's, between streams."""

    def __init__(self, url: str, body: dict[str, Any], idle_s: float) -> None:
        from unbroken.journal.backends import open_store

        self.body = body  # the request the routers get: the probe's first batch is built from it
        self.idle_s = idle_s
        self.loop = asyncio.new_event_loop()
        self.store = open_store(url)
        self.create_s: list[float] = []
        self.commit_s: list[float] = []
        self.first_commit_s: list[float] = []
        self.first_commit_hot_s: list[float] = []

    def sample(self) -> None:
        self.loop.run_until_complete(self._sample())

    async def _sample(self) -> None:
        from unbroken.journal.store import ResponseHeader

        now = time.time()
        rid = f"resp_probe_{uuid.uuid4().hex}"
        events = [{"type": DELTA, "sequence_number": i, "item_id": "msg_probe", "output_index": 0,
                   "content_index": 0, "delta": " token", "logprobs": []} for i in range(5)]
        t0 = time.perf_counter()
        await self.store.create(ResponseHeader(id=rid, tenant="probe", created_at=now, expires_at=now + 600))
        t1 = time.perf_counter()
        await self.store.append(rid, 0, events, lease_expires_at=now + 30)
        t2 = time.perf_counter()
        self.create_s.append(t1 - t0)
        self.commit_s.append(t2 - t1)
        # The write a first token waits for, back to back with those, then after the wait a router's first commit
        # always follows: the upstream's time to its first token, with the process and the store idle. A write
        # right after another one finds warm caches, a running CPU and a busy server thread, and costs less (on
        # DynamoDB Local 2.3 against 3.5 ms for a PutItem): what the first token waits for is the write after the
        # wait.
        self.first_commit_hot_s.append(await self._first_commit(now, idle_s=0.0))
        self.first_commit_s.append(await self._first_commit(now, idle_s=self.idle_s))

    async def _first_commit(self, now: float, *, idle_s: float) -> float:
        """Seconds one header created with its first batch takes, both built by the router's own code from the
        benchmark's request (the start events carry the whole response object, then the item, its part and the
        first delta) and prepared as a router prepares them while its upstream call is in flight, `idle_s` before."""
        from unbroken.ir import TextDelta
        from unbroken.journal.store import ResponseHeader
        from unbroken.protocol.request import CreateResponseBody, response_skeleton
        from unbroken.protocol.responses import ResponseEmitter

        rid = f"resp_probe_{uuid.uuid4().hex}"
        emitter = ResponseEmitter(response_skeleton(CreateResponseBody.model_validate(self.body), rid, "bench"))
        first = emitter.start() + emitter.in_progress() + emitter.apply(TextDelta(" token"))
        header = ResponseHeader(id=rid, tenant="probe", created_at=now, expires_at=now + 600,
                                status="in_progress", lease_expires_at=now + 30,
                                request={**self.body, "_recovery_events": False, "_key_id": "yaml-0"})
        prepared = await self.store.prepare(header)
        if idle_s:
            await asyncio.sleep(idle_s)  # the upstream's wait, reproduced: not a synchronisation
        t0 = time.perf_counter()
        await self.store.create(prepared, first)
        return time.perf_counter() - t0

    def close(self) -> None:
        self.loop.run_until_complete(self.store.close())
        self.loop.close()


class _Router:
    """One router process and the probe of a store like its own."""

    def __init__(self, name: str, url: str, proc: subprocess.Popen[str], probe: _StoreProbe | None) -> None:
        self.name = name
        self.url = url
        self.proc = proc
        self.probe = probe
        self.sent: list[str] = []  # the targets of the streams sent to it, in order (it serves one at a time)

    def stats(self, client: httpx.Client) -> dict[str, Any]:
        got: dict[str, Any] = client.get(f"{self.url.removesuffix('/v1')}{STATS_PATH}").raise_for_status().json()
        return got


class _Target:
    """Where a stream goes: straight to the upstream (`router` None), or a router with the journal as configured
    (`store` True) or off for this request (`store: false`, the same process: its journal-off baseline)."""

    def __init__(self, name: str, url: str, router: _Router | None = None, *, store: bool = True) -> None:
        self.name = name
        self.url = url
        self.router = router
        self.store = store
        self.streams: list[list[float]] = []
        self.sent_at: list[float] = []  # perf_counter when each stream was sent
        self.tags: list[str] = []  # each stream's sim_bench_id
        # Each stream's way to the upstream (sent to the upstream having read it) and back (the upstream writing its
        # first content to the first delta read), as the upstream stamped them; their sum is its time to its first
        # delta without the upstream's own.
        self.pre: list[float] = []
        self.post: list[float] = []

    def net_ttft(self) -> list[float]:
        return [a + b for a, b in zip(self.pre, self.post, strict=True)]


def _round(targets: list[_Target], flip: bool = False) -> list[_Target]:
    """One round's order: the upstream straight, each journaled router with the journal on, then one more stream
    (`--store none`'s, or a spacer straight to the upstream whose figures are not kept), then the same routers with
    the journal off; with `flip`, off before on. So a router's journal-on and journal-off streams are half a round
    apart. The gap before the first of them is the longer (the probe's writes and the direct stream come between
    rounds), and a router's work before its upstream call costs more after a longer idle (colder caches; DynamoDB
    Local's first read after one, a millisecond or more): rounds alternate which of the two comes first, so that
    neither always has the longer idle (with on always first, the journal's share showed 0.25 ms of it before
    the upstream had the request)."""
    by_name = {t.name: t for t in targets}
    on = [t for t in targets if t.router is not None and t.store and f"{t.name}_off" in by_name]
    off = [by_name[f"{t.name}_off"] for t in on]
    direct = [t for t in targets if t.router is None]
    rest = [t for t in targets if t not in direct and t not in on and t not in off]
    if not rest:
        rest = [_Target("spacer", direct[0].url)]
    first, second = (off, on) if flip else (on, off)
    return [*direct, *first, *rest, *second]


def _block(client: httpx.Client, targets: list[_Target], n: int, bodies: dict[str, dict[str, Any]],
           batch_ms: float) -> dict[str, Any]:
    """`n` rounds over every target; the figures of this block."""
    hdr = {"authorization": f"Bearer {KEY}"}
    routers = list({id(t.router): t.router for t in targets if t.router is not None}.values())
    before = {r.name: r.stats(client) for r in routers}
    for t in targets:
        t.streams, t.sent_at, t.tags, t.pre, t.post = [], [], [], [], []
    for r in routers:
        r.sent = []
    upstream_stats = f"{targets[0].url.removesuffix('/v1')}{UPSTREAM_STATS_PATH.decode()}"
    client.get(upstream_stats).raise_for_status()  # clears what the warm-up left
    for i in range(n):
        for t in _round(targets, flip=i % 2 == 1):
            if t.router is None:
                _times(client, f"{t.url}/chat/completions", bodies["direct"], {}, True, t)
            else:
                body = bodies["routed"] if t.store else {**bodies["routed"], "store": False}
                _times(client, f"{t.url}/responses", body, hdr, False, t)
                t.router.sent.append(t.name)
        for r in routers:
            if r.probe is not None:
                r.probe.sample()
    stamps = client.get(upstream_stats).raise_for_status().json()
    for t in targets:
        for times, sent, tag in zip(t.streams, t.sent_at, t.tags, strict=True):
            stamp = stamps[tag]
            t.pre.append(stamp["received"] - sent)
            t.post.append(sent + times[0] - stamp["first_content"])
    direct = targets[0].streams
    stream_s = statistics.median(s[-1] for s in direct)
    out: dict[str, Any] = {"upstream": {"ttft_ms_p50": _ms(statistics.median(s[0] for s in direct)),
                                        "max_gap_ms_p50": _ms(statistics.median(_max_gap(s) for s in direct)),
                                        "stream_ms_p50": _ms(stream_s)}}
    after = {r.name: r.stats(client) for r in routers}
    by_name = {t.name: t for t in targets}
    for t in targets:
        if t.router is None:
            continue
        r, b, a = t.router, before[t.router.name], after[t.router.name]
        added = [x[0] - d[0] for x, d in zip(t.streams, direct, strict=True)]
        added_net = [x - d for x, d in zip(t.net_ttft(), targets[0].net_ttft(), strict=True)]
        gaps = [_max_gap(s) for s in t.streams]
        # Inside the router: one first text delta per stream, in the order the streams were sent to it.
        held_all = a["first_delta_held_ms"][len(b["first_delta_held_ms"]):]
        held = [h for h, name in zip(held_all, r.sent, strict=False) if name == t.name]
        row: dict[str, Any] = {
            "added_ttft_ms_p50": _ms(_pct(added, 0.5)), "added_ttft_ms_p95": _ms(_pct(added, 0.95)),
            "added_ttft_net_ms_p50": _ms(_pct(added_net, 0.5)),
            "max_gap_ms_p50": _ms(_pct(gaps, 0.5)), "max_gap_ms_p95": _ms(_pct(gaps, 0.95)),
            "max_gap_ms_worst": _ms(max(gaps)), "deltas_per_stream": len(t.streams[0]),
        }
        if held:
            row["in_router_first_delta_held_ms_p50"] = round(_pct(held, 0.5), 2)
        if t.store and r.probe is not None:
            done = len(t.streams)  # the journal-off variant of the same router writes nothing
            commits = a["commit_ms"][len(b["commit_ms"]):]
            row["writes_per_stream"] = round(sum(a[k] - b[k] for k in ("creates", "appends", "renewals")) / done, 2)
            row["appends_per_stream"] = round((a["appends"] - b["appends"]) / done, 2)
            row["writes_bound"] = math.ceil(stream_s * 1000.0 / batch_ms) + 1 + WRITES_PER_ITEM * ITEMS_PER_STREAM
            if commits:
                row["router_commit_ms_p50"] = round(_pct(commits, 0.5), 2)
                row["router_commit_ms_p95"] = round(_pct(commits, 0.95), 2)
            firsts = a.get("first_commit_ms", [])[len(b.get("first_commit_ms", [])):]
            if firsts:  # the router's own first commits, in the streams themselves
                row["router_first_commit_ms_p50"] = round(_pct(firsts, 0.5), 2)
            commit = r.probe.commit_s[-n:]
            row["commit_ms_p50"] = _ms(_pct(commit, 0.5))
            row["commit_ms_p95"] = _ms(_pct(commit, 0.95))
            row["create_ms_p50"] = _ms(_pct(r.probe.create_s[-n:], 0.5))
            row["first_commit_ms_p50"] = _ms(_pct(r.probe.first_commit_s[-n:], 0.5))
            row["first_commit_ms_rounds"] = [_ms(x) for x in r.probe.first_commit_s[-n:]]
            row["first_commit_hot_ms_p50"] = _ms(_pct(r.probe.first_commit_hot_s[-n:], 0.5))
            off = by_name.get(f"{t.name}_off")
            if off is not None:
                journal = [x[0] - z[0] for x, z in zip(t.streams, off.streams, strict=True)]
                row["journal_added_ttft_ms_p50"] = _ms(_pct(journal, 0.5))
                row["journal_added_ttft_ms_p95"] = _ms(_pct(journal, 0.95))
                row["journal_added_ttft_ms_rounds"] = [_ms(x) for x in journal]  # the spread behind the p50
                net = [x - z for x, z in zip(t.net_ttft(), off.net_ttft(), strict=True)]
                row["journal_added_ttft_net_ms_p50"] = _ms(_pct(net, 0.5))
                row["journal_added_ttft_net_ms_p95"] = _ms(_pct(net, 0.95))
                row["journal_added_ttft_net_ms_rounds"] = [_ms(x) for x in net]
                # Where it goes: before the upstream had the request, and from its first content to the client.
                for part, on_, off_ in (("pre", t.pre, off.pre), ("post", t.post, off.post)):
                    row[f"journal_added_{part}_ms_p50"] = _ms(_pct([x - z for x, z in zip(on_, off_, strict=True)],
                                                                   0.5))
                row["journal_added_ttft_in_commits"] = round(  # what the goal compares
                    row["journal_added_ttft_net_ms_p50"] / max(row["first_commit_ms_p50"], 0.01), 2)
                off_held = [h for h, name in zip(held_all, r.sent, strict=False) if name == off.name]
                if held and off_held:
                    row["in_router_journal_added_ms_p50"] = round(_pct(held, 0.5) - _pct(off_held, 0.5), 2)
            none = by_name.get("none")
            if none is not None:
                row["vs_store_none_added_ttft_ms_p50"] = _ms(
                    _pct([x[0] - z[0] for x, z in zip(t.streams, none.streams, strict=True)], 0.5))
        out[t.name] = row
    return out


def _bootstrap_difference(a: list[float], b: list[float], *, resamples: int = 2000) -> list[float]:
    """The 95% percentile bootstrap interval of median(a) - median(b), the rounds resampled with replacement (a
    fixed seed: the same figures give the same interval). Whether the journal's share is above one commit by more
    than this machine's spread, or within it."""
    rng = random.Random(20261204)
    diffs = sorted(statistics.median(rng.choices(a, k=len(a))) - statistics.median(rng.choices(b, k=len(b)))
                   for _ in range(resamples))
    return [round(_pct(diffs, 0.025), 2), round(_pct(diffs, 0.975), 2)]


def _summary(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    """The median over the blocks of every figure (the worst gap: the worst of all), and the spread of the
    journal-added TTFT across blocks."""
    out: dict[str, Any] = {}
    for name in blocks[0]:
        rows = [b[name] for b in blocks]
        merged: dict[str, Any] = {}
        for key in rows[0]:
            values = [r[key] for r in rows if key in r]
            if isinstance(values[0], list):  # a block's figure per round: in the blocks only
                continue
            merged[key] = max(values) if key.endswith("_worst") else round(statistics.median(values), 2)
        if "journal_added_ttft_ms_p50" in rows[0]:
            merged["journal_added_ttft_ms_p50_per_block"] = [r["journal_added_ttft_ms_p50"] for r in rows]
            merged["commit_ms_p50_per_block"] = [r["commit_ms_p50"] for r in rows]
        if all("journal_added_ttft_net_ms_rounds" in r and "first_commit_ms_rounds" in r for r in rows):
            net = [x for r in rows for x in r["journal_added_ttft_net_ms_rounds"]]
            commit = [x for r in rows for x in r["first_commit_ms_rounds"]]
            merged["net_minus_commit_ms"] = round(statistics.median(net) - statistics.median(commit), 2)
            merged["net_minus_commit_ms_ci95"] = _bootstrap_difference(net, commit)
            merged["pooled_rounds"] = len(net)
        out[name] = merged
    return out


def goals(results: dict[str, Any]) -> list[tuple[str, str, bool, str]]:
    """(store, goal, holds, the figures) for every journaled store in `results["summary"]`.

    The gap goal allows for the machine's own jitter as the same router shows it with the journal off in the same
    run: its longest gap beyond the upstream's pacing interval (on a shared 2-core machine a process may wait
    milliseconds for a CPU; that is not the journal's doing, and it is in the journaled streams as much)."""
    out = []
    summary = results["summary"]
    interval = 1000.0 / results["tps"] if results["tps"] else 0.0
    for store in ("sqlite", "dynamodb"):
        s = summary.get(store)
        if not isinstance(s, dict) or "commit_ms_p50" not in s:
            continue
        off = summary.get(f"{store}_off", summary.get("none"))
        none = off if isinstance(off, dict) else None
        if "journal_added_ttft_ms_p50" in s:
            # The commit a first token waits for: the header created with the first batch (one write); older
            # results have only the append of a small batch. The journal's share is the one with the upstream's
            # own time to its first token taken out where the upstream stamped it (`_upstream`): that time is not
            # the router's, and its noise (the upstream's timer, its request handling) is part of the spread.
            c = s.get("first_commit_ms_p50", s["commit_ms_p50"])
            net = "journal_added_ttft_net_ms_p50" in s
            j = s["journal_added_ttft_net_ms_p50" if net else "journal_added_ttft_ms_p50"]
            split = (f"; the upstream's own time taken out: before the upstream had the request "
                     f"{s['journal_added_pre_ms_p50']:.2f}, from its first content to the client "
                     f"{s['journal_added_post_ms_p50']:.2f}; with it {s['journal_added_ttft_ms_p50']:.2f}"
                     if net else "")
            out.append((store, "first token within one commit of the journal off", j <= c,
                        f"journal adds {j:.2f} ms (p50 of rounds paired with the same router, store: false{split}"
                        f"), one commit {c:.2f} ms (p50 of the header "
                        f"created with a first batch"
                        + (f" after the upstream's wait; back to back {s['first_commit_hot_ms_p50']:.2f} ms"
                           if "first_commit_hot_ms_p50" in s else "")
                        + f"; an append of 5 deltas {s['commit_ms_p50']:.2f} ms)"
                        + (f"; over the {s['pooled_rounds']} rounds pooled, the share minus one commit is "
                           f"{s['net_minus_commit_ms']:+.2f} ms, 95% bootstrap interval "
                           f"{s['net_minus_commit_ms_ci95'][0]:+.2f} to {s['net_minus_commit_ms_ci95'][1]:+.2f}"
                           if "net_minus_commit_ms_ci95" in s else "")))
        holds = True
        figures = []
        for q in ("p50", "p95"):
            noise = max(0.0, none[f"max_gap_ms_{q}"] - interval) if none is not None else 0.0
            bound = results["batch_ms"] + s[f"commit_ms_{q}"] + noise
            holds = holds and s[f"max_gap_ms_{q}"] <= bound
            figures.append(f"{q} {s[f'max_gap_ms_{q}']:.1f} <= {results['batch_ms']:g} + commit "
                           f"{s[f'commit_ms_{q}']:.2f} + jitter {noise:.1f} = {bound:.1f} ms")
        own = (f"; the streams' own appends took {s['router_commit_ms_p50']:.2f} / {s['router_commit_ms_p95']:.2f} ms "
               f"p50 / p95" if "router_commit_ms_p95" in s else "")
        out.append((store, "gap between tokens within journal_batch_ms + one commit", holds,
                    "max gap " + "; ".join(figures) + f" (worst {s['max_gap_ms_worst']:.1f} ms){own}"))
        w, wb = s["writes_per_stream"], s["writes_bound"]
        out.append((store, "writes per stream within one per window + a few per item", w <= wb,
                    f"{w:.1f} writes per stream, bound {wb:g}"))
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    # DynamoDB Local accepts any credentials; the signer (in the routers and in the probe here) only needs some.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "local")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "local")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(args.root.resolve() / "layers"), str(ROOT)])}
    metadata = {"sim_length": str(args.tokens)}
    if args.tps:
        metadata["sim_tps"] = str(args.tps)
    if args.upstream_ttft_ms:
        metadata["sim_ttft_ms"] = str(args.upstream_ttft_ms)
    prompt = _prompt(args.input_chars)
    bodies = {"direct": {"model": "sim", "messages": [{"role": "user", "content": prompt}], "stream": True,
                         "metadata": metadata},
              "routed": {"model": "bench", "input": prompt, "stream": True, "metadata": metadata}}
    from unbroken.config import ServerSettings

    batch_ms = args.batch_ms if args.batch_ms is not None else ServerSettings().journal_batch_ms
    with pinned(args.pin) as router_cpus:
        return _run(args, env, bodies, batch_ms, router_cpus)


def _run(args: argparse.Namespace, env: dict[str, str], bodies: dict[str, dict[str, Any]], batch_ms: float,
         router_cpus: set[int] | None) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="unbroken-first-token-"))
    upstream, line = _spawn(["-m", "benchmarks.first_token", "upstream", "--port", "0"], "simulated upstream on",
                            env)
    upstream_url = line.split()[-1]
    config = tmp / "router.yaml"
    config.write_text(_config(upstream_url, args.batch_ms))
    ddb = None
    targets = [_Target("direct", upstream_url)]
    routers: list[_Router] = []
    shown = [a for i, a in enumerate(args.argv) if a != "--save" and (i == 0 or args.argv[i - 1] != "--save")]
    results: dict[str, Any] = {"command": " ".join(["python -m benchmarks.first_token", *shown]),
                               "root": args.root.name, "tokens": args.tokens, "tps": args.tps, "n": args.n,
                               "input_chars": args.input_chars,
                               "upstream_ttft_ms": args.upstream_ttft_ms,
                               "repeat": args.repeat, "batch_ms": batch_ms, "date": time.strftime("%Y-%m-%d"),
                               "routers_on_cpus": sorted(router_cpus) if router_cpus is not None else None,
                               "loadavg_1min_start": round(os.getloadavg()[0], 2)}
    try:
        for store in args.stores.split(","):
            extra: list[str] = []
            probe_url = None
            if store == "none":
                url = "none"
            elif store == "sqlite":
                url = f"sqlite:///{tmp / 'journal.db'}"
                probe_url = f"sqlite:///{tmp / 'probe.db'}"  # its own file: no lock shared with the router
            elif store == "dynamodb":
                from tests.support.dynamodb_local import DynamoDBLocal, DynamoDBLocalMissing

                try:
                    ddb = ddb or DynamoDBLocal().start()  # on the client's and the upstream's CPUs, like this process
                except (DynamoDBLocalMissing, RuntimeError) as exc:
                    results[store] = f"not available: {exc}"
                    continue
                url = f"dynamodb://bench-{uuid.uuid4().hex[:8]}?region=us-east-1&endpoint_url={ddb.endpoint_url}"
                probe_url = url  # the router's table (it creates it)
                extra = ["--create-table"]
            else:
                raise SystemExit(f"unknown store {store!r}; known: {', '.join(STORES)}")
            proc, ready = _spawn(["-m", "benchmarks.first_token", "serve", "--config", str(config), "--port",
                                  "0", "--store", url, "--log-level", "WARNING", *extra], "unbroken ready on", env,
                                 router_cpus)
            probe = _StoreProbe(probe_url, bodies["routed"], args.upstream_ttft_ms / 1000.0) if probe_url else None
            router = _Router(store, ready.split()[3], proc, probe)
            routers.append(router)
            targets.append(_Target(store, router.url, router))
            if store != "none":  # the same router with the journal off for the request: its own baseline
                targets.append(_Target(f"{store}_off", router.url, router, store=False))
        blocks = []
        with httpx.Client(timeout=120) as client:
            for _ in range(3):  # warm every path (pools, imports, the stores' first connections)
                _block(client, targets, 1, bodies, batch_ms)
            for b in range(args.repeat):
                blocks.append(_block(client, targets, args.n, bodies, batch_ms))
                print(f"first_token: block {b + 1}/{args.repeat}: " + json.dumps(
                    {k: {x: v[x] for x in ("added_ttft_ms_p50", "journal_added_ttft_ms_p50", "commit_ms_p50",
                                           "max_gap_ms_p95") if x in v} for k, v in blocks[-1].items()
                     if k != "upstream"}), file=sys.stderr, flush=True)
        results["blocks"] = blocks
        results["summary"] = _summary(blocks)
    finally:
        for r in routers:
            if r.probe is not None:
                r.probe.close()
            _stop(r.proc)
        _stop(upstream)
        if ddb is not None:
            ddb.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    results["loadavg_1min_end"] = round(os.getloadavg()[0], 2)
    return results


@contextlib.contextmanager
def pinned(pin: bool) -> Iterator[set[int] | None]:
    """With `pin` on a machine of 2 CPUs or more: this process (the client, the probe) and what it starts (the
    upstream, DynamoDB Local) on one half of the CPUs, and the CPUs of the other half given for the routers
    (`_spawn(..., cpus)`); this process's own CPUs again afterwards (`make bench` runs on). Else nothing, and None.

    In production the client, the upstream and DynamoDB are other machines; here they share two cores with the
    router, and the kernel wakes a process on the core of whoever woke it: the upstream, woken by the router's
    request, then waits for the router to go idle. A journaled router goes idle later (the header's prepare, the
    POST's answer set up while the upstream call is in flight), so unpinned the upstream had the request 0.24 ms
    later on a journaled stream than on a journal-off one, a cost of sharing a core that is not the journal's
    (`benchmarks.first_token_trace`, `upstream_written -> upstream_received`: 0.575 against 0.339 ms unpinned,
    0.324 against 0.326 pinned). DynamoDB Local goes with the client and the upstream, as the other machine it is in
    production: on the routers' CPUs its JVM made the DynamoDB router's first commit wait for the CPU (a journal
    share of 3.91 ms against a commit of 3.04), and on any CPU it brought the upstream's wait back (0.36 ms)."""
    available = os.sched_getaffinity(0)
    if not pin or len(available) < 2:
        yield None
        return
    ordered = sorted(available)
    half = len(ordered) // 2
    os.sched_setaffinity(0, ordered[half:])
    try:
        yield set(ordered[:half])
    finally:
        os.sched_setaffinity(0, available)


def write(results: dict[str, Any]) -> None:
    """Into docs/bench/results.json (key `first_token`), and its table into docs/bench/results.md and the README's
    first-token block; the rest of those files, from other runs of the bench, is left as it is."""
    from benchmarks import report
    from benchmarks.run import OUT, scrub

    path = OUT / "results.json"
    full = json.loads(path.read_text())
    full["first_token"] = results
    path.write_text(scrub(json.dumps(full, indent=2)) + "\n")
    block = "\n".join(report.first_token_block(full)).strip()
    md = OUT / "results.md"
    text = md.read_text()
    if "<!-- first-token:start -->" in text:
        text = report.replace_block(text, "first-token", block.split("\n", 1)[1].rsplit("\n", 1)[0])
    else:  # a results.md from before: the table goes before the plots, or at the end
        at = text.find("\n![")
        text = text[:at + 1] + block + "\n\n" + text[at + 1:] if at >= 0 else text.rstrip() + "\n\n" + block + "\n"
    md.write_text(text)
    readme = report.README.read_text()
    if "<!-- first-token:start -->" in readme:
        report.README.write_text(report.replace_block(readme, "first-token", "\n".join(report.first_token_table(full))))


def bench_step(report: dict[str, Any]) -> None:
    """The step of `make bench` (benchmarks.run): the default run, into the report it is building."""
    scale = float(os.environ.get("UNBROKEN_BENCH_SCALE", "1"))
    report["first_token"] = run(_parse(["--n", str(max(3, round(20 * scale)))]))


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="rounds per block (one stream per target each)")
    parser.add_argument("--repeat", type=int, default=3, help="blocks; the summary is their median")
    parser.add_argument("--stores", default=",".join(STORES))
    parser.add_argument("--tokens", type=int, default=50)
    parser.add_argument("--input-chars", type=int, default=2,
                        help="size of the request's input (default \"hi\"); a long prompt is encoded and stored with "
                             "the header")
    parser.add_argument("--tps", type=float, default=50.0, help="upstream pacing; 0 = as fast as it can")
    parser.add_argument("--upstream-ttft-ms", type=float, default=150.0,
                        help="the upstream's own time to its first token: longer than a batch window, as a real "
                             "model's is (a router that lets the start events commit alone when the window is over "
                             "by then costs the first token two commits; 0 hides that)")
    parser.add_argument("--batch-ms", type=float, default=None,
                        help="server.journal_batch_ms of the routers (default: the setting's default)")
    parser.add_argument("--root", type=Path, default=ROOT, help="checkout whose layers/ the routers run from")
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                        help="run the routers on half of the CPUs and the client, the upstream and DynamoDB Local on "
                             "the other half, as they are other machines in production (default; --no-pin: "
                             "anywhere)")
    parser.add_argument("--check", action="store_true", help="print whether the goals hold; exit 1 if not")
    parser.add_argument("--write", action="store_true", help="into docs/bench/results.json, results.md, README")
    parser.add_argument("--save", type=Path, default=None, help="the whole result (every block) as JSON, here")
    args = parser.parse_args(argv)
    args.argv = argv
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        return _serve(argv)
    if argv[:1] == ["upstream"]:
        return _upstream(argv[1:])
    args = _parse(argv)
    results = run(args)
    print(json.dumps(results["summary"], indent=2))
    if args.save is not None:
        args.save.write_text(json.dumps(results, indent=2) + "\n")
    if args.write:
        write(results)
    if args.check:
        ok = True
        for store, goal, holds, figures in goals(results):
            ok = ok and holds
            print(f"{'PASS' if holds else 'FAIL'}  {store:9s} {goal}: {figures}")
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
