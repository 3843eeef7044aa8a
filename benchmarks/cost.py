"""What the router costs to run, from measured figures: `docs/bench/results.json` → `docs/bench/cost.md` and the
README's cost block (between `<!-- cost:start -->` and `<!-- cost:end -->`).

The traffic: one million responses of 1,000 output tokens (and 1,000 input tokens) streamed at 50 tokens/s, each
through API Gateway REST (streaming) → the gateway Lambda → DynamoDB. Per response it takes from results.json the
measured wall time of a 1,000-token response at 50 tokens/s through the DynamoDB-journaled router (Lambda bills the
invocation for as long as it streams), the router's CPU and resident memory, the DynamoDB write/read calls and
capacity units counted for that response, and the bytes streamed to the client. Prices are list prices, us-east-1,
first tier, with their source and the date they were checked (PRICES below).

Run: `python -m benchmarks.cost` (after `make bench`); `make bench` calls it.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from benchmarks.report import NA, OUT, README, replace_block

RESPONSES = 1_000_000
INPUT_TOKENS = 1_000
OUTPUT_TOKENS = 1_000
MEMORY_SIZES = (128, 256, 512, 1024)
VCPU_AT_MB = 1769  # "At 1,769 MB, a function has the equivalent of one vCPU" (Lambda docs, memory configuration)
RETENTION_HOURS = 24  # the template's RetentionHours default: the journal lives this long (DynamoDB TTL)
CHECKED = "2026-12-02"

PRICES: dict[str, Any] = {
    "lambda_gb_s": {"x86_64": 0.0000166667, "arm64": 0.0000133334},
    "lambda_requests_per_million": 0.20,
    "lambda_source": "AWS Lambda pricing page, us-east-1 (aws.amazon.com/lambda/pricing), first tier (up to 6 / 7.5 "
                     "billion GB-s a month); response streaming: the first 6 MB of each response are not charged",
    "apigw_rest_per_million": 3.50,
    "apigw_source": "Amazon API Gateway pricing page, us-east-1, REST APIs, first 333 million requests a month",
    "transfer_out_per_gb": 0.09,
    "transfer_source": "AWS data transfer out to the internet, us-east-1, first 10 TB a month (API Gateway bills "
                       "data out at these rates)",
    "ddb_wru_per_million": 0.625,
    "ddb_rru_per_million": 0.125,
    "ddb_storage_gb_month": 0.25,
    "ddb_source": "Amazon DynamoDB pricing page, on-demand, us-east-1, Standard table class",
    "models": [
        {"name": "GPT-5 mini", "tier": "cheap", "input": 0.25, "output": 2.00,
         "source": "OpenAI API pricing page (platform.openai.com/docs/pricing), standard tier"},
        {"name": "Claude Sonnet 4.5", "tier": "mid", "input": 3.00, "output": 15.00,
         "source": "Anthropic pricing page (docs.anthropic.com, Claude pricing), prompts up to 200K tokens"},
        {"name": "Claude Opus 4.1", "tier": "premium", "input": 15.00, "output": 75.00,
         "source": "Anthropic pricing page (docs.anthropic.com, Claude pricing)"},
    ],
    "checked": CHECKED,
    "how_checked": "from copies of these pages, as the benchmark machine has no internet access; check them before "
                   "relying on the figures",
}

# Checked on CHECKED with `pip download --only-binary=:all: --platform manylinux*_aarch64 --python-version 3.13` for
# every compiled distribution in the layer's dependency closure (layers/requirements.txt); the rest are pure Python.
ARM64_WHEELS = {
    "compiled": ["pydantic-core 2.46.5", "PyYAML 6.0.4", "cryptography 50.0.2", "cffi 2.1.1"],
    "all_have_cp313_aarch64_wheels": True,
    "pure_python": "fastapi, starlette, uvicorn (no [standard] extras), h11, httpx, httpcore, httpx-sse, anyio, "
                   "pydantic, mangum, aws-lambda-powertools and the rest of the closure",
}


def _batch_ms(r: dict[str, Any]) -> float:
    j = r.get("journal")
    if isinstance(j, dict) and j.get("batch_ms"):
        return float(j["batch_ms"])
    from unbroken.config import ServerSettings

    return float(ServerSettings().journal_batch_ms)


def _wru_per_commit(r: dict[str, Any], measured: dict[str, Any]) -> float | None:
    """WRU per journal commit of a paced stream (small batches): from journal_bench's paced DynamoDB row, else from
    this run's long streams."""
    j = r.get("journal")
    for row in (j.get("results", []) if isinstance(j, dict) else []):
        if row.get("backend") == "dynamodb_local" and row.get("mode", "").startswith("paced"):
            if row.get("wru_per_response") and row.get("writes_per_response"):
                return row["wru_per_response"] / row["writes_per_response"]
    if measured.get("wru") and measured.get("commits"):
        return measured["wru"] / measured["commits"]
    return None


