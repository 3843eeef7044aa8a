"""Chaos: many streams, each with a random fault plan, through real routers in front of a real simulated upstream.

A fixed seed draws, per stream: the endpoint (/v1/responses or /v1/chat/completions), the request shape (plain text,
`tool_choice: required`, json_schema output), up to three upstream faults for its successive attempts (HTTP
429/500/503/529 before the stream, the provider's in-band mid-stream error, TCP reset / cut after N chunks, stall,
malformed chunk, no response at all) plus sometimes a missing `[DONE]`, and one of the router-side calamities:

- `reconnect`: the client drops its connection at a random cursor and resumes with
  `GET /v1/responses/{id}?stream=true&starting_after=N` (journal on SQLite);
- `throttle`: the journal is the DynamoDB store (moto) whose calls are throttled at random, within its retry bound;
- `sigkill`: the router process producing the stream is SIGKILLed mid-stream; the client resumes from its last event
  on another process sharing the SQLite journal, which takes the response over once the lease has expired.

Every model has three healthy deployments (literal continuation, continue-instruction, and one that claims prefill
but rejects it), so every stream must end `completed`, with dense sequence numbers and exactly the fault-free
answer (computed by asking the simulated upstream directly, without the router).

`UNBROKEN_CHAOS_N` streams (default 30, `make chaos` runs 1000), seed `UNBROKEN_CHAOS_SEED`. The figures are printed
and written to `bench-results/chaos.json`.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.contract.moto_http import MotoTransport
from tests.integration.endpoints import (
    ENDPOINTS,
    RECOVERY,
    Outcome,
    fault_free_answer,
    outcome_of_stream,
    responses_body,
    run,
)
from tests.support.client import TIMEOUT, headers
from tests.support.server import RouterProcess, RouterThread, base_config
from tests.support.sse import Stream, parse_sse
from unbroken.ir import CONTINUE_INSTRUCTION
from unbroken.journal.backends import open_store
from unbroken.simulator import SimulatedUpstream, SimulatedUpstreamThread

N = int(os.environ.get("UNBROKEN_CHAOS_N", "30"))
SEED = int(os.environ.get("UNBROKEN_CHAOS_SEED", "20260424"))
CONCURRENCY = int(os.environ.get("UNBROKEN_CHAOS_CONCURRENCY", "6"))
RESULTS = Path(__file__).resolve().parents[2] / "bench-results" / "chaos.json"

LENGTH = 32
MODEL = "chaos"
KILL_BATCH = 6  # streams in flight on a router process when it is killed
KILL_TPS = "40"  # streams that are to be killed are paced, so the kill lands mid-stream
RECONNECT_TPS = "400"  # paced a little: some resumes replay, some follow a response still being written
WAIT = 60.0  # bound on any single wait in this module

# Three healthy deployments that continue in different ways.
DEPLOYMENTS: dict[str, dict[str, Any]] = {
    "literal": {"literal_continuation": True},
    "instruction": {"literal_continuation": False},
    "noprefill": {"literal_continuation": True, "reject_prefill": True},
    "literal-2": {"literal_continuation": True},
}
# Timeouts with some slack: a healthy stream slowed by a busy 2-core machine must not look silent (each silent
# deployment leaves the request for good).
COMMON: dict[str, Any] = {"seed": 7, "ttft_ms": 0, "tps": 0, "length": LENGTH, "ttft_timeout_s": 1.5,
                          "stall_timeout_s": 1.0, "max_retries": 2}
STRICT = os.environ.get("UNBROKEN_CHAOS_STRICT", "") not in ("", "0")

# sim_fault entries: before the stream, and after N chunks
BEFORE = {"http:429": "http_429", "http:500": "http_500", "http:503": "http_503", "http:529": "http_529",
          "timeout": "no_response"}
MID = {"error": "in_band_error", "reset": "tcp_reset", "cut": "cut", "stall": "stall", "malformed": "malformed"}
EXCLUDING = {"timeout", "stall"}  # a silent deployment leaves the request for good: at most two of four per plan
SPECIALS = {"none": 70, "reconnect": 10, "throttle": 10, "sigkill": 10}
FORCED_SPECIALS = ["sigkill", "reconnect", "throttle", "sigkill", "reconnect", "throttle"]  # coverage at small N

TOOL = {"name": "lookup_order", "description": "Find an order",
        "parameters": {"type": "object", "properties": {
            "order_id": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1, "maximum": 9},
            "express": {"type": "boolean"}}, "required": ["order_id", "quantity", "express"],
            "additionalProperties": False}}
SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}},
    "score": {"type": "number", "minimum": 0, "maximum": 1}},
    "required": ["title", "tags", "score"], "additionalProperties": False}


def shape_fields(shape: str, endpoint: str) -> dict[str, Any]:
    """The request fields of a shape, in the endpoint's dialect."""
    if shape == "tool":
        tool = {"type": "function", **TOOL} if endpoint == "responses" else {"type": "function", "function": TOOL}
        return {"tools": [tool], "tool_choice": "required"}
    if shape == "json":
        if endpoint == "responses":
            return {"text": {"format": {"type": "json_schema", "name": "card", "schema": SCHEMA, "strict": True}}}
        return {"response_format": {"type": "json_schema",
                                    "json_schema": {"name": "card", "schema": SCHEMA, "strict": True}}}
    return {}


