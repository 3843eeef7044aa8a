"""Journal figures: what one streamed response costs in store writes, DynamoDB WRU and bytes, and how much time the
journal adds per event (journal on versus off, in the same process).

The stream is what the router journals for a 1,000-token answer: response.created / in_progress, an output item and
content part, 1,000 `response.output_text.delta` events (item_id, output_index, content_index, delta, logprobs []),
the done events and response.completed with the full text. Two arrival patterns:
- burst: the upstream is faster than the store, so batches close at `batch_bytes`;
- paced: tokens arrive at 100/s, so batches close at `batch_ms` (the usual case for a live model).
WRU are computed from item sizes (1 per KB rounded up per item, x2 inside a transaction), as DynamoDB bills them.

Run: `python -m benchmarks.journal_bench` (starts DynamoDB Local itself; SQLite runs in a temporary directory).
`benchmarks.run` calls `run(report)`, which fills `report["journal"]`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

from unbroken.config import ServerSettings
from unbroken.journal.feed import LocalFeeds
from unbroken.journal.memory import MemoryStore
from unbroken.journal.sqlite import SQLiteStore
from unbroken.journal.store import ResponseHeader, Store, StoreStats
from unbroken.journal.writer import JournalWriter

TOKENS = 1000
BATCH_BYTES = ServerSettings().journal_batch_bytes
BATCH_MS = ServerSettings().journal_batch_ms  # the router's defaults, so the figures are what it does
PACED_TOKENS_PER_S = 100
REPEATS = 5  # burst runs per backend; the median is reported

_WORDS = (
    "the journal makes every event durable before it is sent so a client that loses its connection resumes "
    "from the last sequence number it saw and a stream whose upstream dies is continued elsewhere"
).split()


def simulated_stream(response_id: str, tokens: int = TOKENS) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The events of one response (the last is the terminal one) and the final response object."""
    item_id = f"msg_{uuid.uuid4().hex[:24]}"
    base = {"id": response_id, "object": "response", "created_at": 1_700_000_000, "model": "bench-model"}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": {**base, "status": "in_progress", "output": []}},
        {"type": "response.in_progress", "response": {**base, "status": "in_progress", "output": []}},
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {"id": item_id, "type": "message", "role": "assistant", "status": "in_progress", "content": []},
        },
        {
            "type": "response.content_part.added",
            "item_id": item_id,
            "output_index": 0,
            "content_index": 0,
            "part": {"type": "output_text", "text": "", "annotations": []},
        },
    ]
    pieces = [(" " if i else "") + _WORDS[i % len(_WORDS)] for i in range(tokens)]
    for piece in pieces:
        events.append(
            {
                "type": "response.output_text.delta",
                "item_id": item_id,
                "output_index": 0,
                "content_index": 0,
                "delta": piece,
                "logprobs": [],
            }
        )
    text = "".join(pieces)
    part = {"type": "output_text", "text": text, "annotations": []}
    item = {"id": item_id, "type": "message", "role": "assistant", "status": "completed", "content": [part]}
    final = {**base, "status": "completed", "output": [item], "usage": {"output_tokens": tokens}}
    events += [
        {"type": "response.output_text.done", "item_id": item_id, "output_index": 0, "content_index": 0, "text": text},
        {"type": "response.content_part.done", "item_id": item_id, "output_index": 0, "content_index": 0, "part": part},
        {"type": "response.output_item.done", "output_index": 0, "item": item},
        {"type": "response.completed", "response": final},
    ]
    # The canonical key order of a delta puts sequence_number second; rebuild each event that way.
    numbered = []
    for seq, event in enumerate(events):
        rest = {k: v for k, v in event.items() if k != "type"}
        numbered.append({"type": event["type"], "sequence_number": seq, **rest})
    return numbered, final


def sse_frame(event: dict[str, Any]) -> bytes:
    """What the transport does with every event anyway: the baseline both runs pay."""
    return f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n".encode()


def _delta_stats(after: StoreStats, before: StoreStats) -> dict[str, int]:
    return {
        "writes": after.commits - before.commits,
        "items": after.items_written - before.items_written,
        "bytes_written": after.bytes_written - before.bytes_written,
        "wru": after.wru - before.wru,
    }


async def _create(store: Store) -> str:
    rid = f"resp_{uuid.uuid4().hex}"
    now = time.time()
    request = {"model": "bench-model", "input": [{"role": "user", "content": "Explain the journal. " * 20}]}
    await store.create(ResponseHeader(id=rid, tenant="bench", created_at=now, expires_at=now + 3600, request=request))
    return rid


