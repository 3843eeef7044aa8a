"""Added time to the first text delta, and the longest gap between delivered deltas, with the journal off and on.

A simulated OpenAI-compatible upstream is paced at `--tps` tokens per second (50 tokens, 20 ms apart by default); a
router runs in front of it with each store in turn (`--store none`, SQLite, DynamoDB Local when its jar is there).
For every store the script streams `POST /v1/responses` `--n` times, interleaved with the same request straight to
the upstream, and prints:
- added TTFT: p50 of (router's first `response.output_text.delta`) minus p50 of (upstream's first content chunk);
- max gap: the longest time between two consecutive deltas a client received (p50 over streams and the worst), next
  to the upstream's own pacing;
- for a journaled store, what one store write costs at the same moment (`create` of a header and `append` of a small
  batch, timed from this process between streams), and the journal's share of the added TTFT in those commits: the
  machine may be shared, so the commit is the yardstick, not a fixed number.

Run: `python -m benchmarks.first_token [--n 20] [--stores none,sqlite,dynamodb] [--root CHECKOUT]`.
`--root` runs the router (and upstream) from another checkout's `layers/` (e.g. an export of main), so the same
script measures before and after a change. Separate processes on 127.0.0.1, nothing else shared.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-bench"
DELTA = "response.output_text.delta"


def _spawn(args: list[str], ready: str, env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=env)
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


def _config(upstream_url: str) -> str:
    return f"""
api_keys: [{{key: {KEY}, tenant: bench}}]
models:
  - name: bench
    deployments:
      - name: sim
        provider: simulated
        model: sim
        base_url: {upstream_url}
"""


def _times(client: httpx.Client, url: str, body: dict[str, Any], headers: dict[str, str], direct: bool) -> list[float]:
    """Arrival times (seconds after the request was sent) of every content delta of one stream."""
    out: list[float] = []
    start = time.perf_counter()
    with client.stream("POST", url, json=body, headers=headers) as response:
        response.raise_for_status()
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
    return out


def _max_gap(times: list[float]) -> float:
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


class _StoreProbe:
    """Times one header `create` and one `append` of a small batch on a store like the router's, between streams."""

    def __init__(self, url: str) -> None:
        from unbroken.journal.backends import open_store

        self.loop = asyncio.new_event_loop()
        self.store = open_store(url)
        self.create_s: list[float] = []
        self.commit_s: list[float] = []

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

    def close(self) -> None:
        close = getattr(self.store, "close", None)
        if close is not None:
            result = close()
            if asyncio.iscoroutine(result):
                self.loop.run_until_complete(result)
        self.loop.close()