def _measured(r: dict[str, Any]) -> dict[str, Any]:
    targets = r["long"]["targets"]
    key = next(k for k in ("unbroken_dynamodb", "unbroken_sqlite", "unbroken_none") if k in targets)
    t = targets[key]
    store = t.get("store_per_response") or {}
    direct = targets.get("direct", {})
    gw = r["gateways"].get(key, {})
    entry = next((e for e in r.get("lambda_entry", []) if e["store"] == "dynamodb"),
                 (r.get("lambda_entry") or [{}])[0])
    return {
        "target": key,
        "wall_s": t["total_ms_p50"] / 1000,
        "direct_wall_s": direct.get("total_ms_p50", 0) / 1000,
        "cpu_s": t.get("gateway_cpu_ms_per_stream", 0) / 1000,
        "bytes": t.get("bytes_per_stream", 0),
        "rss_mib": max(gw.get("rss_mib_after_100_requests") or 0, gw.get("rss_mib_at_end") or 0),
        "commits": store.get("store.commits"),
        "wru": store.get("store.wru"),
        "read_calls": store.get("read_calls"),
        "rru": store.get("rcu"),
        "bytes_stored": store.get("store.bytes_written"),
        "cold_cpu_s": entry.get("start_cpu_s"),
        "cold_wall_s": entry.get("start_to_first_answer_s"),
    }


def compute(r: dict[str, Any]) -> dict[str, Any]:
    m = _measured(r)
    p = PRICES
    n = RESPONSES
    # Against DynamoDB itself (a commit takes milliseconds, far less than a batch window) the writer commits once per
    # window while tokens flow, plus create / first content / final: journal_bench measures 104 writes for 10 s of
    # tokens at 100 ms windows. DynamoDB Local on a busy machine is slower than a window, so fewer, bigger commits
    # are counted here; the bill uses whichever is larger.
    stream_s = OUTPUT_TOKENS / r["long"]["tokens_per_s"]
    batch_ms = _batch_ms(r)
    per_commit = _wru_per_commit(r, m)
    m["batch_ms"] = batch_ms
    m["commits_fast_store"] = stream_s * 1000 / batch_ms + 4
    m["wru_per_commit"] = per_commit
    m["wru_fast_store"] = m["commits_fast_store"] * per_commit if per_commit else None
    m["wru_billed"] = max(m["wru"] or 0, m["wru_fast_store"] or 0)
    per_size = {}
    for mb in MEMORY_SIZES:
        gb_s = mb / 1024 * m["wall_s"] * n
        share = mb / VCPU_AT_MB
        per_size[mb] = {
            "gb_s": gb_s,
            "lambda_x86": gb_s * p["lambda_gb_s"]["x86_64"],
            "lambda_arm64": gb_s * p["lambda_gb_s"]["arm64"],
            "vcpu_share": share,
            "cpu_utilisation": (m["cpu_s"] / m["wall_s"]) / share if m["wall_s"] else None,
            "cold_start_cpu_bound_s": m["cold_cpu_s"] / share if m["cold_cpu_s"] else None,
            "rss_fraction": m["rss_mib"] / mb if m["rss_mib"] else None,
        }
    fixed = {
        "lambda_requests": n / 1e6 * p["lambda_requests_per_million"],
        "apigw": n / 1e6 * p["apigw_rest_per_million"],
        "transfer": m["bytes"] * n / 1e9 * p["transfer_out_per_gb"],
        "ddb_writes": m["wru_billed"] * n / 1e6 * p["ddb_wru_per_million"],
        "ddb_reads": (m["rru"] or 0) * n / 1e6 * p["ddb_rru_per_million"],
        # The responses spread over a 30-day month, each kept RETENTION_HOURS: the average stored volume.
        "ddb_storage": (m["bytes_stored"] or 0) * n / 1e9 * (RETENTION_HOURS / (30 * 24)) * p["ddb_storage_gb_month"],
    }
    llm = [{**model, "bill": n * (INPUT_TOKENS * model["input"] + OUTPUT_TOKENS * model["output"]) / 1e6}
           for model in p["models"]]
    # The smallest size the template allows (256 MB and up) where the measured process fits with room, one stream
    # keeps the CPU share mostly idle, and a CPU-bound cold start stays short.
    rule = {"rss_fraction_max": 0.5, "cpu_utilisation_max": 0.25, "cold_start_max_s": 5.0}
    recommended = None
    for mb in (256, 512, 1024):
        s = per_size[mb]
        if ((s["rss_fraction"] or 0) <= rule["rss_fraction_max"]
                and (s["cpu_utilisation"] or 0) <= rule["cpu_utilisation_max"]
                and (s["cold_start_cpu_bound_s"] or 0) <= rule["cold_start_max_s"]):
            recommended = mb
            break
    return {"measured": m, "per_size": per_size, "fixed": fixed, "llm": llm, "rule": rule,
            "recommended_mb": recommended or 1024, "recommended_arch": "arm64"}


