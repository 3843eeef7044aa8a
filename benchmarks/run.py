"""`make bench`: what users compare gateways on, measured against a baseline in the same run.

- added time to first token: client → router → simulated upstream, versus client → simulated upstream directly;
- router CPU per streamed token, versus the simulated upstream's own CPU per token (a minimal SSE server);
- process start to first answer, versus the interpreter's bare start;
- resident memory of the router after 100 requests;
- the journal's figures (store writes, WRU, bytes per token, added time per event) from benchmarks.journal_bench.

Every figure comes from separate processes on 127.0.0.1 (router and upstream are subprocesses, CPU is read from
/proc). Results are printed and written to bench-results/latest.json.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-bench"
TOKENS = 10000
TTFT_SAMPLES = 30


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _spawn(args: list[str], ready_prefix: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, **(env or {})}, cwd=ROOT)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith(ready_prefix):
        proc.kill()
        raise RuntimeError(f"{args[:3]} did not start: {line!r}")
    return proc, line


def _config(upstream_url: str, journal: bool) -> str:
    return f"""
api_keys: [{{key: {KEY}, tenant: bench}}]
server: {{heartbeat_seconds: 15}}
models:
  - name: bench
    deployments:
      - name: sim
        provider: simulated   # the simulated adapter forwards sim_* controls to the external upstream
        model: sim
        base_url: {upstream_url}
"""


def _ttft(client: httpx.Client, url: str, body: dict[str, Any], headers: dict[str, str], marker: bytes) -> float:
    start = time.perf_counter()
    with client.stream("POST", url, json=body, headers=headers) as response:
        for chunk in response.iter_raw():
            if marker in chunk:
                return time.perf_counter() - start
    raise RuntimeError("no first token")


def _drain(client: httpx.Client, url: str, body: dict[str, Any], headers: dict[str, str]) -> int:
    total = 0
    with client.stream("POST", url, json=body, headers=headers) as response:
        for chunk in response.iter_raw():
            total += len(chunk)
    return total


def measure(report: dict[str, Any]) -> None:
    upstream, line = _spawn(["-m", "unbroken.simulator", "--port", "0"], "simulated upstream on")
    upstream_url = line.split()[-1]
    tmp = Path(tempfile.mkdtemp(prefix="unbroken-bench-"))
    config = tmp / "bench.yaml"
    config.write_text(_config(upstream_url, journal=False))
    t0 = time.perf_counter()
    router, ready = _spawn(["-m", "unbroken.cli", "serve", "--config", str(config), "--port", "0", "--store", "none",
                            "--log-level", "WARNING"], "unbroken ready on")
    router_url = ready.split()[3]
    try:
        with httpx.Client(timeout=120) as client:
            hdr = {"authorization": f"Bearer {KEY}"}
            first = client.post(f"{router_url}/responses", json={"model": "bench", "input": "hi", "metadata": {
                "sim_length": "1"}}, headers=hdr)
            start_to_answer = time.perf_counter() - t0
            assert first.status_code == 200, first.text
            bare = time.perf_counter()
            subprocess.run([sys.executable, "-c", "pass"], check=True)
            interpreter_start = time.perf_counter() - bare

            short = {"metadata": {"sim_length": "4"}, "stream": True}
            direct_body = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], **short}
            routed_body = {"model": "bench", "input": "hi", **short}
            for _ in range(5):  # warm both paths (connection pools, imports)
                _ttft(client, f"{upstream_url}/chat/completions", direct_body, {}, b'"content"')
                _ttft(client, f"{router_url}/responses", routed_body, hdr, b"output_text.delta")
            direct, routed = [], []
            for _ in range(TTFT_SAMPLES):  # interleaved so both see the same machine state
                direct.append(_ttft(client, f"{upstream_url}/chat/completions", direct_body, {}, b'"content":"'))
                routed.append(_ttft(client, f"{router_url}/responses", routed_body, hdr, b"output_text.delta"))

            long = {"metadata": {"sim_length": str(TOKENS)}, "stream": True}
            cpu_router_0, cpu_up_0 = _cpu_seconds(router.pid), _cpu_seconds(upstream.pid)
            _drain(client, f"{router_url}/responses", {"model": "bench", "input": "long", **long}, hdr)
            cpu_router = _cpu_seconds(router.pid) - cpu_router_0
            cpu_up = _cpu_seconds(upstream.pid) - cpu_up_0

            for i in range(100):
                client.post(f"{router_url}/responses", json={"model": "bench", "input": f"n{i}", "stream": i % 2 == 0,
                                                             "metadata": {"sim_length": "50"}}, headers=hdr)
            rss = _rss_mib(router.pid)
    finally:
        router.terminate()
        upstream.terminate()
        router.wait(10)
        upstream.wait(10)
    report["router_journal_sqlite"] = _journal_on(upstream_url, config, tmp)
    report["router"] = {
        "added_ttft_ms_median": round((statistics.median(routed) - statistics.median(direct)) * 1000, 2),
        "ttft_ms_direct_median": round(statistics.median(direct) * 1000, 2),
        "ttft_ms_routed_median": round(statistics.median(routed) * 1000, 2),
        "cpu_ms_per_token_router": round(cpu_router / TOKENS * 1000, 4),
        "cpu_ms_per_token_upstream_baseline": round(cpu_up / TOKENS * 1000, 4),
        "cpu_ratio_router_to_upstream": round(cpu_router / cpu_up, 2) if cpu_up else None,
        "start_to_first_answer_s": round(start_to_answer, 3),
        "interpreter_start_s": round(interpreter_start, 3),
        "rss_mib_after_100_requests": round(rss, 1),
        "tokens_streamed": TOKENS,
    }


def _journal_on(upstream_url: str, config: Path, tmp: Path) -> dict[str, Any]:
    """The same long stream and first-token samples through a router that journals to SQLite (its default)."""
    upstream, line = _spawn(["-m", "unbroken.simulator", "--port", "0"], "simulated upstream on")
    config.write_text(_config(line.split()[-1], journal=True))
    router, ready = _spawn(["-m", "unbroken.cli", "serve", "--config", str(config), "--port", "0", "--store",
                            f"sqlite:///{tmp / 'journal.db'}", "--log-level", "WARNING"], "unbroken ready on")
    url = ready.split()[3]
    try:
        with httpx.Client(timeout=120) as client:
            hdr = {"authorization": f"Bearer {KEY}"}
            body = {"model": "bench", "input": "hi", "metadata": {"sim_length": "4"}, "stream": True}
            for _ in range(5):
                _ttft(client, f"{url}/responses", body, hdr, b"output_text.delta")
            ttft = [_ttft(client, f"{url}/responses", body, hdr, b"output_text.delta") for _ in range(TTFT_SAMPLES)]
            cpu0 = _cpu_seconds(router.pid)
            _drain(client, f"{url}/responses", {"model": "bench", "input": "long", "stream": True,
                                                "metadata": {"sim_length": str(TOKENS)}}, hdr)
            cpu = _cpu_seconds(router.pid) - cpu0
    finally:
        router.terminate()
        upstream.terminate()
        router.wait(10)
        upstream.wait(10)
    return {"ttft_ms_routed_median": round(statistics.median(ttft) * 1000, 2),
            "cpu_ms_per_token_router": round(cpu / TOKENS * 1000, 4)}


def main() -> int:
    report: dict[str, Any] = {"python": sys.version.split()[0], "cpus": os.cpu_count()}
    measure(report)
    try:
        from benchmarks import journal_bench
    except ImportError:
        report["journal"] = "not available"
    else:
        journal_bench.run(report)
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
