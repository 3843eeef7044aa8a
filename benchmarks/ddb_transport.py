"""CPU per journal commit on the DynamoDB store's transport, versus a boto3 client, against DynamoDB Local.

A commit is one `TransactWriteItems` of a typical batch: 5 `response.output_text.delta` events of ~200 bytes each,
as the store builds it (one batch piece + the fenced header update). Measured, in this process only (DynamoDB
Local is another process), with `time.process_time()` around a run of sequential commits:
- transport (h11): the store's transport (h11 over asyncio streams on the event loop, journal/http11.py, botocore's
  SigV4 signer), called as the store does;
- transport (httpx): the same transport with httpx's connection pool (`httpx.AsyncHTTPTransport`, as the store
  sent before the h11 pool) injected as its `http_transport`;
- boto3: `client.transact_write_items(**params)` of a boto3 client configured as the store had it (no retries, no
  parameter validation, keep-alive), run in a thread pool from the event loop, as the store ran it before;
- store append: `DynamoDBStore.append` of the 5 events, i.e. the transport plus encoding and building the request.
Each round commits `--warmup` unmeasured then `--commits` measured batches per contender, interleaved commit by
commit (so that all see the same drift in the machine's load); CPU per commit is the round's mean, and the median
of `--rounds` rounds is reported. Wall time per commit (median) is shown for context: it is mostly DynamoDB
Local's (a JVM) own time.

Run: `python -m benchmarks.ddb_transport` (needs DynamoDB Local: `make dynamodb-local`). `--json` prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from tests.support.dynamodb_local import DynamoDBLocal
from unbroken.journal.dynamodb import DynamoDBStore, Transport
from unbroken.journal.store import ResponseHeader

EVENTS_PER_BATCH = 5
_TEXT = "the journal makes every event durable before it is sent, so a client resumes from its last sequence no."


def batch(first_seq: int) -> list[dict[str, Any]]:
    """5 delta events of ~200 bytes of JSON each."""
    return [
        {
            "type": "response.output_text.delta",
            "sequence_number": seq,
            "item_id": "msg_0123456789abcdef01234567",
            "output_index": 0,
            "content_index": 0,
            "delta": _TEXT[: 40 + seq % 7],
            "logprobs": [],
        }
        for seq in range(first_seq, first_seq + EVENTS_PER_BATCH)
    ]


class Recorder:
    """Stands in for the store's `_call` while it builds commits: keeps the TransactWriteItems parameters and
    answers as DynamoDB would (no network), so the parameters of N successive commits can be prepared up front."""

    def __init__(self) -> None:
        self.params: list[dict[str, Any]] = []

    async def __call__(self, op: str, **kwargs: Any) -> dict[str, Any]:
        if op == "TransactWriteItems":
            self.params.append(kwargs)
        return {}


async def prepared_commits(store: DynamoDBStore, response_id: str, first_seq: int, count: int) -> list[dict[str, Any]]:
    """The parameters of `count` successive commits of one response, exactly as the store sends them."""
    recorder = Recorder()
    real, store._call = store._call, recorder  # type: ignore[method-assign]
    try:
        for i in range(count):
            await store.append(response_id, 0, batch(first_seq + i * EVENTS_PER_BATCH))
    finally:
        store._call = real  # type: ignore[method-assign]
    return recorder.params


def boto3_client(endpoint_url: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "dynamodb",
        region_name="us-east-1",
        endpoint_url=endpoint_url,
        aws_access_key_id="local",
        aws_secret_access_key="local",
        config=Config(
            retries={"total_max_attempts": 1},
            connect_timeout=3,
            read_timeout=10,
            max_pool_connections=16,
            tcp_keepalive=True,
            parameter_validation=False,
        ),
    )


async def new_response(store: DynamoDBStore) -> str:
    rid = f"resp_{uuid.uuid4().hex}"
    now = time.time()
    await store.create(ResponseHeader(id=rid, tenant="bench", created_at=now, expires_at=now + 3600))
    return rid


async def measure(commits: int, warmup: int, rounds: int) -> dict[str, Any]:
    names = ("transport", "httpx", "boto3", "store_append")
    cpu: dict[str, list[float]] = {name: [] for name in names}  # per round: mean CPU seconds per commit
    wall: dict[str, list[float]] = {name: [] for name in names}  # per round: median wall seconds per commit
    total = warmup + commits
    with DynamoDBLocal() as server:
        table = f"bench-transport-{uuid.uuid4().hex[:8]}"
        store = DynamoDBStore(table, region="us-east-1", endpoint_url=server.endpoint_url)
        await store.create_table_if_missing()
        client = boto3_client(server.endpoint_url)
        pool = ThreadPoolExecutor(16, thread_name_prefix="bench-boto3")
        loop = asyncio.get_running_loop()
        transport = store._make_transport()
        # the store's former send path: the same Transport over httpx's pool (as configured before the h11 pool)
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=32, keepalive_expiry=20.0)
        httpx_pool = httpx.AsyncHTTPTransport(limits=limits, retries=0)
        via_httpx = Transport(server.endpoint_url, "us-east-1", local=True, http_transport=httpx_pool)

        def boto(p: dict[str, Any]) -> Awaitable[Any]:
            return loop.run_in_executor(pool, functools.partial(client.transact_write_items, **p))

        try:
            for _ in range(rounds):
                calls: dict[str, list[Callable[[], Awaitable[Any]]]] = {}
                rids = {name: await new_response(store) for name in names}
                calls["transport"] = [
                    functools.partial(transport, "TransactWriteItems", p)
                    for p in await prepared_commits(store, rids["transport"], 0, total)
                ]
                calls["httpx"] = [
                    functools.partial(via_httpx, "TransactWriteItems", p)
                    for p in await prepared_commits(store, rids["httpx"], 0, total)
                ]
                calls["boto3"] = [
                    functools.partial(boto, p) for p in await prepared_commits(store, rids["boto3"], 0, total)
                ]
                calls["store_append"] = [
                    functools.partial(store.append, rids["store_append"], 0, batch(i * EVENTS_PER_BATCH))
                    for i in range(total)
                ]
                # Interleaved, commit by commit, in a rotating order: the machine's load drifts, and each
                # contender should see the same drift.
                spent: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
                for i in range(total):
                    for k in range(len(names)):
                        name = names[(i + k) % len(names)]
                        c0, t0 = time.process_time(), time.perf_counter()
                        await calls[name][i]()
                        if i >= warmup:
                            spent[name].append((time.process_time() - c0, time.perf_counter() - t0))
                for name in names:
                    cpu[name].append(statistics.fmean(c for c, _ in spent[name]))
                    wall[name].append(statistics.median(w for _, w in spent[name]))
                    header = await store.get(rids[name], snapshots=False)
                    assert header is not None and header.last_seq == total * EVENTS_PER_BATCH - 1, name
            await store._call("DeleteTable", TableName=table)
        finally:
            pool.shutdown(wait=True)
            client.close()
            await httpx_pool.aclose()
            await store.close()
    results: dict[str, Any] = {}
    for name in names:
        results[name] = {
            "cpu_us_per_commit": round(statistics.median(cpu[name]) * 1e6, 1),
            "cpu_us_per_commit_rounds": [round(c * 1e6, 1) for c in cpu[name]],
            "wall_ms_per_commit": round(statistics.median(wall[name]) * 1e3, 2),
        }
    for other in ("httpx", "boto3"):
        results[f"{other}_over_transport"] = round(
            results[other]["cpu_us_per_commit"] / results["transport"]["cpu_us_per_commit"], 2
        )
    event_bytes = [len(json.dumps(e, separators=(",", ":"))) for e in batch(0)]
    return {
        "events_per_commit": EVENTS_PER_BATCH,
        "event_json_bytes": round(statistics.mean(event_bytes)),
        "commits_per_round": commits,
        "rounds": rounds,
        "python": sys.version.split()[0],
        "results": results,
    }


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"DynamoDB Local, TransactWriteItems of {report['events_per_commit']} events of ~{report['event_json_bytes']} "
        f"B, {report['commits_per_round']} commits each x {report['rounds']} rounds (median round)",
        f"{'':<18} {'CPU us/commit':>14} {'wall ms/commit':>15}   rounds (CPU us)",
    ]
    labels = {
        "transport": "transport (h11)",
        "httpx": "transport (httpx)",
        "boto3": "boto3 in thread",
        "store_append": "store.append",
    }
    for name, label in labels.items():
        row = report["results"][name]
        lines.append(
            f"{label:<18} {row['cpu_us_per_commit']:>14} {row['wall_ms_per_commit']:>15}   "
            f"{row['cpu_us_per_commit_rounds']}"
        )
    for other in ("httpx", "boto3"):
        lines.append(f"{other} / transport (h11) CPU: x{report['results'][f'{other}_over_transport']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ddb_transport", description=__doc__.split("\n")[0])
    parser.add_argument("--commits", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    report = asyncio.run(measure(args.commits, args.warmup, args.rounds))
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
