"""Routing benchmark (`make bench-routing`): one replayed traffic mix, per routing policy, against always-primary and
round-robin, over `simulated` deployments that differ in price, cache price, latency and failure rate; one of them
slows down half-way through.

Each policy gets a fresh router (`unbroken serve`, memory store) and fresh upstreams (one simulated upstream per
deployment, so each has its own prompt cache and can be degraded alone), and the same requests in the same order:
multi-turn conversations over a long per-conversation system prompt (chained with `previous_response_id`), some with
a function tool (the next turn sends its output), short and long answers. Reported per policy: cost per 1M tokens
(from each response's `router.cost_usd` and `usage`), p50 / p95 time to first token as the client saw it, success
rate, how many requests after the slow-down passed until the last one that went first to the degraded deployment,
what cache affinity saved (`balanced` with and without it; `cheapest` sends a conversation to one deployment
anyway) and what hedging cost (`fastest` with hedging on: the losing attempts' cost as a share of the total).

Run: `python -m benchmarks.routing [--conversations 60] [--concurrency 6] [--repeats 3] [--out docs/bench]` writes
`routing.json`, `routing.md`, `routing.png` (with matplotlib) and the README block between
`<!-- bench-routing:start -->` and `<!-- bench-routing:end -->`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.procs import Server
from unbroken.simulator import SimulatedUpstream, SimulatedUpstreamThread

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
KEY = "sk-bench-routing"
MODEL = "mix"


@dataclass(frozen=True)
class Spec:
    """A simulated deployment: list prices per 1M tokens, pacing and failure share."""

    name: str
    price_in: float
    price_cached: float
    price_out: float
    ttft_ms: float
    tps: float
    fail_rate: float


# Configured order = always-primary's choice. `premium` is fast and dear; `budget` cheap and slow; `flaky` cheap-ish
# and fast but fails often. `premium` slows down fifteenfold half-way through.
DEPLOYMENTS = (
    Spec("premium", 3.00, 0.30, 15.00, 40, 900, 0.01),
    Spec("standard", 1.00, 0.10, 4.00, 90, 600, 0.02),
    Spec("budget", 0.15, 0.015, 0.60, 160, 400, 0.02),
    Spec("flaky", 0.50, 0.05, 2.00, 60, 800, 0.25),
)
DEGRADED = "premium"
DEGRADED_TTFT_MS = 600

# (label, policy header, router config variant)
RUNS = (
    ("always-primary", "ordered", "plain"),
    ("round-robin", "weighted", "plain"),
    ("cheapest", "cheapest", "plain"),
    ("fastest", "fastest", "plain"),
    ("fastest + hedging", "fastest", "hedge"),
    ("balanced", "balanced", "plain"),
    ("balanced, no affinity", "balanced", "no_affinity"),
)
# The replay compresses minutes of traffic into seconds, so the live stats' clock is compressed too: windows of 1 s
# and a half-life of 3 s (defaults 10 s and 30 s) let recent traffic weigh as it would over a real half-minute.
HEALTH = {"window_seconds": 1, "half_life_seconds": 3, "refresh_seconds": 0.25}


def router_config(variant: str, upstreams: dict[str, str]) -> str:
    """The router's YAML for a run variant: `plain`, `no_affinity` (cache affinity off) or `hedge` (hedging on)."""
    lines = [
        "api_keys:",
        f"  - {{key: {KEY}, tenant: bench}}",
        "server:",
        "  health: {" + ", ".join(f"{k}: {v}" for k, v in HEALTH.items()) + "}",
        "  hedge:",
        f"    enabled: {'true' if variant == 'hedge' else 'false'}",
        "models:",
        f"  - name: {MODEL}",
        "    routing:",
        "      policy: ordered",
        f"      cache_affinity: {'false' if variant == 'no_affinity' else 'true'}",
        "      weights: {" + ", ".join(f"{d.name}: 1" for d in DEPLOYMENTS) + "}",
        "    deployments:",
    ]
    for d in DEPLOYMENTS:
        lines += [
            f"      - name: {d.name}",
            "        provider: simulated",
            f"        model: sim-{d.name}",
            f"        base_url: {upstreams[d.name]}",
            f"        price: {{input: {d.price_in}, cached_input: {d.price_cached}, output: {d.price_out}}}",
            f"        options: {{ttft_ms: {d.ttft_ms}, tps: {d.tps}, fail_rate: {d.fail_rate}, prompt_cache: true, "
            "max_retries: 0}",
        ]
    return "\n".join(lines) + "\n"