# -- plans ---------------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    index: int
    endpoint: str
    shape: str
    prompt: str
    faults: list[str]  # one `sim_fault` entry per attempt, in order
    special: str  # none | reconnect | throttle | sigkill
    target: str  # plain | journal | throttled | process
    cursor: int  # last sequence number the client reads before it disconnects / the process dies

    @property
    def key(self) -> str:
        return f"chaos-{SEED}-{self.index}"

    @property
    def failing_faults(self) -> int:
        return sum(1 for f in self.faults if f != "no_done")

    def metadata(self) -> dict[str, str]:
        meta = {"sim_request": self.key}
        if self.faults:
            meta["sim_fault"] = ",".join(self.faults)
        if self.special == "sigkill":
            meta["sim_tps"] = KILL_TPS
        elif self.special == "reconnect":
            meta["sim_tps"] = RECONNECT_TPS
        return meta

    def fault_kinds(self) -> list[str]:
        kinds = []
        for f in self.faults:
            name = f.split(":", 1)[0]
            kinds.append("missing_done" if f == "no_done" else BEFORE.get(f) or MID[name])
        if self.special != "none":
            kinds.append({"reconnect": "client_reconnect", "throttle": "store_throttling",
                          "sigkill": "router_sigkill"}[self.special])
        return kinds

    def describe(self) -> str:
        return (f"#{self.index} {self.endpoint}/{self.shape} target={self.target} special={self.special} "
                f"faults={','.join(self.faults) or '-'} cursor={self.cursor} prompt={self.prompt!r}")


def draw_plans(n: int, rng: random.Random) -> list[Plan]:
    plans = []
    for i in range(n):
        special = FORCED_SPECIALS[i] if i < len(FORCED_SPECIALS) else rng.choices(
            list(SPECIALS), weights=list(SPECIALS.values()))[0]
        endpoint = rng.choice(ENDPOINTS) if special == "none" else "responses"  # resume is a /v1/responses thing
        shape = rng.choices(["text", "tool", "json"], weights=[6, 2, 2])[0]
        faults: list[str] = []
        excluding = 0
        for _ in range(rng.choices([0, 1, 2, 3], weights=[2, 4, 3, 1])[0]):
            kind = rng.choice([*BEFORE, *MID])
            if kind in EXCLUDING and excluding >= 2:
                kind = "http:500"
            excluding += kind in EXCLUDING
            faults.append(f"{kind}:{rng.randrange(12)}" if kind in MID else kind)
        if rng.random() < 0.1:
            faults.append("no_done")  # on the attempt that succeeds
        target = {"none": "plain", "reconnect": "journal", "throttle": "throttled", "sigkill": "process"}[special]
        if special == "none" and endpoint == "responses" and rng.random() < 0.5:
            target = "journal"  # the default path of a router with a store: write-ahead streaming
        # a kill waits for every client of its batch to reach its cursor: early ones, so it lands mid-stream
        cursor = rng.randrange(2, 12) if special == "sigkill" else rng.randrange(40)
        plans.append(Plan(i, endpoint, shape, f"chaos question {rng.randrange(50)}", faults, special, target,
                          cursor))
    return plans