def template_defaults() -> tuple[int, str]:
    """(MemorySize, Architecture) defaults of `template.yaml`, so the table names what a deploy gets today."""
    from tests.sam._template import raw_template

    parameters = raw_template()["Parameters"]
    return int(parameters["MemorySize"]["Default"]), str(parameters["Architecture"]["Default"])


def _usd(x: float) -> str:
    return f"${x:,.2f}" if x < 100 else f"${x:,.0f}"


def cost_md(r: dict[str, Any], c: dict[str, Any]) -> str:
    m, s, f, p = c["measured"], c["per_size"], c["fixed"], PRICES
    sizes = MEMORY_SIZES
    rec = c["recommended_mb"]
    shared = (r.get("machine_load") or {}).get("shared")
    default_mb, default_arch = template_defaults()
    head = " | ".join(f"{mb} MB" + (f" (template default, {default_arch})" if mb == default_mb else "")
                      for mb in sizes)
    lines = [
        f"One million responses of {OUTPUT_TOKENS:,} output tokens ({INPUT_TOKENS:,} input tokens) at 50 tokens/s, "
        "from the figures of this run (`benchmarks/cost.py`, from `docs/bench/results.json`):",
        "",
        f"- wall time per response through the router with the DynamoDB journal: **{m['wall_s']:.2f} s** (straight "
        f"to the upstream: {m['direct_wall_s']:.2f} s) — Lambda bills the invocation for as long as it streams, so "
        "this, not CPU, sets the duration charge;",
        f"- router CPU per response: {m['cpu_s'] * 1000:,.0f} ms; resident memory of the process: "
        f"{m['rss_mib']:.0f} MiB at most; CPU from process start to its first answer (Lambda entry point, DynamoDB "
        f"store): {m['cold_cpu_s'] or 0:.2f} s;",
        f"- DynamoDB per response: **{m['commits_fast_store']:.0f} write requests = {m['wru_fast_store'] or 0:.0f} "
        f"WRU** against DynamoDB itself (one commit per {m['batch_ms']:g} ms batch window while tokens flow, "
        f"{m['wru_per_commit'] or 0:.1f} WRU each: a transaction bills 2 WRU per KB per item, batch item + header); "
        f"this run counted {m['commits'] or 0:.0f} commits = {m['wru'] or 0:.0f} WRU"
        + (" because DynamoDB Local on this busy machine took longer than a window per commit, so batches grew; the "
           "bill uses the larger figure; " if (m["commits"] or 0) < m["commits_fast_store"] else "; ")
        + f"{m['read_calls'] or 0:.1f} reads = {m['rru'] or 0:.1f} RRU, "
        f"{(m['bytes_stored'] or 0) / 1024:.0f} KiB stored for {RETENTION_HOURS} h; {m['bytes'] / 1024:.0f} KiB of "
        "SSE to the client.",
    ]
    if shared:
        lines.append("- the machine was shared during the run: the CPU figures (hence utilisation and cold-start "
                     "estimates) are inflated; the wall time, the counts and the bytes are not.")
    lines += [
        "",
        f"| per month, {RESPONSES:,} responses | {head} |",
        "|---|" + "---|" * len(sizes),
        "| Lambda duration, arm64 | " + " | ".join(_usd(s[mb]["lambda_arm64"]) for mb in sizes) + " |",
        "| Lambda duration, x86_64 | " + " | ".join(_usd(s[mb]["lambda_x86"]) for mb in sizes) + " |",
        "| Lambda requests | " + " | ".join(_usd(f["lambda_requests"]) for _ in sizes) + " |",
        "| API Gateway REST requests | " + " | ".join(_usd(f["apigw"]) for _ in sizes) + " |",
        "| DynamoDB writes (on-demand) | " + " | ".join(_usd(f["ddb_writes"]) for _ in sizes) + " |",
        "| DynamoDB reads | " + " | ".join(_usd(f["ddb_reads"]) for _ in sizes) + " |",
        f"| DynamoDB storage ({RETENTION_HOURS} h retention) | " + " | ".join(_usd(f["ddb_storage"]) for _ in sizes)
        + " |",
        "| data transfer out (SSE bytes) | " + " | ".join(_usd(f["transfer"]) for _ in sizes) + " |",
    ]
    fixed_total = sum(f.values())
    lines += [
        "| **total, arm64** | " + " | ".join(f"**{_usd(s[mb]['lambda_arm64'] + fixed_total)}**" for mb in sizes) + " |",
        "| total, x86_64 | " + " | ".join(_usd(s[mb]["lambda_x86"] + fixed_total) for mb in sizes) + " |",
        "| vCPU share (memory / 1,769 MB) | " + " | ".join(f"{s[mb]['vcpu_share']:.2f}" for mb in sizes) + " |",
        "| share used by one stream (measured CPU / wall / share) | "
        + " | ".join(f"{s[mb]['cpu_utilisation']:.0%}" for mb in sizes) + " |",
        "| cold start if CPU-bound (start CPU / share) | "
        + " | ".join(f"{s[mb]['cold_start_cpu_bound_s']:.1f} s" if s[mb]["cold_start_cpu_bound_s"] else NA
                     for mb in sizes) + " |",
        "| process RSS / memory size | " + " | ".join(f"{s[mb]['rss_fraction']:.0%}" for mb in sizes) + " |",
        "",
    ]
    router_rec = s[rec]["lambda_arm64"] + fixed_total
    lines += [f"| model (list price per 1M tokens in / out) | LLM bill for the same traffic | router, arm64 "
              f"{rec} MB, as a share of it |", "|---|---|---|"]
    for model in c["llm"]:
        lines.append(f"| {model['name']} ({model['tier']}; ${model['input']:g} / ${model['output']:g}) | "
                     f"{_usd(model['bill'])} | {router_rec / model['bill']:.1%} |")
    rule = c["rule"]
    arm_saving = 1 - p["lambda_gb_s"]["arm64"] / p["lambda_gb_s"]["x86_64"]
    lines += [
        "",
        f"**Recommendation: {rec} MB, arm64.** The rule (in `benchmarks/cost.py`): the smallest size the template "
        f"allows (MinValue 256) where the process's resident memory is at most {rule['rss_fraction_max']:.0%} of "
        f"the memory size, one stream uses at most {rule['cpu_utilisation_max']:.0%} of the CPU share (so the "
        f"first-token and final-commit bursts are not queued), and a CPU-bound cold start stays under "
        f"{rule['cold_start_max_s']:g} s. 128 MB is cheapest on paper but gives "
        f"{s[128]['vcpu_share']:.2f} of a vCPU. arm64 bills {arm_saving:.0%} "
        "less per GB-second and every compiled dependency of the layer has a CPython 3.13 manylinux aarch64 wheel "
        f"({', '.join(ARM64_WHEELS['compiled'])}; checked {CHECKED}); everything else in layers/requirements.txt "
        "is pure Python.",
        "",
        f"Where the money goes: the DynamoDB journal ({_usd(f['ddb_writes'])}) costs more than the Lambda "
        f"itself at {rec} MB ({_usd(s[rec]['lambda_arm64'])}); it is one transaction per "
        f"{m['batch_ms']:g} ms batch window, so raising `journal_batch_ms` cuts it "
        "nearly in proportion (at the price of later frames for the client).",
        "",
        f"Prices, checked {p['checked']} ({p['how_checked']}): Lambda ${p['lambda_gb_s']['arm64']:.10f} (arm64) / "
        f"${p['lambda_gb_s']['x86_64']:.10f} (x86_64) per GB-second and ${p['lambda_requests_per_million']:.2f} per "
        f"million requests — {p['lambda_source']}; API Gateway ${p['apigw_rest_per_million']:.2f} per million — "
        f"{p['apigw_source']}; DynamoDB ${p['ddb_wru_per_million']} per million WRU, ${p['ddb_rru_per_million']} "
        f"per million RRU, ${p['ddb_storage_gb_month']} per GB-month — {p['ddb_source']}; data out "
        f"${p['transfer_out_per_gb']} per GB — {p['transfer_source']}; "
        + "; ".join(f"{mdl['name']} ${mdl['input']:g} / ${mdl['output']:g} per million input / output tokens — "
                    f"{mdl['source']}" for mdl in p["models"])
        + ". Not included: CloudWatch logs, the worker Lambda (background responses and takeovers only), free tiers.",
    ]
    return "\n".join(lines) + "\n"


def write(r: dict[str, Any]) -> dict[str, Any]:
    c = compute(r)
    text = cost_md(r, c)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "cost.md").write_text(text)
    README.write_text(replace_block(README.read_text(), "cost", text))
    return c


def main() -> int:
    r = json.loads((OUT / "results.json").read_text())
    c = write(r)
    print((OUT / "cost.md").read_text())
    print(f"recommended: {c['recommended_mb']} MB {c['recommended_arch']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
