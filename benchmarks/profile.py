"""`make profile`: where the router's CPU goes on the hot path of journaled streams (SQLite journal).

`unbroken serve --store sqlite:///...` is started and warmed (lazy imports, first-use set-up), then py-spy attaches to
it (sampling all threads, on-CPU samples only, from outside the process: nothing in the router changes) while this
script streams through it from the fake upstream
(`benchmarks.fake_upstream`): unpaced 200-token `/v1/responses` streams two at a time (the per-token path), then
paced 50-token streams ten at a time (the per-batch commit path). py-spy's folded stacks are summarised into
`docs/bench/profile.txt`: share of samples per component (by the frame that was on the CPU), the functions with the
most samples by themselves and with their callees. File paths are shortened to package-relative ones.

Run: `python -m benchmarks.profile [--out docs/bench/profile.txt]` (needs `py-spy` in the same environment).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import sys
import sysconfig
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from benchmarks.compare import MODES, NO_PROXY_ENV, Target, one_stream, router_config
from benchmarks.procs import Server, free_port

ROOT = Path(__file__).resolve().parents[1]
RATE = 250
UNPACED_STREAMS = 200
PACED_STREAMS = 40

# Components by the file of the frame on the CPU (first match wins).
COMPONENTS: list[tuple[str, str]] = [
    ("unbroken/journal/", "unbroken.journal (writer, feed, SQLite store)"),
    ("unbroken/protocol/", "unbroken.protocol (events, SSE framing)"),
    ("unbroken/providers/", "unbroken.providers (upstream SSE parsing)"),
    ("unbroken/api/", "unbroken.api (routes, streaming body)"),
    ("unbroken/", "unbroken (other)"),
    ("sqlite3/", "sqlite3"),
    ("<sqlite3>", "sqlite3"),
    ("json/", "json (stdlib)"),
    ("pydantic", "pydantic"),
    ("fastapi/", "fastapi + starlette"),
    ("starlette/", "fastapi + starlette"),
    ("uvicorn/", "uvicorn + h11"),
    ("h11/", "uvicorn + h11"),
    ("httpx/", "httpx + httpcore + anyio"),
    ("httpcore/", "httpx + httpcore + anyio"),
    ("anyio/", "httpx + httpcore + anyio"),
    ("httpx_sse/", "httpx + httpcore + anyio"),
    ("asyncio/", "asyncio (event loop, streams)"),
    ("concurrent/", "threads (executor hand-off)"),
    ("threading.py", "threads (executor hand-off)"),
    ("selectors.py", "asyncio (event loop, streams)"),
    ("socket.py", "sockets"),
    ("ssl.py", "sockets"),
    ("logging/", "logging"),
]


def _shorten(path: str, prefixes: list[tuple[str, str]]) -> str:
    for prefix, repl in prefixes:
        if path.startswith(prefix):
            return repl + path[len(prefix):]
    return path.rsplit("/", 1)[-1] if path.startswith("/") else path


def _prefixes() -> list[tuple[str, str]]:
    paths = sysconfig.get_paths()
    found = [(str(ROOT / "layers") + "/", ""), (str(ROOT) + "/", "")]
    for key in ("purelib", "platlib"):
        found.append((paths[key] + "/", ""))
    found.append((paths["stdlib"] + "/", ""))
    return sorted(set(found), key=lambda p: -len(p[0]))


_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*)\)$")


def parse_folded(text: str) -> list[tuple[list[tuple[str, str]], int]]:
    """py-spy raw output: `frame;frame;... count` per line, frames `func (file)`, root first."""
    prefixes = _prefixes()
    stacks = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = []
        for raw in stack.split(";"):
            m = _FRAME.match(raw)
            func, file = (m.group("func"), m.group("file")) if m else (raw, "")
            frames.append((func, _shorten(file, prefixes)))
        stacks.append((frames, int(count)))
    return stacks


Frames = list[tuple[str, str]]


def _has(*needles: str) -> Any:
    return lambda frames: any(any(n in f"{func} ({file})" for n in needles) for func, file in frames)


# Named slices of the hot path, each the share of samples whose stack contains one of its frames (they overlap).
BUCKETS: list[tuple[str, Any]] = [
    ("reading the upstream: httpx body -> httpx-sse lines and events -> json.loads (OpenAIChatProvider.parse_stream)",
     _has("OpenAIChatProvider.parse_stream")),
    ("  of which in httpx-sse (line splitting, SSE decoding)",
     lambda fr: _has("OpenAIChatProvider.parse_stream")(fr) and _has("httpx_sse/")(fr)),
    ("journal commits on the event loop (JournalWriter -> SQLiteStore.append)", _has("JournalWriter._commit")),
    ("executor threads (the SQLite calls themselves plus thread wake-ups)",
     lambda fr: fr[0][0].startswith("Thread._bootstrap") and _has("concurrent/futures/thread.py")(fr)),
    ("  of which inside the SQLite store code", lambda fr: fr[0][0].startswith("Thread._bootstrap")
     and _has("unbroken/journal/sqlite.py")(fr)),
    ("handing work to threads from the loop (ThreadPoolExecutor.submit, call_soon_threadsafe wake-ups)",
     _has("ThreadPoolExecutor.submit", "_write_to_self", "_read_from_self")),
    ("writing to the client (StreamingResponse -> uvicorn/h11 send)", _has("StreamingResponse.stream_response")),
    ("Starlette's BaseHTTPMiddleware around every response (the body-size limit in app.py)",
     _has("starlette/middleware/base.py")),
    ("building events (ResponseEmitter, Generation._emit)", _has("ResponseEmitter.", "Generation._emit")),
    ("SSE framing and JSON encoding of events (protocol/sse.py)", _has("unbroken/protocol/sse.py")),
    ("the event loop polling with nothing else on the stack (EpollSelector.select)",
     lambda fr: fr[-1][0] == "EpollSelector.select"),
]


def component_of(file: str) -> str:
    for needle, name in COMPONENTS:
        if needle in file:
            return name
    if file.endswith(".py") and "/" not in file:
        return "stdlib (other)"
    return "other"


def summarize(stacks: list[tuple[list[tuple[str, str]], int]], top: int = 25) -> dict[str, Any]:
    total = sum(c for _, c in stacks) or 1
    by_component: Counter[str] = Counter()
    buckets: Counter[str] = Counter()
    self_t: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    for frames, count in stacks:
        leaf_func, leaf_file = frames[-1]
        by_component[component_of(leaf_file)] += count
        self_t[f"{leaf_func} ({leaf_file})"] += count
        for name in {f"{f} ({p})" for f, p in frames}:
            incl[name] += count
        for label, test in BUCKETS:
            if test(frames):
                buckets[label] += count
    pct = lambda c: round(100 * c / total, 1)  # noqa: E731
    return {
        "samples": total,
        "by_component": [[k, pct(v)] for k, v in by_component.most_common()],
        "buckets": [[label, pct(buckets[label])] for label, _ in BUCKETS],
        "self": [[k, pct(v)] for k, v in self_t.most_common(top)],
        "inclusive": [[k, pct(v)] for k, v in incl.most_common(top) if pct(v) < 99.5],
    }


def format_text(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        "unbroken hot path, journaled streams (SQLite): py-spy profile",
        f"workload: {meta['workload']}",
        f"sampler: py-spy {meta['py_spy']} at {RATE} Hz, all threads, on-CPU samples only (idle excluded), "
        f"--function (line numbers folded); {summary['samples']} samples; Python {meta['python']}",
        f"machine: {meta['machine']}",
        "",
        "slices of the hot path (share of samples whose stack contains the slice's frames; slices overlap):",
    ]
    lines += [f"  {share:5.1f}%  {name}" for name, share in summary["buckets"]]
    lines += ["", "share of on-CPU samples by component (the frame on the CPU):"]
    lines += [f"  {share:5.1f}%  {name}" for name, share in summary["by_component"]]
    lines += ["", "functions by samples of their own (self):"]
    lines += [f"  {share:5.1f}%  {name}" for name, share in summary["self"]]
    lines += ["", "functions by samples with their callees (inclusive; whole-thread roots left out):"]
    lines += [f"  {share:5.1f}%  {name}" for name, share in summary["inclusive"]]
    return "\n".join(lines) + "\n"


async def _workload(url: str, *, warm: bool = False) -> dict[str, Any]:
    target = Target("unbroken_sqlite", "profile", "responses", f"{url}/responses", None, {m: m for m in MODES})
    limits = httpx.Limits(max_connections=10, max_keepalive_connections=10)
    bad = 0
    async with httpx.AsyncClient(timeout=60, limits=limits, trust_env=False) as client:
        if warm:
            await asyncio.gather(*(one_stream(client, target, mode) for mode in ("unpaced", "paced") * 5))
            return {"failed_streams": 0}
        for _ in range(UNPACED_STREAMS // 2):
            pair = await asyncio.gather(one_stream(client, target, "unpaced"), one_stream(client, target, "unpaced"))
            bad += sum(not s.ok for s in pair)
        for _ in range(PACED_STREAMS // 10):
            batch = await asyncio.gather(*(one_stream(client, target, "paced") for _ in range(10)))
            bad += sum(not s.ok for s in batch)
    return {"failed_streams": bad}


def run(out: Path, machine: str = "", folded_copy: Path | None = None) -> dict[str, Any]:
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if py_spy is None:
        raise RuntimeError("py-spy is not installed (make bench installs it into .venv)")
    tmp = Path(tempfile.mkdtemp(prefix="unbroken-profile-"))
    servers: list[Server] = []
    try:
        upstream = Server("upstream", [sys.executable, "-m", "benchmarks.fake_upstream", "--port", "0"], cwd=ROOT)
        servers.append(upstream)
        upstream_url = upstream.wait_line("fake upstream on", 30).split()[-1]
        (tmp / "router.yaml").write_text(router_config(upstream_url))
        port = free_port()
        folded = tmp / "profile.folded"
        unbroken = str(Path(sys.executable).parent / "unbroken")
        router = Server("router", [unbroken, "serve", "--config", str(tmp / "router.yaml"), "--host", "127.0.0.1",
                                   "--port", str(port), "--store", f"sqlite:///{tmp / 'journal.db'}",
                                   "--log-level", "WARNING"], env=NO_PROXY_ENV, cwd=ROOT)
        servers.append(router)
        router.wait_line("unbroken ready on", 60)
        url = f"http://127.0.0.1:{port}/v1"
        asyncio.run(_workload(url, warm=True))  # lazy imports and first-use set-up: not the hot path
        # py-spy attaches to the running router (nothing in it changes) and writes its file when interrupted.
        spy = Server("py-spy", [py_spy, "record", "--pid", str(router.pid), "--format", "raw", "--function",
                                "--nonblocking", "--rate", str(RATE), "-o", str(folded)], cwd=tmp)
        servers.append(spy)
        spy.wait_line("py-spy> Sampling process", 30)
        t0 = time.perf_counter()
        result = asyncio.run(_workload(url))
        wall = time.perf_counter() - t0
        os.kill(spy.pid, signal.SIGINT)
        deadline = time.monotonic() + 30
        while spy.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if not folded.exists():
            raise RuntimeError(f"py-spy wrote no profile:\n{spy.log_tail()}")
        if folded_copy is not None:  # for flame graphs; absolute paths in it, so not for committing
            shutil.copy(folded, folded_copy)
        version = next((ln.split()[-1] for ln in os.popen(f"{py_spy} --version") if ln.strip()), "?")
        summary = summarize(parse_folded(folded.read_text()))
        meta = {
            "workload": f"{UNPACED_STREAMS} unpaced 200-token /v1/responses streams (2 at a time), then "
                        f"{PACED_STREAMS} paced 50-token streams (10 at a time, 50 tokens/s), SQLite journal, "
                        f"{wall:.1f} s, {result['failed_streams']} failed",
            "py_spy": version,
            "python": sys.version.split()[0],
            "machine": machine or f"{os.cpu_count()} CPUs",
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(format_text(summary, meta))
        return {**summary, **meta, "file": str(out.relative_to(ROOT)) if out.is_relative_to(ROOT) else out.name}
    finally:
        for s in reversed(servers):
            s.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description="profile the journaled hot path with py-spy")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "profile.txt")
    parser.add_argument("--folded", type=Path, help="also keep py-spy's folded stacks here (absolute paths inside)")
    args = parser.parse_args()
    result = run(args.out.resolve(), folded_copy=args.folded)
    print(args.out.read_text())
    print(f"by component: {result['by_component'][:5]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