# -- the traffic mix ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Turn:
    text: str
    length: int  # answer tokens (`sim_length`)
    tool: bool  # offer a function tool (the simulator calls it; the next turn answers it)


@dataclass(frozen=True)
class Conversation:
    system: str
    turns: tuple[Turn, ...]


def traffic(conversations: int, seed: int = 7) -> list[Conversation]:
    rng = random.Random(seed)
    words = ("policy", "invoice", "customer", "shipment", "refund", "account", "warranty", "contract", "region")
    out = []
    for c in range(conversations):
        system = f"[conversation {c}] " + " ".join(rng.choice(words) for _ in range(rng.randint(300, 700)))
        turns = tuple(
            Turn(text=f"question {t} of {c}: " + " ".join(rng.choice(words) for _ in range(rng.randint(5, 40))),
                 length=rng.choice((12, 24, 40, 160, 320)), tool=rng.random() < 0.2)
            for t in range(rng.choice((1, 2, 3, 4, 4)))
        )
        out.append(Conversation(system, turns))
    return out


TOOL = {"type": "function", "name": "lookup_order", "description": "Look an order up by id.",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}


@dataclass
class Outcome:
    index: int  # position in the run's request order
    ok: bool
    ttft_s: float | None
    first_deployment: str | None
    served_by: str | None
    cost_usd: float
    tokens: int
    hedge_cost_usd: float
    cached_tokens: int


@dataclass
class Run:
    label: str
    outcomes: list[Outcome] = field(default_factory=list)
    degrade_at: int = 0