async def _journal_run(store: Store, pace: float | None) -> dict[str, Any]:
    """One response through the writer; CPU and wall time of the producer side (commits included)."""
    before = dataclasses.replace(store.stats)
    rid = await _create(store)
    events, final = simulated_stream(rid)
    frames: list[bytes] = []

    def on_commit(batch: list[dict[str, Any]]) -> None:
        frames.extend(sse_frame(e) for e in batch)

    cpu0, wall0 = time.process_time(), time.perf_counter()
    writer = JournalWriter(
        store, rid, 0, batch_bytes=BATCH_BYTES, batch_ms=BATCH_MS, on_commit=on_commit, feeds=LocalFeeds()
    )
    for event in events[:-1]:
        await writer.emit(event)
        if event["type"] in ("response.content_part.added", "response.output_item.done"):
            await writer.boundary()  # item boundaries: the API layer gets the first bytes out at once
        if pace is not None and event["type"] == "response.output_text.delta":
            await asyncio.sleep(pace)
    await writer.finish(events[-1], status="completed", response=final)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    assert len(frames) == len(events)
    return {"rid": rid, "cpu": cpu, "wall": wall, "events": len(events), **_delta_stats(store.stats, before)}


async def _baseline_run(pace: float | None) -> dict[str, float]:
    """Journal off: the same events, framed as SSE one by one, arriving at the same pace."""
    events, _ = simulated_stream("resp_baseline")
    frames = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for event in events:
        frames.append(sse_frame(event))
        if pace is not None and event["type"] == "response.output_text.delta":
            await asyncio.sleep(pace)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    assert len(frames) == len(events)
    return {"cpu": cpu, "wall": wall}


async def _stored_bytes(store: Store, rid: str) -> int:
    """Bytes the response occupies in the store once written (all its items / rows)."""
    if isinstance(store, SQLiteStore):

        def size(conn: Any) -> int:
            batches = conn.execute("SELECT sum(length(data)) FROM batches WHERE response_id = ?", (rid,)).fetchone()[0]
            header = conn.execute(
                "SELECT length(request) + coalesce(length(response), 0) + 100 FROM responses WHERE id = ?", (rid,)
            ).fetchone()[0]
            return int(batches or 0) + int(header or 0)

        return await store._run(size, write=False)
    from unbroken.journal.dynamodb import DynamoDBStore, item_size

    if isinstance(store, DynamoDBStore):
        items = await store._query(
            KeyConditionExpression="pk = :p", ExpressionAttributeValues={":p": {"S": f"resp#{rid}"}}
        )
        return sum(item_size(i) for i in items)
    return 0


async def bench_backend(name: str, store: Store, *, warmups: int = 2) -> list[dict[str, Any]]:
    rows = []
    for _ in range(warmups):  # connections, imports, the table; DynamoDB Local's JIT
        await _journal_run(store, None)
    burst = [await _journal_run(store, None) for _ in range(REPEATS)]
    burst_off = [await _baseline_run(None) for _ in range(REPEATS)]
    # Journal off then on, back to back, so that both see the same machine state.
    paced_off = await _baseline_run(1.0 / PACED_TOKENS_PER_S)
    paced = await _journal_run(store, 1.0 / PACED_TOKENS_PER_S)
    for mode, runs, base in (("burst", burst, burst_off), (f"paced {PACED_TOKENS_PER_S} tok/s", [paced], [paced_off])):
        last = runs[-1]
        stored = await _stored_bytes(store, last["rid"])
        writes = last["writes"]  # create + batch commits (+ snapshot pieces for DynamoDB)
        row: dict[str, Any] = {
            "backend": name,
            "mode": mode,
            "events_per_response": last["events"],
            "writes_per_response": writes,
            "writes_per_1000_tokens": round(writes * 1000 / TOKENS, 1),
            "items_written": last["items"],
            "wru_per_response": last["wru"] if name.startswith("dynamodb") else None,
            "wru_per_1000_tokens": round(last["wru"] * 1000 / TOKENS, 1) if name.startswith("dynamodb") else None,
            "bytes_stored_per_token": round(stored / TOKENS, 2) if stored else None,
            "sse_bytes_per_token": round(sum(len(sse_frame(e)) for e in simulated_stream("resp_x")[0]) / TOKENS, 2),
        }
        cpu_on = statistics.median(r["cpu"] for r in runs) / last["events"]
        wall_on = statistics.median(r["wall"] for r in runs) / last["events"]
        cpu_off = statistics.median(b["cpu"] for b in base) / last["events"]
        wall_off = statistics.median(b["wall"] for b in base) / last["events"]
        row.update(
            {
                "cpu_us_per_event_journal_on": round(cpu_on * 1e6, 2),
                "cpu_us_per_event_journal_off": round(cpu_off * 1e6, 2),
                "cpu_us_per_event_added": round((cpu_on - cpu_off) * 1e6, 2),
                "cpu_ratio_on_off": round(cpu_on / cpu_off, 2) if cpu_off else None,
                "wall_us_per_event_journal_on": round(wall_on * 1e6, 2),
                "wall_us_per_event_journal_off": round(wall_off * 1e6, 2),
                "wall_ratio_on_off": round(wall_on / wall_off, 2) if wall_off else None,
            }
        )
        rows.append(row)
    return rows