def _measure(upstream_url: str, router_url: str, n: int, metadata: dict[str, str],
             probe: _StoreProbe | None = None) -> dict[str, Any]:
    direct_body = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                   "metadata": metadata}
    routed_body = {"model": "bench", "input": "hi", "stream": True, "metadata": metadata}
    hdr = {"authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=120) as client:
        for _ in range(3):  # warm both paths (pools, imports, the store's first connection)
            _times(client, f"{upstream_url}/chat/completions", direct_body, {}, True)
            _times(client, f"{router_url}/responses", routed_body, hdr, False)
        direct, routed = [], []
        for _ in range(n):  # interleaved so both see the same machine state
            direct.append(_times(client, f"{upstream_url}/chat/completions", direct_body, {}, True))
            routed.append(_times(client, f"{router_url}/responses", routed_body, hdr, False))
            if probe is not None:
                probe.sample()
    ms = 1000.0
    d_ttft = statistics.median(t[0] for t in direct)
    r_ttft = statistics.median(t[0] for t in routed)
    paired = statistics.median(r[0] - d[0] for r, d in zip(routed, direct, strict=True))
    out = {
        "added_ttft_ms_p50": round((r_ttft - d_ttft) * ms, 1),
        "added_ttft_ms_paired_p50": round(paired * ms, 1),
        "max_gap_ms_p50": round(statistics.median(_max_gap(t) for t in routed) * ms, 1),
        "max_gap_ms_worst": round(max(_max_gap(t) for t in routed) * ms, 1),
        "upstream_max_gap_ms_p50": round(statistics.median(_max_gap(t) for t in direct) * ms, 1),
        "ttft_ms_direct_p50": round(d_ttft * ms, 1),
        "ttft_ms_routed_p50": round(r_ttft * ms, 1),
        "deltas_per_stream": len(routed[0]),
    }
    if probe is not None:
        out["store_create_ms_p50"] = round(statistics.median(probe.create_s) * ms, 1)
        out["store_commit_ms_p50"] = round(statistics.median(probe.commit_s) * ms, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="streams per store (after 3 warm-ups)")
    parser.add_argument("--stores", default="none,sqlite,dynamodb")
    parser.add_argument("--tokens", type=int, default=50)
    parser.add_argument("--tps", type=float, default=50.0, help="upstream pacing; 0 = as fast as it can")
    parser.add_argument("--root", type=Path, default=ROOT, help="checkout whose layers/ the router runs from")
    args = parser.parse_args(argv)

    # DynamoDB Local accepts any credentials; boto3 (in the router and in the probe here) only needs some to sign.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "local")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "local")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    env = {**os.environ, "PYTHONPATH": str(args.root.resolve() / "layers")}
    metadata = {"sim_length": str(args.tokens)}
    if args.tps:
        metadata["sim_tps"] = str(args.tps)

    tmp = Path(tempfile.mkdtemp(prefix="unbroken-first-token-"))
    upstream, line = _spawn(["-m", "unbroken.simulator", "--port", "0"], "simulated upstream on",
                            env)
    upstream_url = line.split()[-1]
    config = tmp / "router.yaml"
    config.write_text(_config(upstream_url))
    ddb = None
    results: dict[str, Any] = {"root": args.root.name, "tokens": args.tokens, "tps": args.tps, "n": args.n}
    try:
        for store in args.stores.split(","):
            extra: list[str] = []
            if store == "none":
                url = "none"
            elif store == "sqlite":
                url = f"sqlite:///{tmp / 'journal.db'}"
                probe_url = f"sqlite:///{tmp / 'probe.db'}"  # its own file: no lock shared with the router
            elif store == "dynamodb":
                from tests.support.dynamodb_local import DynamoDBLocal, DynamoDBLocalMissing

                try:
                    ddb = ddb or DynamoDBLocal().start()
                except (DynamoDBLocalMissing, RuntimeError) as exc:
                    results[store] = f"not available: {exc}"
                    continue
                url = f"dynamodb://bench-{uuid.uuid4().hex[:8]}?region=us-east-1&endpoint_url={ddb.endpoint_url}"
                probe_url = url  # the router's table (it creates it)
                extra = ["--create-table"]
            else:
                raise SystemExit(f"unknown store {store!r}")
            router, ready = _spawn(["-m", "unbroken.cli", "serve", "--config", str(config), "--port", "0",
                                    "--store", url, "--log-level", "WARNING", *extra], "unbroken ready on", env)
            probe = None
            try:
                if store != "none":
                    probe = _StoreProbe(probe_url)
                results[store] = _measure(upstream_url, ready.split()[3], args.n, metadata, probe)
            finally:
                if probe is not None:
                    probe.close()
                _stop(router)
            if store != "none" and isinstance(results.get("none"), dict):
                # The journal's share of the added TTFT, in store commits measured at the same time.
                extra_ms = results[store]["added_ttft_ms_p50"] - results["none"]["added_ttft_ms_p50"]
                results[store]["journal_added_ttft_ms"] = round(extra_ms, 1)
                results[store]["journal_added_ttft_in_commits"] = round(
                    extra_ms / max(results[store]["store_commit_ms_p50"], 0.1), 2)
            print(f"{store:9s} {json.dumps(results[store])}", file=sys.stderr, flush=True)
    finally:
        _stop(upstream)
        if ddb is not None:
            ddb.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