# -- the fault-free answers ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    text: str
    tool_calls: tuple[tuple[str, str, str], ...]  # (name, arguments, call_id)


class References:
    """The simulated upstream's fault-free answer to a (shape, prompt), asked directly (no router in between)."""

    def __init__(self, upstream_url: str) -> None:
        self.upstream_url = upstream_url
        self.cache: dict[tuple[str, str], Reference] = {}
        self.lock = threading.Lock()

    def get(self, shape: str, prompt: str) -> Reference:
        with self.lock:
            cached = self.cache.get((shape, prompt))
        if cached is not None:
            return cached
        text, calls = fault_free_answer(self.upstream_url, prompt, seed=str(COMMON["seed"]), length=LENGTH,
                                        **shape_fields(shape, "chat"))
        ref = Reference(text, tuple((c["name"], c["arguments"], c["call_id"]) for c in calls))
        with self.lock:
            self.cache[(shape, prompt)] = ref
        return ref


# -- the store that throttles ------------------------------------------------------------------------------------------


class ThrottlingTransport(httpx.AsyncBaseTransport):
    """The DynamoDB store's HTTP transport over moto (`tests.contract.moto_http.MotoTransport`), answering calls
    with a throttling error first, at random. A call the store retries carries the same body (its transactions even
    carry a ClientRequestToken), so each one is throttled at most `MAX_PER_CALL` times: well inside the store's
    retry bound, as real throttling usually is. Calls reach moto one at a time: its backend is not thread-safe."""

    MAX_PER_CALL = 2
    OPS = frozenset({"TransactWriteItems", "UpdateItem", "PutItem", "GetItem", "Query", "BatchWriteItem"})

    def __init__(self, rng: random.Random, rate: float = 0.3) -> None:
        self.inner = MotoTransport()
        self.rng = rng
        self.rate = rate
        self.lock = threading.Lock()
        self.throttled: dict[bytes, int] = {}
        self.injected = 0
        self.calls = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        op = request.headers.get("x-amz-target", "").rpartition(".")[2]
        body = await request.aread()
        throttle = False
        if op in self.OPS:
            key = op.encode() + body
            with self.lock:
                self.calls += 1
                count = self.throttled.get(key, 0)
                throttle = count < self.MAX_PER_CALL and self.rng.random() < self.rate
                if throttle:
                    if len(self.throttled) > 50_000:
                        self.throttled.clear()
                    self.throttled[key] = count + 1
                    self.injected += 1
        if throttle:
            return httpx.Response(400, json={
                "__type": "com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException",
                "message": "Rate of requests exceeds the allowed throughput."}, request=request)
        with self.lock:
            return await self.inner.handle_async_request(request)


# -- router bugs this suite found --------------------------------------------------------------------------------------


# A known router bug gets an xfail(strict) test in tests/integration/test_scenarios.py and an entry here: a stream
# whose only damage has exactly that signature is counted in the figures (`known_router_bugs`) instead of failing
# the run, so the suite keeps guarding everything else meanwhile; UNBROKEN_CHAOS_STRICT=1 fails on them too. Empty:
# the last one (a space put inside a word at a continue-instruction seam) is fixed.
KNOWN_BUGS: dict[str, Callable[[str, str], bool]] = {}


# -- one stream ------------------------------------------------------------------------------------------------------


@dataclass
class Result:
    plan: Plan
    error: str | None = None
    known_bug: str | None = None
    attempts: int = 0
    taken_over: bool = False
    seconds: float = 0.0
    outcome: Outcome | None = field(default=None, repr=False)