async def measure(*, memory: bool = True) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    if memory:
        results += await bench_backend("memory", MemoryStore())
    with tempfile.TemporaryDirectory(prefix="unbroken-journal-bench-") as tmp:
        sqlite = SQLiteStore(f"{tmp}/journal.db")
        try:
            results += await bench_backend("sqlite", sqlite)
        finally:
            await sqlite.close()
    try:
        from tests.support.dynamodb_local import DynamoDBLocal
        from unbroken.journal.dynamodb import DynamoDBStore

        with DynamoDBLocal() as server:
            # The store's one transport (h11 over a kept-alive pool, SigV4 by botocore's signer).
            ddb = DynamoDBStore("unbroken-bench", region="us-east-1", endpoint_url=server.endpoint_url)
            await ddb.create_table_if_missing()
            try:
                results += await bench_backend("dynamodb_local", ddb, warmups=8)
            finally:
                await ddb.close()
    except Exception as exc:  # the other figures are still worth having
        results.append({"backend": "dynamodb_local", "error": f"{type(exc).__name__}: {exc}"})
    return {
        "tokens_per_response": TOKENS,
        "batch_bytes": BATCH_BYTES,
        "batch_ms": BATCH_MS,
        "paced_tokens_per_s": PACED_TOKENS_PER_S,
        "results": results,
    }


def format_table(journal: dict[str, Any]) -> str:
    columns: list[tuple[str, str, Callable[[dict[str, Any]], Any]]] = [
        ("backend", "{:<20}", lambda r: r["backend"]),
        ("mode", "{:<16}", lambda r: r.get("mode", "")),
        ("writes/resp", "{:>11}", lambda r: r.get("writes_per_response", "")),
        ("WRU/resp", "{:>8}", lambda r: r.get("wru_per_response") if r.get("wru_per_response") is not None else "-"),
        ("B stored/tok", "{:>12}", lambda r: r.get("bytes_stored_per_token") or "-"),
        ("SSE B/tok", "{:>9}", lambda r: r.get("sse_bytes_per_token", "")),
        ("CPU us/ev on", "{:>12}", lambda r: r.get("cpu_us_per_event_journal_on", "")),
        ("off", "{:>6}", lambda r: r.get("cpu_us_per_event_journal_off", "")),
        ("added", "{:>6}", lambda r: r.get("cpu_us_per_event_added", "")),
        ("wall us/ev on", "{:>13}", lambda r: r.get("wall_us_per_event_journal_on", "")),
        ("off", "{:>6}", lambda r: r.get("wall_us_per_event_journal_off", "")),
        ("ratio", "{:>6}", lambda r: r.get("wall_ratio_on_off", "")),
    ]
    lines = [
        f"journal: {journal['tokens_per_response']} output-token deltas per response, batches of "
        f"{journal['batch_bytes']} B / {journal['batch_ms']:g} ms",
        " ".join(fmt.format(title) for title, fmt, _ in columns),
    ]
    for row in journal["results"]:
        if "error" in row:
            lines.append(f"{row['backend']:<20} error: {row['error']}")
            continue
        lines.append(" ".join(fmt.format(str(get(row))) for _, fmt, get in columns))
    return "\n".join(lines)


def run(report: dict[str, Any], *, memory: bool = True) -> None:
    """`memory=False` leaves out the in-memory store (no deployment uses it): `make bench` does, to stay short."""
    journal = asyncio.run(measure(memory=memory))
    report["journal"] = journal
    print(format_table(journal))


def main() -> int:
    report: dict[str, Any] = {}
    run(report)
    if "--json" in sys.argv:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