async def one_request(client: httpx.AsyncClient, policy: str, body: dict[str, Any], index: int
                      ) -> tuple[Outcome, dict[str, Any] | None]:
    started = time.perf_counter()
    ttft: float | None = None
    final: dict[str, Any] | None = None
    headers = {"Authorization": f"Bearer {KEY}", "X-Unbroken-Policy": policy}
    try:
        async with client.stream("POST", "/v1/responses", json=body, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    kind = event.get("type", "")
                    if ttft is None and kind in ("response.output_text.delta", "response.function_call_arguments.delta",
                                                 "response.function_call_arguments.done"):
                        ttft = time.perf_counter() - started
                    if kind in ("response.completed", "response.incomplete", "response.failed"):
                        final = event["response"]
    except httpx.HTTPError:
        final = None
    router = (final or {}).get("router") or {}
    attempts = router.get("attempts") or []
    usage = (final or {}).get("usage") or {}
    return Outcome(
        index=index,
        ok=bool(final) and final.get("status") == "completed",
        ttft_s=ttft,
        first_deployment=attempts[0]["deployment"] if attempts else None,
        served_by=router.get("served_by"),
        cost_usd=float(router.get("cost_usd") or 0.0),
        tokens=int(usage.get("input_tokens") or 0) + int(usage.get("output_tokens") or 0),
        hedge_cost_usd=sum(float(a.get("cost_usd") or 0) for a in attempts if a.get("outcome") == "hedge_lost"),
        cached_tokens=int((usage.get("input_tokens_details") or {}).get("cached_tokens") or 0),
    ), final


async def replay(base_url: str, policy: str, mix: list[Conversation], concurrency: int,
                 degrade: SimulatedUpstream) -> Run:
    """Conversations run `concurrency` at a time, turns in order; the degraded upstream slows down once half of the
    requests have started."""
    total = sum(len(c.turns) for c in mix)
    run = Run(label=policy, degrade_at=total // 2)
    counter = 0
    queue: asyncio.Queue[Conversation] = asyncio.Queue()
    for conv in mix:
        queue.put_nowait(conv)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal counter
        while not queue.empty():
            conv = queue.get_nowait()
            previous: str | None = None
            pending_call: dict[str, Any] | None = None
            for turn in conv.turns:
                index = counter
                counter += 1
                if index == run.degrade_at:
                    degrade.overrides["sim_ttft_ms"] = str(DEGRADED_TTFT_MS)
                items: list[dict[str, Any]] = []
                if pending_call is not None:
                    items.append({"type": "function_call_output", "call_id": pending_call["call_id"],
                                  "output": json.dumps({"status": "shipped"})})
                items.append({"role": "user", "content": turn.text})
                body: dict[str, Any] = {"model": MODEL, "input": items, "stream": True,
                                        "metadata": {"sim_length": str(turn.length)}}
                if previous is None:
                    body["instructions"] = conv.system
                else:
                    body["previous_response_id"] = previous
                if turn.tool:
                    body["tools"] = [TOOL]
                outcome, final = await one_request(client, policy, body, index)
                run.outcomes.append(outcome)
                if final is None or not outcome.ok:
                    break  # the conversation cannot go on from a failed turn
                previous = final["id"]
                pending_call = next((o for o in final.get("output", []) if o.get("type") == "function_call"), None)

    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(60.0), limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    run.outcomes.sort(key=lambda o: o.index)
    return run


# -- measuring ---------------------------------------------------------------------------------------------------

def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(run: Run) -> dict[str, Any]:
    outs = run.outcomes
    ok = [o for o in outs if o.ok]
    ttfts = [o.ttft_s * 1000 for o in ok if o.ttft_s is not None]
    cost = sum(o.cost_usd for o in outs)
    tokens = sum(o.tokens for o in outs)
    after = [o for o in outs if o.index >= run.degrade_at]
    # Requests after the slow-down until the last one that still went first to the degraded deployment: how long
    # the policy took to move off it for good.
    firsts = [i for i, o in enumerate(after) if o.first_deployment == DEGRADED]
    moved_off_after = firsts[-1] + 1 if firsts else 0
    share = {d.name: sum(1 for o in ok if o.served_by == d.name) / max(1, len(ok)) for d in DEPLOYMENTS}
    return {
        "requests": len(outs),
        "success_rate": round(len(ok) / max(1, len(outs)), 4),
        "cost_per_1m_tokens_usd": round(cost / tokens * 1e6, 4) if tokens else None,
        "cost_usd": round(cost, 6),
        "tokens": tokens,
        "ttft_ms_p50": None if not ttfts else round(statistics.median(ttfts), 1),
        "ttft_ms_p95": None if not ttfts else round(_quantile(ttfts, 0.95) or 0, 1),
        "moved_off_degraded_after": moved_off_after,
        "degraded_share_after_slowdown": round(
            sum(1 for o in after if o.first_deployment == DEGRADED) / max(1, len(after)), 3),
        "hedge_cost_share": round(sum(o.hedge_cost_usd for o in outs) / cost, 4) if cost else 0.0,
        "cached_token_share": round(sum(o.cached_tokens for o in outs) / tokens, 4) if tokens else 0.0,
        "served_share": {k: round(v, 3) for k, v in share.items()},
    }


def _median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over repeated runs (the served shares too); `runs` keeps every repeat's figures."""
    out: dict[str, Any] = {}
    for key, value in runs[0].items():
        if isinstance(value, dict):
            out[key] = {k: round(statistics.median(r[key][k] for r in runs), 3) for k in value}
        elif isinstance(value, int | float) and value is not None:
            values = [r[key] for r in runs if r[key] is not None]
            out[key] = round(statistics.median(values), 4) if values else None
        else:
            out[key] = value
    out["repeats"] = [{k: r[k] for k in ("cost_per_1m_tokens_usd", "ttft_ms_p50", "ttft_ms_p95",
                                         "moved_off_degraded_after", "cost_usd")} for r in runs]
    return out


def run_once(label: str, policy: str, variant: str, mix: list[Conversation], concurrency: int,
             tmp: Path) -> dict[str, Any]:
    threads = {d.name: SimulatedUpstreamThread(SimulatedUpstream()) for d in DEPLOYMENTS}
    urls = {name: t.upstream.base_url for name, t in threads.items()}
    config = tmp / f"{label.replace(' ', '_').replace(',', '').replace('+', 'and')}.yaml"
    config.write_text(router_config(variant, urls))
    server = Server(f"routing-{policy}", [sys.executable, "-m", "unbroken.cli", "serve", "--config", str(config),
                                          "--port", "0", "--store", "memory://", "--log-level", "WARNING"], cwd=ROOT)
    try:
        ready = server.wait_line("unbroken ready on", 60)
        base = ready.split()[3].removesuffix("/v1")
        return summarize(asyncio.run(replay(base, policy, mix, concurrency, threads[DEGRADED].upstream)))
    finally:
        server.stop()
        for t in threads.values():
            t.stop()


def run_all(conversations: int, concurrency: int, repeats: int) -> dict[str, Any]:
    mix = traffic(conversations)
    results: dict[str, Any] = {"conversations": conversations, "concurrency": concurrency, "repeats": repeats,
                               "requests": sum(len(c.turns) for c in mix),
                               "deployments": [d.__dict__ for d in DEPLOYMENTS],
                               "degraded": DEGRADED, "degraded_ttft_ms": DEGRADED_TTFT_MS, "health": HEALTH,
                               "runs": {}}
    each: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in RUNS}
    with tempfile.TemporaryDirectory(prefix="bench-routing-") as tmp:
        for _ in range(repeats):  # interleaved, so that a busy spell of the machine does not hit one policy only
            for label, policy, variant in RUNS:
                each[label].append(run_once(label, policy, variant, mix, concurrency, Path(tmp)))
                print(f"{label:24s} {json.dumps(each[label][-1])}", file=sys.stderr, flush=True)
    for label, runs in each.items():
        results["runs"][label] = _median_of(runs)
    base = [r["cost_usd"] for r in each["balanced, no affinity"]]
    with_affinity = [r["cost_usd"] for r in each["balanced"]]
    results["cache_affinity_saving_share"] = round(1 - statistics.median(with_affinity) / statistics.median(base),
                                                   4) if base else None
    return results


# -- reporting ---------------------------------------------------------------------------------------------------

def markdown(results: dict[str, Any]) -> str:
    def cell(value: Any, fmt: str = "{:,.2f}") -> str:
        return "\N{EN DASH}" if value is None else fmt.format(value)

    after = results["requests"] - results["requests"] // 2

    def moved(r: dict[str, Any]) -> str:
        n = r["moved_off_degraded_after"]
        share = r["degraded_share_after_slowdown"] * 100
        if n == 0:
            return "at once (none went there first)"
        return f"last sent there first at request {n:.0f} of {after} ({share:.0f}% of them)"

    rows = [
        "| run | cost / 1M tokens | TTFT p50 | TTFT p95 | success | after the slow-down | hedge cost |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in results["runs"].items():
        rows.append(
            f"| {label} | ${cell(r['cost_per_1m_tokens_usd'])} | {cell(r['ttft_ms_p50'], '{:,.0f}')} ms | "
            f"{cell(r['ttft_ms_p95'], '{:,.0f}')} ms | {r['success_rate'] * 100:.1f}% | "
            f"{moved(r)} | "
            f"{r['hedge_cost_share'] * 100:.1f}% |")
    saving = results.get("cache_affinity_saving_share")
    rows.append("")
    pct = cell(None if saving is None else saving * 100, "{:.1f}")
    rows.append(f"Medians of {results['repeats']} runs of {results['requests']} requests "
                f"({results['conversations']} conversations, {results['concurrency']} at a time); "
                f"`{results['degraded']}` slows to {results['degraded_ttft_ms']} ms TTFT half-way. "
                f"Cache affinity saved {pct}% of `balanced`'s cost. Stats clock compressed: "
                f"windows of {HEALTH['window_seconds']} s, half-life {HEALTH['half_life_seconds']} s.")
    return "\n".join(rows) + "\n"


def plot(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels = list(results["runs"])
    runs = [results["runs"][k] for k in labels]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.barh(labels, [r["cost_per_1m_tokens_usd"] or 0 for r in runs], color="#4a7")
    left.set_xlabel("USD per 1M tokens")
    left.invert_yaxis()
    right.barh(labels, [r["ttft_ms_p95"] or 0 for r in runs], color="#c84", label="p95")
    right.barh(labels, [r["ttft_ms_p50"] or 0 for r in runs], color="#48c", label="p50")
    right.set_xlabel("time to first token, ms")
    right.invert_yaxis()
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_readme_block(table: str) -> None:
    text = README.read_text()
    start, end = "<!-- bench-routing:start -->", "<!-- bench-routing:end -->"
    if start not in text or end not in text:
        return
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    README.write_text(f"{head}{start}\n{table}{end}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=60)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3, help="runs per policy; the figures are their medians")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench")
    args = parser.parse_args(argv)
    results = run_all(args.conversations, args.concurrency, args.repeats)
    results["machine"] = f"{os.cpu_count()} cores"
    results["command"] = "make bench-routing"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "routing.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (args.out / "routing.md").write_text(table)
    plot(results, args.out / "routing.png")
    write_readme_block(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