def check(plan: Plan, out: Outcome, ref: Reference) -> str | None:
    """Assert the stream ended as the fault-free run; returns the name of a known router bug when that is the only
    damage (and the run is not strict)."""
    assert out.http_status == 200, f"HTTP {out.http_status}: {out.raw_error[:300]}"
    assert out.status == "completed", f"status {out.status} reason={out.reason} error={out.error}"
    if out.endpoint == "responses":
        assert out.messages == (0 if plan.shape == "tool" else 1), "one uninterrupted message"
        assert set(out.item_statuses) == {"completed"}, out.item_statuses
    if plan.shape == "tool":
        got = tuple((c["name"], c["arguments"], c["call_id"]) for c in out.tool_calls)
        assert got == ref.tool_calls, f"tool calls {got} != {ref.tool_calls}"
        assert out.text == ""
        return None
    if out.text == ref.text:
        return None
    known = next((name for name, matches in KNOWN_BUGS.items() if matches(out.text, ref.text)), None)
    if known is None or STRICT:
        raise AssertionError(f"text differs{f' (known bug {known})' if known else ''}:\n  got {out.text!r}\n"
                             f"  ref {ref.text!r}")
    return known


def frame_sequence(frame: bytes) -> int | None:
    for line in frame.split(b"\n"):
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            return int(json.loads(line[6:])["sequence_number"])
    return None


def read_until(client: httpx.Client, method: str, url: str, *, cursor: int, body: dict[str, Any] | None = None,
               params: dict[str, str] | None = None, reached: Callable[[], None] | None = None) -> tuple[bytes, int]:
    """Read an SSE stream's complete frames. Without `reached`, hang up after the frame with sequence number
    `cursor`; with it, call it there and read on until the stream ends or the connection dies. Returns the
    complete frames and the last sequence number among them."""
    complete = bytearray()
    buf = b""
    last = -1
    signalled = False
    try:
        with client.stream(method, url, json=body, params=params, headers=headers(**RECOVERY)) as response:
            assert response.status_code == 200, response.read()[:300]
            for chunk in response.iter_raw():
                buf += chunk
                while b"\n\n" in buf:
                    frame, buf = buf.split(b"\n\n", 1)
                    complete += frame + b"\n\n"
                    seq = frame_sequence(frame)
                    if seq is None:
                        continue
                    last = seq
                    if seq >= cursor and not signalled:
                        if reached is None:
                            return bytes(complete), last
                        signalled = True
                        reached()
    except httpx.TransportError:
        if reached is None:
            raise
        # The router process died under the client: what it got in whole frames stands.
    return bytes(complete), last


def resume(client: httpx.Client, base_url: str, first: bytes, last: int) -> tuple[Stream, bool]:
    """Put a stream together: the first connection's frames, then `GET ?stream=true&starting_after=last`.
    Returns the whole stream and whether the rest was produced by a takeover."""
    head = parse_sse(first, allow_extensions=True)  # strict: dense from 0
    assert head.events, "the first connection got no event"
    response_id = head.events[0]["response"]["id"]
    params = {"stream": "true", "starting_after": str(last)}
    with client.stream("GET", f"{base_url}/responses/{response_id}", params=params,
                       headers=headers(**RECOVERY)) as response:
        assert response.status_code == 200, response.read()[:300]
        raw = response.read()
    rest = parse_sse(raw, allow_extensions=True, first_seq=last + 1)
    assert rest.done, "the resumed stream has no [DONE]"
    taken_over = any(e["type"] == "router:stream.resumed" and e.get("previous") == "takeover" for e in rest.events)
    return Stream(events=head.events + rest.events, done=True, heartbeats=head.heartbeats + rest.heartbeats), \
        taken_over


