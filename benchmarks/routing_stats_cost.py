"""DynamoDB requests the shared routing stats and circuit breaker cost, per 1,000 routed requests, against DynamoDB
Local.

Each simulated instance is what `Runtime` builds when a store exists: its own `DynamoDBStore` (its own connection
pool, as another process would have) on one table, a `CounterBatcher` (flush every 2 s), a `CounterReader` (cache
5 s) and a `HealthBoard` sharing through them (refresh every 1 s, circuit records re-read every 5 s). Time is
simulated (one clock for all of them, the stores' expiry checks included), so the counts do not depend on how fast
this machine is: requests arrive evenly at `--rate` per instance; each is ranked (`routing.policy.rank`) and
reported to the board like the attempt loop does (`--fail` of the attempts fail with a server error and move to the
next deployment). `--degrade` makes the first deployment fail every attempt for the middle third of the run, so its
circuit opens, probes and closes through the store. The store calls are counted where the store makes them
(`DynamoDBStore._call`: one HTTP request each, retries aside), writes (UpdateItem, PutItem, DeleteItem) and reads
(BatchGetItem, GetItem, Query) apart; the journal's own writes are not part of this (see `benchmarks/run.py`).

Run: `python -m benchmarks.routing_stats_cost` (needs DynamoDB Local: `make dynamodb-local`). `--json` prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import logging
import os
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.support.dynamodb_local import DynamoDBLocal
from unbroken.config import Deployment, HealthSettings, PublicModel
from unbroken.journal.counters import FLUSH_SECONDS, CounterBatcher, CounterReader
from unbroken.journal.dynamodb import DynamoDBStore
from unbroken.routing.health import HealthBoard
from unbroken.routing.policy import rank

WRITES = frozenset({"UpdateItem", "PutItem", "DeleteItem", "TransactWriteItems"})
READS = frozenset({"BatchGetItem", "GetItem", "Query"})


class SimClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@dataclass
class Instance:
    store: DynamoDBStore
    counters: CounterBatcher
    reader: CounterReader
    board: HealthBoard
    calls: Counter[str] = field(default_factory=Counter)


def counted(store: DynamoDBStore, calls: Counter[str]) -> None:
    original = store._call

    async def call(op: str, **kwargs: Any) -> dict[str, Any]:
        calls[op] += 1
        if op == "BatchGetItem":  # billed per item read (a strongly consistent read unit each, absent or not)
            calls["items_batch_read"] += sum(len(t["Keys"]) for t in kwargs["RequestItems"].values())
        return await original(op, **kwargs)

    store._call = call  # type: ignore[method-assign]


async def run_case(endpoint: str, *, instances: int, deployments: int, rate: float, requests: int, fail: float,
                   degrade: bool, seed: int = 1) -> dict[str, Any]:
    clock = SimClock()
    settings = HealthSettings()
    table = f"stats-{uuid.uuid4().hex[:12]}"
    model = PublicModel(name="m", deployments=[Deployment(name=f"d{i}", provider="simulated", model=f"d{i}")
                                               for i in range(deployments)])
    setup = DynamoDBStore(table, region="us-east-1", endpoint_url=endpoint, clock=clock)
    await setup.create_table_if_missing()
    fleet: list[Instance] = []
    for _ in range(instances):
        store = DynamoDBStore(table, region="us-east-1", endpoint_url=endpoint, clock=clock)
        counters = CounterBatcher(store)
        reader = CounterReader(store, counters, clock=clock)
        board = HealthBoard(clock, settings)
        board.configure(settings, [(model.name, d.name) for d in model.deployments])
        board.share(store, counters, reader)
        inst = Instance(store, counters, reader, board)
        counted(store, inst.calls)
        fleet.append(inst)

    rng = random.Random(seed)
    start = clock.now
    duration = requests / (rate * instances)
    degraded = (start + duration / 3, start + 2 * duration / 3)
    events: list[tuple[float, int, int, str]] = []  # (time, order, instance, what)
    order = 0

    def push(at: float, i: int, what: str) -> None:
        nonlocal order
        heapq.heappush(events, (at, order, i, what))
        order += 1

    for i in range(instances):
        phase = i / instances
        push(start + phase / rate, i, "request")
        push(start + phase * FLUSH_SECONDS + FLUSH_SECONDS, i, "flush")
        push(start + phase * settings.refresh_seconds + settings.refresh_seconds, i, "refresh")
    routed = 0
    served: Counter[str] = Counter()
    while routed < requests:
        at, _, i, what = heapq.heappop(events)
        clock.now = at
        inst = fleet[i]
        if what == "request":
            routed += 1
            served[route_one(inst.board, model, rng, fail, degrade and degraded[0] <= at < degraded[1])] += 1
            push(at + 1 / rate, i, "request")
        elif what == "flush":
            await inst.counters.flush()
            push(at + FLUSH_SECONDS, i, "flush")
        else:
            await inst.board.refresh()
            push(at + settings.refresh_seconds, i, "refresh")
    for inst in fleet:  # what the runtime does at shutdown
        await inst.counters.flush()
    elapsed = clock.now - start
    calls: Counter[str] = Counter()
    for inst in fleet:
        calls.update(inst.calls)
        await inst.store.close()
    await setup._call("DeleteTable", TableName=table)
    await setup.close()
    writes = sum(n for op, n in calls.items() if op in WRITES)
    reads = sum(n for op, n in calls.items() if op in READS)
    per_1k = 1000 / requests
    return {
        "instances": instances, "deployments": deployments, "rate_per_instance": rate, "requests": requests,
        "fail": fail, "degrade": degrade, "simulated_seconds": round(elapsed, 1),
        "calls": dict(sorted(calls.items())), "writes": writes, "reads": reads,
        "writes_per_1k": round(writes * per_1k, 1), "reads_per_1k": round(reads * per_1k, 1),
        "items_per_batch_read": round(calls["items_batch_read"] / max(1, calls["BatchGetItem"]), 1),
        "writes_per_instance_s": round(writes / instances / elapsed, 3),
        "reads_per_instance_s": round(reads / instances / elapsed, 3),
        "counter_flush_calls": sum(inst.counters.flushes for inst in fleet),
        "counter_reader_reads": sum(inst.reader.reads for inst in fleet),
        "served": dict(sorted(served.items())),
    }


def route_one(board: HealthBoard, model: PublicModel, rng: random.Random, fail: float, degraded: bool) -> str:
    """One routed request as the attempt loop reports it: failures move on down the ranked list."""
    ranked = rank(model, board)
    for n, d in enumerate(ranked):
        bad = (degraded and d.name == "d0") or rng.random() < fail
        if bad and n < len(ranked) - 1:
            board.record_failure(model.name, d.name, "server_error")
            continue
        board.record_success(model.name, d.name, rng.uniform(0.2, 0.6), output_tokens=400, output_seconds=8.0,
                             input_tokens=1200, cached_input_tokens=rng.choice((0, 1024)))
        return d.name
    return "none"


CASES: list[dict[str, Any]] = [
    {"instances": 1, "deployments": 2, "rate": 10.0},
    {"instances": 2, "deployments": 2, "rate": 10.0},
    {"instances": 2, "deployments": 2, "rate": 50.0},
    {"instances": 4, "deployments": 3, "rate": 10.0},
    {"instances": 2, "deployments": 2, "rate": 10.0, "degrade": True},
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000, help="routed requests per case")
    parser.add_argument("--fail", type=float, default=0.01, help="share of attempts that fail at random")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    logging.getLogger("unbroken").setLevel(logging.ERROR)  # "circuit opened" is what --degrade is for
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "local")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "local")

    async def all_cases(endpoint: str) -> list[dict[str, Any]]:
        return [await run_case(endpoint, requests=args.requests, fail=args.fail,
                               degrade=bool(case.get("degrade", False)),
                               **{k: v for k, v in case.items() if k != "degrade"}) for case in CASES]

    with DynamoDBLocal() as ddb:
        results = asyncio.run(all_cases(ddb.endpoint_url))
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()
        return 0
    print(f"DynamoDB requests for shared routing stats and circuits, {args.requests} routed requests per case "
          f"(fail {args.fail:.0%} of attempts at random)")
    header = ("instances", "deployments", "req/s/inst", "degrade", "writes/1k", "reads/1k", "writes/inst/s",
              "reads/inst/s", "items/BatchGetItem")
    print(" | ".join(header))
    row: Callable[[dict[str, Any]], tuple[Any, ...]] = lambda r: (  # noqa: E731
        r["instances"], r["deployments"], r["rate_per_instance"], "yes" if r["degrade"] else "no",
        r["writes_per_1k"], r["reads_per_1k"], r["writes_per_instance_s"], r["reads_per_instance_s"],
        r["items_per_batch_read"])
    for r in results:
        print(" | ".join(str(x) for x in row(r)))
        print(f"    calls: {r['calls']}  served: {r['served']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
