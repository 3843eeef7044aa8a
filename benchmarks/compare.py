"""The side-by-side run of `make bench`: unbroken vs the LiteLLM proxy vs straight to the upstream, on one fake
OpenAI-compatible upstream (`benchmarks.fake_upstream`), in one run, every figure next to its baseline.

Targets (all streamed with httpx, one connection pool per target, keep-alive):
- `direct`            client → upstream `/v1/chat/completions` (the baseline of every "added" figure);
- `litellm`           client → LiteLLM proxy `/v1/chat/completions` → upstream (model `openai/<name>` + api_base);
- `unbroken_chat`     client → `unbroken serve --store none` `/v1/chat/completions` → upstream (`openai_compatible`);
- `unbroken_none`     the same router, `/v1/responses` (journal off);
- `unbroken_sqlite`   `unbroken serve --store sqlite:///...`, `/v1/responses` (every event journaled before it is sent);
- `unbroken_dynamodb` the router on DynamoDB Local, `/v1/responses` (started through `benchmarks.counted_serve`,
                      which is `unbroken serve` plus counting of DynamoDB calls and capacity units).
Streams: `unpaced` = 200 tokens as fast as the upstream can write them; `paced` = 50 tokens 20 ms apart (50 tokens/s);
`long` = 1,000 tokens at 50 tokens/s (what the cost figures are computed from).

Phases, each bounded in count and time:
1. start: each gateway alone on the machine, process start → first good answer (a non-streamed chat completion
   with the expected text); then 99 short (20-token) streams, then its resident memory ("after 100 requests");
   the Lambda entry point (`uvicorn unbroken.app:lambda_app`) the same way; import time of `unbroken.app`;
2. sequential unpaced streams, in rounds that rotate over the targets: time to first byte, to first text delta,
   total; the gateway's CPU per stream (its process tree's CPU delta over its own blocks / streams);
3. paced streams, 10 at a time per target (started 20 ms apart), in rotating rounds;
4. 50 concurrent streams per target, a fixed number of them: streams/s (streams / wall time of the phase), and
   CPU per stream under load;
5. long streams, a few per target, all targets at once (they are mostly idle): wall time and CPU per 1,000-token
   response, and the DynamoDB calls / capacity units per response.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.procs import MachineMonitor, Server, free_port

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-bench"
PROMPT = "Tell me a story."
MODES: dict[str, dict[str, Any]] = {
    "unpaced": {"upstream_model": "t200", "tokens": 200, "gap_ms": 0},
    "paced": {"upstream_model": "t50-g20", "tokens": 50, "gap_ms": 20},
    "long": {"upstream_model": "t1000-g20", "tokens": 1000, "gap_ms": 20},
    "short": {"upstream_model": "t20", "tokens": 20, "gap_ms": 0},  # warm-up requests (memory after 100)
}
SCALE = float(os.environ.get("UNBROKEN_BENCH_SCALE", "1"))  # < 1 for a quick smoke run of the harness


def _n(x: float, lo: int = 1) -> int:
    return max(lo, round(x * SCALE))


UNPACED_ROUNDS, UNPACED_BLOCK = 4, _n(25, 3)  # 100 sequential samples per target
PACED_ROUNDS, PACED_BATCH = _n(6, 2), 10  # 60 samples per target
CONCURRENCY = 50
LOAD_STREAMS = _n(100, CONCURRENCY)  # per target and mode, CONCURRENCY at a time
LONG_STREAMS = _n(6, 2)
WARM_REQUESTS = 100
NO_PROXY_ENV = {  # loopback only: anything that tries to leave the machine through a proxy is refused at once
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}
LITELLM_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # else it fetches the price map from the internet at import
    "LITELLM_LOG": "ERROR",
    "LITELLM_TELEMETRY": "False",
}
DDB_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}


# ---------------------------------------------------------------------------------------------------------------
# statistics


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 3)


# ---------------------------------------------------------------------------------------------------------------
# gateways and targets


@dataclass
class Gateway:
    key: str
    label: str
    server: Server
    base_url: str  # .../v1
    start_to_first_answer_s: float | None = None
    start_cpu_s: float | None = None
    rss_after_100_mib: float | None = None
    stats_url: str | None = None


@dataclass
class Target:
    key: str
    label: str
    api: str  # chat | responses
    url: str
    gateway: Gateway | None
    model_names: dict[str, str]
    headers: dict[str, str] = field(default_factory=lambda: {"authorization": f"Bearer {KEY}"})

    def body(self, mode: str) -> dict[str, Any]:
        model = self.model_names[mode]
        if self.api == "chat":
            return {"model": model, "messages": [{"role": "user", "content": PROMPT}], "stream": True}
        return {"model": model, "input": PROMPT, "stream": True}


_CHAT_TEXT = re.compile(rb'"content":\s*"[^"]')
_RESP_TEXT = re.compile(rb"event: response\.output_text\.delta")


@dataclass
class Sample:
    ok: bool
    ttfb: float = 0.0
    ttft: float = 0.0
    total: float = 0.0
    deltas: int = 0
    nbytes: int = 0
    error: str = ""


async def one_stream(client: httpx.AsyncClient, target: Target, mode: str) -> Sample:
    pattern = _CHAT_TEXT if target.api == "chat" else _RESP_TEXT
    buf = bytearray()
    ttfb = ttft = None
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", target.url, json=target.body(mode), headers=target.headers) as r:
            async for chunk in r.aiter_raw():
                now = time.perf_counter()
                if ttfb is None:
                    ttfb = now
                start = max(0, len(buf) - 64)
                buf += chunk
                if ttft is None and pattern.search(buf, start):
                    ttft = now
            status = r.status_code
    except httpx.HTTPError as exc:
        at = "before the response headers" if ttfb is None and not buf else f"after {len(buf)} body bytes"
        return Sample(False, error=f"{type(exc).__name__} {at}, {time.perf_counter() - t0:.3f} s in: {exc}"[:300])
    end = time.perf_counter()
    deltas = len(pattern.findall(buf))
    tail = bytes(buf[-8192:])
    complete = b"[DONE]" in tail and (target.api == "chat" or b"response.completed" in tail)
    expected = MODES[mode]["tokens"]
    ok = status == 200 and complete and ttft is not None and deltas == expected
    error = "" if ok else f"status {status}, complete={complete}, deltas {deltas}/{expected}: {bytes(buf[:300])!r}"
    return Sample(ok, (ttfb or end) - t0, (ttft or end) - t0, end - t0, deltas, len(buf), error[:400])


def first_answer(base_url: str, timeout: float, t0: float, server: Server) -> float:
    """Seconds from `t0` (process spawn) to the first good non-streamed chat answer, polled with a bound."""
    deadline = time.monotonic() + timeout
    body = {"model": "unpaced", "messages": [{"role": "user", "content": PROMPT}]}
    with httpx.Client(timeout=10, trust_env=False) as client:
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                break
            try:
                r = client.post(f"{base_url}/chat/completions", json=body, headers={"authorization": f"Bearer {KEY}"})
            except httpx.TransportError:
                time.sleep(0.02)
                continue
            text = ""
            if r.status_code == 200:
                try:
                    text = r.json()["choices"][0]["message"]["content"] or ""
                except (ValueError, KeyError, IndexError, TypeError):
                    text = ""
            if text.startswith("the quick river"):
                return time.perf_counter() - t0
            time.sleep(0.05)  # up but not answering yet (e.g. still loading its config)
    raise RuntimeError(f"{server.name}: no good answer within {timeout:g} s:\n{server.log_tail()}")


async def warm(target: Target, n: int) -> list[Sample]:
    """`n` short streams (20 tokens): requests that load every code path, without spending minutes on LiteLLM."""
    async with httpx.AsyncClient(timeout=60, trust_env=False) as client:
        return [await one_stream(client, target, "short") for _ in range(n)]


# ---------------------------------------------------------------------------------------------------------------
# configs


def router_config(upstream: str) -> str:
    models = "\n".join(
        f"  - name: {mode}\n    deployments:\n"
        f"      - {{name: fake, provider: openai_compatible, model: {spec['upstream_model']}, "
        f"base_url: \"{upstream}\", api_key: sk-fake}}"
        for mode, spec in MODES.items()
    )
    return f"api_keys: [{{key: {KEY}, tenant: bench}}]\nserver: {{heartbeat_seconds: 15}}\nmodels:\n{models}\n"


def litellm_config(upstream: str) -> str:
    entries = "\n".join(
        f"  - model_name: {mode}\n    litellm_params: {{model: openai/{spec['upstream_model']}, "
        f"api_base: \"{upstream}\", api_key: sk-fake}}"
        for mode, spec in MODES.items()
    )
    return f"model_list:\n{entries}\ngeneral_settings: {{master_key: {KEY}}}\n"


# ---------------------------------------------------------------------------------------------------------------
# start-up figures


def _run_wall(argv: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120,
                   env={**os.environ, **(env or {})})
    return time.perf_counter() - t0


def import_times(python: str, module: str, runs: int = 3) -> dict[str, Any]:
    """`python -X importtime -c 'import MODULE'`: the module's cumulative import time (median of `runs`) and, from
    the median run, the modules that cost most by themselves; next to a bare `python -c pass` (median)."""
    results = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = subprocess.run([python, "-X", "importtime", "-c", f"import {module}"], capture_output=True, text=True,
                             timeout=120, check=True, env={**os.environ, **NO_PROXY_ENV})
        wall = time.perf_counter() - t0
        selfs: list[tuple[int, str]] = []
        cumulative = None
        for line in out.stderr.splitlines():
            parts = [p.strip() for p in line.removeprefix("import time:").split("|")]
            if len(parts) != 3 or not parts[0].isdigit():
                continue
            selfs.append((int(parts[0]), parts[2]))
            if parts[2] == module:
                cumulative = int(parts[1])
        results.append((cumulative or 0, wall, sorted(selfs, reverse=True)[:8], len(selfs)))
    results.sort()
    cumulative, wall, top, count = results[len(results) // 2]
    bare = sorted(_run_wall([python, "-c", "pass"]) for _ in range(runs))[runs // 2]
    return {
        "module": module,
        "importtime_cumulative_ms": round(cumulative / 1000, 1),
        "modules_imported": count,
        "largest_self_ms": [[name, round(us / 1000, 1)] for us, name in top],
        "python_importtime_wall_s": round(wall, 3),
        "python_c_pass_wall_s": round(bare, 3),
    }


def lambda_entry(config: Path, store: str | None, tmp: Path) -> dict[str, Any]:
    """The gateway Lambda's own start path (functions/gateway/run.sh): uvicorn on `unbroken.app:lambda_app`, the
    app built on the first request. Seconds from spawn to /healthz (what the Web Adapter waits for) and to the
    first good answer."""
    port = free_port()
    env = {"UNBROKEN_CONFIG": str(config), **NO_PROXY_ENV, **DDB_ENV}
    if store:
        env["UNBROKEN_STORE"] = store
    else:
        env.pop("UNBROKEN_STORE", None)
    t0 = time.perf_counter()
    server = Server("lambda-entry", [sys.executable, "-m", "uvicorn", "unbroken.app:lambda_app", "--host", "127.0.0.1",
                                     "--port", str(port), "--no-server-header", "--no-access-log", "--log-level",
                                     "warning", "--timeout-keep-alive", "75"], env=env, cwd=tmp)
    try:
        healthz = None
        deadline = time.monotonic() + 30
        with httpx.Client(timeout=5, trust_env=False) as client:
            while time.monotonic() < deadline and server.proc.poll() is None:
                try:
                    if client.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                        healthz = time.perf_counter() - t0
                        break
                except httpx.TransportError:
                    time.sleep(0.01)
        answer = first_answer(f"http://127.0.0.1:{port}/v1", 30, t0, server)
        return {"store": "dynamodb" if store else "none",
                "start_to_healthz_s": round(healthz, 3) if healthz else None,
                "start_to_first_answer_s": round(answer, 3), "start_cpu_s": round(server.cpu(), 2),
                "rss_mib_after_first_answer": round(server.rss(), 1)}
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------------------------
# measurement phases


@dataclass
class Acc:
    samples: list[Sample] = field(default_factory=list)
    gateway_cpu: float = 0.0
    upstream_cpu: float = 0.0
    client_cpu: float = 0.0
    streams: int = 0
    elapsed: float = 0.0

    def summary(self) -> dict[str, Any]:
        good = [s for s in self.samples if s.ok]
        out: dict[str, Any] = {"n": len(self.samples), "errors": len(self.samples) - len(good)}
        if not good:
            out["first_error"] = next((s.error for s in self.samples if s.error), "")
            return out
        for name in ("ttfb", "ttft", "total"):
            vals = [getattr(s, name) for s in good]
            out[f"{name}_ms_p50"] = _ms(percentile(vals, 0.5))
            out[f"{name}_ms_p99"] = _ms(percentile(vals, 0.99))
        n = max(1, self.streams)
        out["gateway_cpu_ms_per_stream"] = round(self.gateway_cpu / n * 1000, 3)
        out["upstream_cpu_ms_per_stream"] = round(self.upstream_cpu / n * 1000, 3)
        out["client_cpu_ms_per_stream"] = round(self.client_cpu / n * 1000, 3)
        out["bytes_per_stream"] = round(sum(s.nbytes for s in good) / len(good))
        if self.elapsed:
            out["streams_per_s"] = round(len(good) / self.elapsed, 1)
            out["elapsed_s"] = round(self.elapsed, 2)
        if self.errors_text():
            out["first_error"] = self.errors_text()
        return out

    def errors_text(self) -> str:
        return next((s.error for s in self.samples if not s.ok), "")


class Meter:
    """CPU deltas of the gateway, the upstream and this client process around a block of streams."""

    def __init__(self, target: Target, upstream: Server) -> None:
        self.target, self.upstream = target, upstream

    def __enter__(self) -> Meter:
        self.g0 = self.target.gateway.server.cpu() if self.target.gateway else 0.0
        self.u0 = self.upstream.cpu()
        self.c0 = time.process_time()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.gateway = (self.target.gateway.server.cpu() if self.target.gateway else 0.0) - self.g0
        self.up = self.upstream.cpu() - self.u0
        self.client = time.process_time() - self.c0
        self.wall = time.perf_counter() - self.t0

    def add_to(self, acc: Acc, streams: int, *, elapsed: bool = False) -> None:
        acc.gateway_cpu += self.gateway
        acc.upstream_cpu += self.up
        acc.client_cpu += self.client
        acc.streams += streams
        if elapsed:
            acc.elapsed += self.wall


async def sequential_unpaced(targets: list[Target], clients: dict[str, httpx.AsyncClient], upstream: Server,
                             accs: dict[str, Acc]) -> None:
    for rnd in range(UNPACED_ROUNDS):
        order = targets[rnd % len(targets):] + targets[: rnd % len(targets)]
        for t in order:
            with Meter(t, upstream) as m:
                samples = [await one_stream(clients[t.key], t, "unpaced") for _ in range(UNPACED_BLOCK)]
            m.add_to(accs[t.key], len(samples))
            accs[t.key].samples += samples


async def paced_batches(targets: list[Target], clients: dict[str, httpx.AsyncClient], upstream: Server,
                        accs: dict[str, Acc]) -> None:
    gap = MODES["paced"]["gap_ms"] / 1000

    async def delayed(client: httpx.AsyncClient, t: Target, delay: float) -> Sample:
        await asyncio.sleep(delay)
        return await one_stream(client, t, "paced")

    for rnd in range(PACED_ROUNDS):
        order = targets[rnd % len(targets):] + targets[: rnd % len(targets)]
        for t in order:
            with Meter(t, upstream) as m:
                samples = await asyncio.gather(*(delayed(clients[t.key], t, i * gap) for i in range(PACED_BATCH)))
            m.add_to(accs[t.key], len(samples))
            accs[t.key].samples += samples


async def under_load(t: Target, mode: str, upstream: Server) -> Acc:
    """LOAD_STREAMS streams, CONCURRENCY at a time (each worker starts its next stream when one ends). A fixed
    count, not a fixed time: a slow gateway takes longer instead of being cut off mid-stream. Connection set-up
    (50 loopback connects) is in the figure; it is the same for every target."""
    acc = Acc()
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(timeout=120, limits=limits, trust_env=False) as client:
        left = [LOAD_STREAMS]

        async def worker() -> None:
            while left[0] > 0:
                left[0] -= 1
                acc.samples.append(await one_stream(client, t, mode))

        with Meter(t, upstream) as m:
            await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        m.add_to(acc, len(acc.samples), elapsed=True)
    return acc


async def stats_of(gateway: Gateway | None) -> dict[str, Any] | None:
    if gateway is None or gateway.stats_url is None:
        return None
    async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
        return (await client.get(gateway.stats_url)).json()


def _diff(after: Any, before: Any) -> Any:
    if isinstance(after, dict):
        return {k: _diff(v, (before or {}).get(k, 0 if not isinstance(v, dict) else {})) for k, v in after.items()}
    if isinstance(after, int | float) and isinstance(before, int | float):
        return after - before
    return after


async def long_streams(targets: list[Target], upstream: Server) -> dict[str, Any]:
    """All targets at once, LONG_STREAMS each: the streams idle between tokens, so they barely compete."""
    gateways = {t.gateway.key: t.gateway for t in targets if t.gateway}
    before_stats = {k: await stats_of(g) for k, g in gateways.items()}
    before_cpu = {k: g.server.cpu() for k, g in gateways.items()}
    up0 = upstream.cpu()
    clients = {t.key: httpx.AsyncClient(timeout=120, trust_env=False) for t in targets}
    try:
        per_target = await asyncio.gather(*(
            asyncio.gather(*(one_stream(clients[t.key], t, "long") for _ in range(LONG_STREAMS))) for t in targets
        ))
    finally:
        for c in clients.values():
            await c.aclose()
    up_cpu = upstream.cpu() - up0
    out: dict[str, Any] = {"streams_per_target": LONG_STREAMS, "tokens": MODES["long"]["tokens"],
                           "tokens_per_s": 1000 / MODES["long"]["gap_ms"],
                           "upstream_cpu_ms_per_stream": round(up_cpu / (LONG_STREAMS * len(targets)) * 1000, 2),
                           "targets": {}}
    for t, samples in zip(targets, per_target, strict=True):
        acc = Acc(samples=list(samples))
        summ = acc.summary()
        for k in ("gateway_cpu_ms_per_stream", "upstream_cpu_ms_per_stream", "client_cpu_ms_per_stream"):
            summ.pop(k, None)
        if t.gateway:
            summ["gateway_cpu_ms_per_stream"] = round(
                (t.gateway.server.cpu() - before_cpu[t.gateway.key]) / LONG_STREAMS * 1000, 2)
            after = await stats_of(t.gateway)
            if after is not None:
                d = _diff(after, before_stats[t.gateway.key])
                summ["store_per_response"] = {k: (round(v / LONG_STREAMS, 2) if isinstance(v, int | float) else v)
                                              for k, v in _flatten(d).items()}
        out["targets"][t.key] = summ
    return out


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def summarize(acc: Acc, t: Target) -> dict[str, Any]:
    out = acc.summary()
    if out.get("errors") and t.gateway is not None:
        out["gateway_log_tail"] = t.gateway.server.log_tail(1500)
    return out


class Phase:
    def __init__(self, report: dict[str, Any], name: str) -> None:
        self.report, self.name = report, name

    def __enter__(self) -> Phase:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.report.setdefault("phase_seconds", {})[self.name] = round(time.perf_counter() - self.t0, 1)


async def measure(targets: list[Target], upstream: Server, report: dict[str, Any]) -> None:
    limits = httpx.Limits(max_connections=PACED_BATCH, max_keepalive_connections=PACED_BATCH)
    clients = {t.key: httpx.AsyncClient(timeout=60, limits=limits, trust_env=False) for t in targets}
    try:
        for t in targets:  # open each pool once before anything is timed
            await one_stream(clients[t.key], t, "unpaced")
        accs = {t.key: Acc() for t in targets}
        print(f"bench: sequential unpaced streams ({UNPACED_ROUNDS} rounds x {UNPACED_BLOCK} per target)", flush=True)
        with Phase(report, "sequential_unpaced"):
            await sequential_unpaced(targets, clients, upstream, accs)
        report["unpaced"] = {t.key: summarize(accs[t.key], t) for t in targets}
        accs = {t.key: Acc() for t in targets}
        print(f"bench: paced streams ({PACED_ROUNDS} rounds x {PACED_BATCH} per target)", flush=True)
        with Phase(report, "paced"):
            await paced_batches(targets, clients, upstream, accs)
        report["paced"] = {t.key: summarize(accs[t.key], t) for t in targets}
    finally:
        for c in clients.values():
            await c.aclose()
    report["load"] = {"concurrency": CONCURRENCY, "streams": LOAD_STREAMS}
    for mode in ("unpaced", "paced"):
        print(f"bench: {LOAD_STREAMS} {mode} streams per target, {CONCURRENCY} at a time", flush=True)
        report["load"][mode] = {}
        with Phase(report, f"load_{mode}"):
            for t in targets:
                report["load"][mode][t.key] = summarize(await under_load(t, mode, upstream), t)
    print(f"bench: long streams ({LONG_STREAMS} x 1,000 tokens at 50 tokens/s per target, all at once)", flush=True)
    with Phase(report, "long"):
        report["long"] = await long_streams([t for t in targets if t.key != "unbroken_chat"], upstream)


# ---------------------------------------------------------------------------------------------------------------
# the run


def litellm_binary() -> str | None:
    path = os.environ.get("UNBROKEN_BENCH_LITELLM")
    if path and Path(path).exists():
        return path
    return None


def _litellm_version(binary: str) -> str | None:
    python = str(Path(binary).parent / "python")
    out = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
                         capture_output=True, text=True, timeout=60)
    return out.stdout.strip() or None


def run(report: dict[str, Any]) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="unbroken-bench-"))
    servers: list[Server] = []
    ddb = None
    try:
        upstream = Server("upstream", [sys.executable, "-m", "benchmarks.fake_upstream", "--port", "0"], cwd=ROOT)
        servers.append(upstream)
        upstream_url = upstream.wait_line("fake upstream on", 30).split()[-1]
        (tmp / "router.yaml").write_text(router_config(upstream_url))
        (tmp / "litellm.yaml").write_text(litellm_config(upstream_url))

        from tests.support.dynamodb_local import DynamoDBLocal, DynamoDBLocalMissing

        try:
            ddb = DynamoDBLocal().start()
        except (DynamoDBLocalMissing, RuntimeError) as exc:
            print(f"bench: no DynamoDB Local ({exc}); the DynamoDB rows are left out", flush=True)
            ddb = None
        ddb_store = (f"dynamodb://unbroken-bench?region=us-east-1&endpoint_url={ddb.endpoint_url}" if ddb else None)
        if ddb_store:  # the table once, so no start below pays for creating it
            subprocess.run([sys.executable, "-c", "import asyncio; from unbroken.journal.backends import open_store; "
                            f"asyncio.run(open_store({ddb_store!r}).create_table_if_missing())"],
                           check=True, timeout=120, env={**os.environ, **DDB_ENV, **NO_PROXY_ENV})

        print("bench: import time and the Lambda entry point", flush=True)
        with Phase(report, "import_and_lambda_entry"):
            report["import"] = import_times(sys.executable, "unbroken.app")
            report["lambda_entry"] = [lambda_entry(tmp / "router.yaml", None, tmp)]
            if ddb_store:
                report["lambda_entry"].append(lambda_entry(tmp / "router.yaml", ddb_store, tmp))

        gateways: dict[str, Gateway] = {}
        unbroken_bin = str(Path(sys.executable).parent / "unbroken")
        specs: list[tuple[str, str, list[str], dict[str, str], float]] = [
            ("unbroken_none", "unbroken, journal off", [unbroken_bin, "serve", "--store", "none"], {}, 60),
            ("unbroken_sqlite", "unbroken, SQLite journal",
             [unbroken_bin, "serve", "--store", f"sqlite:///{tmp / 'journal.db'}"], {}, 60),
        ]
        if ddb_store:
            specs.append(("unbroken_dynamodb", "unbroken, DynamoDB Local journal",
                          [sys.executable, "-m", "benchmarks.counted_serve", "serve", "--store", ddb_store],
                          DDB_ENV, 60))
        litellm = litellm_binary()
        if litellm:
            specs.append(("litellm", "LiteLLM proxy", [litellm, "--config", str(tmp / "litellm.yaml"), "--host",
                                                       "127.0.0.1", "--num_workers", "1"], LITELLM_ENV, 240))
            report["litellm_version"] = _litellm_version(litellm)
        else:
            print("bench: LiteLLM is not installed (UNBROKEN_BENCH_LITELLM); its rows are left out", flush=True)
        for key, label, argv, env, timeout in specs:
            port = free_port()
            if key.startswith("unbroken"):
                argv = [*argv, "--config", str(tmp / "router.yaml"), "--host", "127.0.0.1", "--port", str(port),
                        "--log-level", "WARNING"]
            else:
                argv = [*argv, "--port", str(port)]
            print(f"bench: starting {label}", flush=True)
            phase = Phase(report, f"start_and_warm_{key}").__enter__()
            server = Server(key, argv, env={**NO_PROXY_ENV, **env}, cwd=ROOT if key.startswith("unbroken") else tmp)
            servers.append(server)
            base = f"http://127.0.0.1:{port}/v1"
            gw = Gateway(key, label, server, base)
            gw.start_to_first_answer_s = round(first_answer(base, timeout, server.started, server), 3)
            gw.start_cpu_s = round(server.cpu(), 2)
            if key == "unbroken_dynamodb":
                gw.stats_url = f"http://127.0.0.1:{port}/_bench/stats"
            gateways[key] = gw
            api = "chat" if key == "litellm" else "responses"
            probe = Target(key, label, api, f"{base}/{'chat/completions' if api == 'chat' else 'responses'}", gw,
                           {m: m for m in MODES})
            warmed = asyncio.run(warm(probe, WARM_REQUESTS - 1))
            bad = [s for s in warmed if not s.ok]
            if bad:
                raise RuntimeError(f"{label}: {len(bad)} of {len(warmed)} warm-up streams failed: {bad[0].error}")
            gw.rss_after_100_mib = round(server.rss(), 1)
            phase.__exit__()

        upstream_models = {m: spec["upstream_model"] for m, spec in MODES.items()}
        plain = {m: m for m in MODES}
        targets = [Target("direct", "straight to the upstream", "chat", f"{upstream_url}/chat/completions", None,
                          upstream_models)]
        if "litellm" in gateways:
            g = gateways["litellm"]
            targets.append(Target("litellm", f"LiteLLM {report.get('litellm_version') or ''} proxy, chat".strip(),
                                  "chat", f"{g.base_url}/chat/completions", g, plain))
        g = gateways["unbroken_none"]
        targets.append(Target("unbroken_chat", "unbroken, chat, journal off", "chat", f"{g.base_url}/chat/completions",
                              g, plain))
        targets.append(Target("unbroken_none", "unbroken, responses, journal off", "responses",
                              f"{g.base_url}/responses", g, plain))
        g = gateways["unbroken_sqlite"]
        targets.append(Target("unbroken_sqlite", "unbroken, responses, SQLite journal", "responses",
                              f"{g.base_url}/responses", g, plain))
        if "unbroken_dynamodb" in gateways:
            g = gateways["unbroken_dynamodb"]
            targets.append(Target("unbroken_dynamodb", "unbroken, responses, DynamoDB Local journal", "responses",
                                  f"{g.base_url}/responses", g, plain))
        report["targets"] = {t.key: {"label": t.label, "api": t.api, "gateway": t.gateway.key if t.gateway else None}
                             for t in targets}
        asyncio.run(measure(targets, upstream, report))
        report["gateways"] = {
            k: {"label": g.label, "start_to_first_answer_s": g.start_to_first_answer_s, "start_cpu_s": g.start_cpu_s,
                "rss_mib_after_100_requests": g.rss_after_100_mib, "rss_mib_at_end": round(g.server.rss(), 1)}
            for k, g in gateways.items()
        }
        report["bare_interpreter_start_s"] = {"unbroken_venv": report["import"]["python_c_pass_wall_s"]}
        if litellm:
            python = str(Path(litellm).parent / "python")
            report["bare_interpreter_start_s"]["litellm_venv"] = round(
                sorted(_run_wall([python, "-c", "pass"]) for _ in range(3))[1], 3)
    finally:
        for s in reversed(servers):
            s.stop()
        if ddb is not None:
            ddb.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    import json

    report: dict[str, Any] = {}
    with MachineMonitor() as monitor:
        run(report)
    report["machine_load"] = monitor.summary()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