class Chaos:
    def __init__(self, upstream: SimulatedUpstreamThread, refs: References, urls: dict[str, str],
                 process_config: Path, process_store: str) -> None:
        self.upstream = upstream
        self.refs = refs
        self.urls = urls
        self.process_config = process_config
        self.process_store = process_store
        self.kills = 0

    def finish(self, plan: Plan, out: Outcome, started: float, taken_over: bool = False) -> Result:
        result = Result(plan, attempts=self.upstream.upstream.attempts(plan.key), taken_over=taken_over,
                        seconds=time.monotonic() - started, outcome=out)
        result.known_bug = check(plan, out, self.refs.get(plan.shape, plan.prompt))
        # the plan was really played: every failing fault cost an attempt
        assert result.attempts >= plan.failing_faults + 1, f"{result.attempts} attempts for {plan.faults}"
        return result

    def one(self, plan: Plan) -> Result:
        started = time.monotonic()
        try:
            base_url = self.urls[plan.target]
            with httpx.Client(timeout=TIMEOUT) as client:
                if plan.special == "reconnect":
                    body = {**responses_body(MODEL, plan.prompt, plan.metadata(), **shape_fields(plan.shape,
                                                                                                 plan.endpoint)),
                            "stream": True}
                    first, last = read_until(client, "POST", f"{base_url}/responses", cursor=plan.cursor, body=body)
                    stream, _ = resume(client, base_url, first, last)
                    out = outcome_of_stream(stream)
                else:
                    out = run(plan.endpoint, client, base_url, MODEL, plan.prompt, plan.metadata(),
                              **shape_fields(plan.shape, plan.endpoint))
            return self.finish(plan, out, started)
        except Exception as exc:  # collected: the test reports every failing stream, not just the first
            return Result(plan, error=f"{type(exc).__name__}: {exc}", seconds=time.monotonic() - started,
                          attempts=self.upstream.upstream.attempts(plan.key))

    def killed(self, plans: list[Plan]) -> list[Result]:
        """Start a router process, put `plans` in flight on it, SIGKILL it once every client has read up to its
        cursor, then resume each stream on the surviving process."""
        started = time.monotonic()
        firsts: list[tuple[bytes, int] | BaseException | None] = [None] * len(plans)
        events = [threading.Event() for _ in plans]

        def client_of(i: int, victim_url: str) -> None:
            plan = plans[i]
            body = {**responses_body(MODEL, plan.prompt, plan.metadata(), **shape_fields(plan.shape, "responses")),
                    "stream": True}
            try:
                with httpx.Client(timeout=TIMEOUT) as client:
                    firsts[i] = read_until(client, "POST", f"{victim_url}/responses", cursor=plan.cursor, body=body,
                                           reached=events[i].set)
            except BaseException as exc:
                firsts[i] = exc
            finally:
                events[i].set()

        with RouterProcess(self.process_config, self.process_store) as victim:
            threads = [threading.Thread(target=client_of, args=(i, victim.base_url), daemon=True)
                       for i in range(len(plans))]
            for t in threads:
                t.start()
            deadline = time.monotonic() + WAIT
            for ev in events:
                ev.wait(max(0.0, deadline - time.monotonic()))
            victim.kill()
            self.kills += 1
            for t in threads:
                t.join(WAIT)
        results = []
        with httpx.Client(timeout=TIMEOUT) as client:
            for plan, first in zip(plans, firsts, strict=True):
                try:
                    if not isinstance(first, tuple):
                        raise AssertionError(f"first connection failed: {first!r}")
                    stream, taken_over = resume(client, self.urls["process"], *first)
                    results.append(self.finish(plan, outcome_of_stream(stream), started, taken_over))
                except Exception as exc:
                    results.append(Result(plan, error=f"{type(exc).__name__}: {exc}",
                                          attempts=self.upstream.upstream.attempts(plan.key),
                                          seconds=time.monotonic() - started))
        return results


# -- the run ---------------------------------------------------------------------------------------------------------


def chaos_config(upstream_url: str) -> dict[str, Any]:
    model = {"name": MODEL, "deployments": [
        {"name": name, "provider": "simulated", "model": f"chaos.{name}", "base_url": upstream_url,
         "price": {"input": 1.0, "output": 2.0}, "options": {**COMMON, **options}}
        for name, options in DEPLOYMENTS.items()]}
    # lease 1 s: a killed producer is taken over quickly
    return base_config(model, max_attempts=10, lease_seconds=1.0, heartbeat_seconds=5.0)


def continuation_mode(body: dict[str, Any]) -> str:
    messages = body.get("messages") or []
    if len(messages) >= 2 and messages[-1].get("role") == "user" and \
            messages[-1].get("content") == CONTINUE_INSTRUCTION and messages[-2].get("role") == "assistant":
        return "instruction"
    if messages and messages[-1].get("role") == "assistant":
        return "literal_prefill_rejected" if body["model"] == "chaos.noprefill" else "literal"
    return "fresh"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


@pytest.fixture
def aws() -> Iterator[None]:
    from moto import mock_aws

    with mock_aws():
        yield


