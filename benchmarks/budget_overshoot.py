"""How far a budget is overshot by concurrent requests: two `unbroken serve` processes on one SQLite file, one key
with a small daily budget, many clients sending to both at once until well after the budget is used up.

    .venv/bin/python -m benchmarks.budget_overshoot [--workers 16] [--budget-requests 20] [--json]

Each process counts its own spend at once, and sees the other's after at most the counter flush interval plus the
read cache's age (`journal/counters.py`: FLUSH_SECONDS + READ_CACHE_SECONDS). So once the spend the clients were
told of reaches the budget (T*), every request sent later than T* + that lag is refused; what is admitted before is
the overshoot (README "How far a budget can be overshot"). `tests/integration/test_keys_across_processes.py` runs a
small one and asserts that bound.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import yaml

from tests.support.server import RouterProcess, admin_config, sim_model
from unbroken.journal.counters import FLUSH_SECONDS, READ_CACHE_SECONDS

ADMIN_KEY = "sk-admin-bench"
# Scheduling slack on top of the lag: the flusher's own write, a loop turn, the client's clock vs the server's.
LAG_SLACK_SECONDS = 1.0
LAG_SECONDS = FLUSH_SECONDS + READ_CACHE_SECONDS

CONFIG = yaml.safe_dump(admin_config(ADMIN_KEY, sim_model("demo", deployments=1, ttft_ms=20, tps=400),
                                     api_keys=[]))


@dataclass(frozen=True, slots=True)
class Outcome:
    worker: int
    process: int
    sent_at: float  # time.monotonic() of this client
    done_at: float
    status: int
    code: str | None
    cost_usd: float


@dataclass(slots=True)
class Report:
    workers: int
    budget_usd: float
    cost_per_request_usd: float
    spent_usd: float
    overshoot_usd: float
    overshoot_requests: int
    reached_at_s: float  # T*, from the first request
    last_admitted_after_s: float  # the last admitted request was sent this long after T*
    lag_bound_s: float
    requests: int
    refused: int
    late_admissions: int  # admitted although sent after T* + lag bound: 0 if the bound holds
    reached_monotonic: float = 0.0  # T* on the clients' monotonic clock (what `Outcome.sent_at` is on)
    outcomes: list[Outcome] = field(default_factory=list, repr=False)


def _worker(index: int, url: str, process: int, secret: str, stop: threading.Event,
            out: list[Outcome], lock: threading.Lock) -> None:
    body = {"model": "demo", "input": "How far can a budget go?", "store": False}
    with httpx.Client(timeout=60) as client:
        while not stop.is_set():
            sent = time.monotonic()
            r = client.post(f"{url}/v1/responses", json=body, headers={"authorization": f"Bearer {secret}"})
            done = time.monotonic()
            code = r.json().get("error", {}).get("code") if r.status_code != 200 else None
            cost = float(r.headers.get("x-unbroken-cost-usd", "0")) if r.status_code == 200 else 0.0
            with lock:
                out.append(Outcome(index, process, sent, done, r.status_code, code, cost))
            if r.status_code not in (200, 429):
                raise RuntimeError(f"unexpected answer {r.status_code}: {r.text}")


def _reached(outcomes: list[Outcome], budget: float) -> float | None:
    """T*: when the spend the clients were told of (by the end of each response) reached the budget."""
    spent = 0.0
    for o in sorted((o for o in outcomes if o.status == 200), key=lambda o: o.done_at):
        spent += o.cost_usd
        if spent >= budget:
            return o.done_at
    return None


def measure(*, workers: int = 16, budget_requests: float = 20.0, after_lag_s: float = 3.0,
            timeout_s: float = 120.0, workdir: Path | None = None) -> Report:
    """Run the experiment: the budget is `budget_requests` times one request's cost; clients go on until
    `after_lag_s` past T* + the lag bound (so that the bound is tested by requests sent after it)."""
    tmp = Path(workdir or tempfile.mkdtemp(prefix="overshoot-"))
    config = tmp / "router.yaml"
    config.write_text(CONFIG, encoding="utf-8")
    store_url = f"sqlite:///{tmp / 'shared.db'}"
    with contextlib.ExitStack() as stack:  # leaving it stops both gracefully (SIGTERM flushes the counters)
        servers = [stack.enter_context(RouterProcess(config, store_url)) for _ in range(2)]
        urls = [s.base_url.removesuffix("/v1") for s in servers]
        admin = {"authorization": f"Bearer {ADMIN_KEY}"}
        with httpx.Client(timeout=60) as client:
            probe = client.post(f"{urls[0]}/admin/v1/keys", json={"tenant": "probe"}, headers=admin).json()
            one = client.post(f"{urls[0]}/v1/responses", headers={"authorization": f"Bearer {probe['secret']}"},
                              json={"model": "demo", "input": "How far can a budget go?", "store": False})
            cost = float(one.headers["x-unbroken-cost-usd"])
            budget = cost * budget_requests
            key = client.post(f"{urls[0]}/admin/v1/keys", headers=admin,
                              json={"tenant": "bench", "budgets": {"daily_usd": budget}}).json()
        outcomes: list[Outcome] = []
        lock = threading.Lock()
        stop = threading.Event()
        threads = [threading.Thread(target=_worker, args=(i, urls[i % 2], i % 2, key["secret"], stop,
                                                          outcomes, lock), daemon=True) for i in range(workers)]
        started = time.monotonic()
        for t in threads:
            t.start()
        deadline = started + timeout_s
        while time.monotonic() < deadline:
            with lock:
                reached = _reached(list(outcomes), budget)
            if reached is not None and time.monotonic() > reached + LAG_SECONDS + LAG_SLACK_SECONDS + after_lag_s:
                break
            time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join(timeout=60)
    reached = _reached(outcomes, budget)
    if reached is None:
        raise RuntimeError("the budget was never reached")
    admitted = [o for o in outcomes if o.status == 200]
    spent = sum(o.cost_usd for o in admitted)
    bound = LAG_SECONDS + LAG_SLACK_SECONDS
    return Report(
        workers=workers, budget_usd=round(budget, 8), cost_per_request_usd=cost, spent_usd=round(spent, 8),
        overshoot_usd=round(spent - budget, 8), overshoot_requests=sum(1 for o in admitted if o.done_at > reached),
        reached_at_s=round(reached - started, 3),
        last_admitted_after_s=round(max(o.sent_at for o in admitted) - reached, 3), lag_bound_s=bound,
        requests=len(outcomes), refused=sum(1 for o in outcomes if o.code == "budget_exceeded"),
        late_admissions=sum(1 for o in admitted if o.sent_at > reached + bound), reached_monotonic=reached,
        outcomes=outcomes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--budget-requests", type=float, default=20.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    report = measure(workers=args.workers, budget_requests=args.budget_requests)
    summary = {k: v for k, v in asdict(report).items() if k not in ("outcomes", "reached_monotonic")}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for name, value in summary.items():
            print(f"{name:24} {value}")
    return 0 if report.late_admissions == 0 else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