@pytest.mark.chaos
@pytest.mark.timeout(180 + N)  # about a second a stream at most, on 2 cores
def test_chaos(tmp_path: Path, aws: None, capsys: pytest.CaptureFixture[str]) -> None:

    from unbroken.journal.dynamodb import DynamoDBStore

    plans = draw_plans(N, random.Random(SEED))
    t0 = time.monotonic()
    with SimulatedUpstream.start_in_thread() as upstream:
        upstream.upstream.received = deque(maxlen=50 * N + 1000)  # every request, for the figures
        config = chaos_config(upstream.base_url)
        config_path = tmp_path / "router.yaml"
        config_path.write_text(yaml.safe_dump(config))
        throttling = ThrottlingTransport(random.Random(SEED))
        throttled_store = DynamoDBStore("chaos-journal", region="us-east-1", http_transport=throttling,
                                        backoff_base=0.005)
        asyncio.run(throttled_store.create_table_if_missing())
        process_store = f"sqlite:///{tmp_path / 'shared.db'}"
        with RouterThread(config) as plain, \
                RouterThread(config, store=open_store(f"sqlite:///{tmp_path / 'journal.db'}")) as journal, \
                RouterThread(config, store=throttled_store) as throttled, \
                RouterProcess(config_path, process_store) as survivor:
            urls = {"plain": plain.base_url, "journal": journal.base_url, "throttled": throttled.base_url,
                    "process": survivor.base_url}
            chaos = Chaos(upstream, References(upstream.base_url), urls, config_path, process_store)
            singles = [p for p in plans if p.special != "sigkill"]
            doomed = [p for p in plans if p.special == "sigkill"]
            batches = [doomed[i:i + KILL_BATCH] for i in range(0, len(doomed), KILL_BATCH)]
            with ThreadPoolExecutor(CONCURRENCY) as pool:
                futures = [pool.submit(chaos.killed, batch) for batch in batches]
                futures += [pool.submit(lambda p: [chaos.one(p)], plan) for plan in singles]
                results: list[Result] = [r for f in futures for r in f.result(timeout=180 + N)]
        bodies = list(upstream.upstream.received)
    elapsed = time.monotonic() - t0

    results.sort(key=lambda r: r.plan.index)
    failures = [r for r in results if r.error is not None]
    known = [r for r in results if r.known_bug is not None]
    faults = Counter(kind for p in plans for kind in p.fault_kinds())
    figures = {
        "seed": SEED,
        "streams": len(results),
        "completed_with_reference_output": len(results) - len(failures) - len(known),
        "failed": len(failures),
        "known_router_bugs": dict(Counter(str(r.known_bug) for r in known)),
        "known_router_bug_streams": [r.plan.describe() for r in known[:20]],
        "wall_seconds": round(elapsed, 1),
        "concurrency": CONCURRENCY,
        "by_endpoint": dict(Counter(p.endpoint for p in plans)),
        "by_shape": dict(Counter(p.shape for p in plans)),
        "by_target": dict(Counter(p.target for p in plans)),
        "streams_with_faults": sum(1 for p in plans if p.faults or p.special != "none"),
        "faults_injected": dict(sorted(faults.items())),
        "store_throttles_injected": throttling.injected,
        "store_calls": throttling.calls,
        "router_processes_killed": chaos.kills,
        "streams_taken_over": sum(1 for r in results if r.taken_over),
        "upstream_attempts_per_stream": {str(k): v for k, v in sorted(Counter(r.attempts for r in results).items())},
        "upstream_attempts_mean": round(statistics.fmean(r.attempts for r in results), 2) if results else 0,
        "upstream_requests_by_kind": dict(Counter(continuation_mode(b) for b in bodies
                                                  if str((b.get("metadata") or {}).get("sim_request", "")).startswith(
                                                      "chaos-"))),
        "stream_seconds_p50": round(percentile([r.seconds for r in results], 0.5), 3),
        "stream_seconds_p99": round(percentile([r.seconds for r in results], 0.99), 3),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    with capsys.disabled():  # the summary is for people: shown even without -s (xdist workers have no terminal)
        print(f"\nchaos summary ({RESULTS}):\n" + json.dumps(figures, indent=2))
    assert not failures, f"{len(failures)} of {len(results)} streams did not end as the fault-free run:\n" + \
        "\n".join(f"{r.plan.describe()}\n    {r.error}" for r in failures[:20])
