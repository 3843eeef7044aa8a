"""`docs/bench/results.json` → `docs/bench/results.md` (tables), PNG plots next to it, and the README's benchmark
block (between `<!-- bench:start -->` and `<!-- bench:end -->`).

Run: `python -m benchmarks.report` (after `make bench` wrote results.json); `make bench` calls it.
Plots need matplotlib (installed into .venv by `make bench`); without it the tables are still written.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "bench"
README = ROOT / "README.md"
PLOTS = ("latency.png", "cpu.png", "throughput.png", "startup_memory.png")
NA = "\N{EN DASH}"  # an empty cell
ORDER = ["direct", "litellm", "unbroken_chat", "unbroken_none", "unbroken_sqlite", "unbroken_dynamodb"]
SHORT = {
    "direct": "direct (baseline)",
    "litellm": "LiteLLM, chat",
    "unbroken_chat": "unbroken, chat, no journal",
    "unbroken_none": "unbroken, responses, no journal",
    "unbroken_sqlite": "unbroken, responses, SQLite",
    "unbroken_dynamodb": "unbroken, responses, DynamoDB Local",
}


def _f(x: Any, nd: int = 1, sign: bool = False) -> str:
    if x is None:
        return NA
    if isinstance(x, float | int):
        s = f"{x:+,.{nd}f}" if sign else f"{x:,.{nd}f}"
        return s
    return str(x)


def _keys(section: dict[str, Any]) -> list[str]:
    return [k for k in ORDER if k in section]


def machine_line(r: dict[str, Any]) -> str:
    m = r["machine"]
    line = (f"{m['nproc']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB, Linux {m['kernel']}, Python {m['python']}, "
            f"LiteLLM {r.get('litellm_version') or 'not installed'}; {r['date']}, commit {r.get('commit', '?')}, "
            f"`make bench` in {r.get('total_seconds', '?')} s")
    return line


def shared_note(r: dict[str, Any]) -> str:
    load = r.get("machine_load") or {}
    if load.get("shared"):
        return (f"**The machine was shared while these figures were taken**: other processes used "
                f"{load['other_processes_share_of_machine']:.0%} of its CPU over the run (load average "
                f"{load['loadavg_1min_start']} → {load['loadavg_1min_end']} on {load['cpus']} CPUs). Absolute "
                f"times and CPU figures are inflated and noisy; compare rows with each other and with the baseline "
                f"taken in the same run, not with figures from another machine or another run.")
    return (f"The machine was not noticeably shared (other processes used "
            f"{load.get('other_processes_share_of_machine', 0):.0%} of its CPU during the run).")


def stream_table(r: dict[str, Any], mode: str) -> list[str]:
    sec = r[mode]
    base = sec.get("direct", {})
    tokens = r["modes"][mode]["tokens"]
    lines = [
        "| target | first byte p50 / p99 | first text delta p50 / p99 | added to first text p50 / p99 "
        "| total p50 / p99 | added to total p50 | gateway CPU per stream | per token | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k in _keys(sec):
        s = sec[k]
        if "ttft_ms_p50" not in s:
            lines.append(f"| {SHORT[k]} | no good stream: {s.get('first_error', '')[:80]} |||||||| {s['n']} |")
            continue
        gw = NA if k == "direct" else f"{_f(s['gateway_cpu_ms_per_stream'])} ms"
        per_tok = NA if k == "direct" else f"{_f(s['gateway_cpu_ms_per_stream'] / tokens, 3)} ms"
        added = NA if k == "direct" else (f"{_f(s['ttft_ms_p50'] - base['ttft_ms_p50'], 1, True)} / "
                                           f"{_f(s['ttft_ms_p99'] - base['ttft_ms_p99'], 1, True)} ms")
        added_total = NA if k == "direct" else f"{_f(s['total_ms_p50'] - base['total_ms_p50'], 1, True)} ms"
        lines.append(
            f"| {SHORT[k]} | {_f(s['ttfb_ms_p50'])} / {_f(s['ttfb_ms_p99'])} ms | {_f(s['ttft_ms_p50'])} / "
            f"{_f(s['ttft_ms_p99'])} ms | {added} | {_f(s['total_ms_p50'])} / {_f(s['total_ms_p99'])} ms "
            f"| {added_total} | {gw} | {per_tok} | {s['errors']} of {s['n']} |")
    up = base.get("upstream_cpu_ms_per_stream")
    lines.append("")
    lines.append(f"The upstream's own CPU per stream (the same server for every row): {_f(up, 2)} ms. "
                 f"Samples per row: {base.get('n', '?')}.")
    return lines


def load_table(r: dict[str, Any]) -> list[str]:
    load = r["load"]
    lines = [
        "| target | unpaced: streams/s | x direct | CPU per stream | paced: streams/s | x direct | CPU per stream "
        "| errors (unpaced + paced) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    du, dp = load["unpaced"].get("direct", {}), load["paced"].get("direct", {})
    for k in _keys(load["unpaced"]):
        u, p = load["unpaced"][k], load["paced"].get(k, {})
        ratio_u = (u.get("streams_per_s") or 0) / du["streams_per_s"] if du.get("streams_per_s") else None
        ratio_p = (p.get("streams_per_s") or 0) / dp["streams_per_s"] if dp.get("streams_per_s") else None
        cpu_u = NA if k == "direct" else f"{_f(u.get('gateway_cpu_ms_per_stream'))} ms"
        cpu_p = NA if k == "direct" else f"{_f(p.get('gateway_cpu_ms_per_stream'))} ms"
        lines.append(f"| {SHORT[k]} | {_f(u.get('streams_per_s'))} | {_f(ratio_u, 2)} | {cpu_u} | "
                     f"{_f(p.get('streams_per_s'))} | {_f(ratio_p, 2)} | {cpu_p} | "
                     f"{u.get('errors', 0) + p.get('errors', 0)} of {u.get('n', 0) + p.get('n', 0)} |")
    return lines


def start_table(r: dict[str, Any]) -> list[str]:
    g = r["gateways"]
    bare = r.get("bare_interpreter_start_s", {})
    lines = [
        "| gateway | process start → first good answer | CPU used to get there | resident memory after 100 "
        "requests | at the end of the run |",
        "|---|---|---|---|---|",
    ]
    names = {"unbroken_none": "`unbroken serve --store none`", "unbroken_sqlite": "`unbroken serve` (SQLite)",
             "unbroken_dynamodb": "`unbroken serve` (DynamoDB Local)", "litellm": "LiteLLM proxy (1 worker)"}
    for k in ("unbroken_none", "unbroken_sqlite", "unbroken_dynamodb", "litellm"):
        if k in g:
            x = g[k]
            lines.append(f"| {names[k]} | {_f(x['start_to_first_answer_s'], 2)} s | "
                         f"{_f(x.get('start_cpu_s'), 2)} s | {_f(x['rss_mib_after_100_requests'])} MiB | "
                         f"{_f(x['rss_mib_at_end'])} MiB |")
    for e in r.get("lambda_entry", []):
        store = "DynamoDB" if e["store"].startswith("dynamodb") else e["store"]
        lines.append(f"| Lambda entry point, `uvicorn unbroken.app:lambda_app` (store {store}) | "
                     f"{_f(e['start_to_first_answer_s'], 2)} s (/healthz after {_f(e['start_to_healthz_s'], 2)} s) | "
                     f"{_f(e.get('start_cpu_s'), 2)} s | {_f(e['rss_mib_after_first_answer'])} MiB after 1 request "
                     f"| {NA} |")
    imp = r.get("import", {})
    lines += ["", f"Baseline: a bare `python -c pass` takes {_f(bare.get('unbroken_venv'), 3)} s "
                  f"(LiteLLM's environment: {_f(bare.get('litellm_venv'), 3)} s). "
                  f"`python -X importtime -c 'import unbroken.app'`: {_f(imp.get('importtime_cumulative_ms'))} ms "
                  f"cumulative, {imp.get('modules_imported', '?')} modules; largest by their own time: "
                  + ", ".join(f"`{n}` {ms} ms" for n, ms in imp.get("largest_self_ms", [])[:5]) + "."]
    return lines


def long_table(r: dict[str, Any]) -> list[str]:
    lg = r["long"]
    t = lg["targets"]
    base = t.get("direct", {})
    lines = [
        "| target | total p50 | added to total | first text p50 | gateway CPU per response | SSE bytes per response |",
        "|---|---|---|---|---|---|",
    ]
    for k in _keys(t):
        s = t[k]
        if "total_ms_p50" not in s:
            lines.append(f"| {SHORT[k]} | failed: {s.get('first_error', '')[:80]} | | | | |")
            continue
        added = NA if k == "direct" else f"{_f(s['total_ms_p50'] - base['total_ms_p50'], 0, True)} ms"
        cpu = NA if k == "direct" else f"{_f(s.get('gateway_cpu_ms_per_stream'), 0)} ms"
        lines.append(f"| {SHORT[k]} | {_f(s['total_ms_p50'] / 1000, 2)} s | {added} | {_f(s['ttft_ms_p50'])} ms | "
                     f"{cpu} | {_f(s.get('bytes_per_stream'), 0)} |")
    ddb = t.get("unbroken_dynamodb", {}).get("store_per_response")
    if ddb:
        lines += ["", f"DynamoDB per 1,000-token response (counted by `benchmarks/counted_serve.py`): "
                      f"{_f(ddb.get('write_calls'))} write calls ({_f(ddb.get('calls.transact_write_items'))} "
                      f"transactions), {_f(ddb.get('store.wru'))} WRU by DynamoDB's billing rules "
                      f"(`StoreStats.wru`; DynamoDB Local itself reports {_f(ddb.get('wcu'))}), "
                      f"{_f(ddb.get('read_calls'))} read calls = {_f(ddb.get('rcu'))} RRU (strongly consistent), "
                      f"{_f(ddb.get('store.bytes_written') / 1024 if ddb.get('store.bytes_written') else None)} KiB "
                      f"written."]
    return lines


def journal_table(r: dict[str, Any]) -> list[str]:
    j = r.get("journal")
    if not isinstance(j, dict) or not j.get("results"):
        return []
    lines = [
        f"**The journal alone** (`benchmarks/journal_bench.py`, in one process: {j['tokens_per_response']:,} "
        f"output-token deltas per response, batches of {j['batch_bytes']} B / {j['batch_ms']:g} ms; *burst* = an "
        f"upstream faster than the store, *paced* = {j['paced_tokens_per_s']} tokens/s; CPU and wall time per "
        "event with the journal on vs off, same process, same run):",
        "",
        "| store | mode | writes per response | WRU per response | bytes stored per token | SSE bytes per token "
        "| CPU per event on / off (added) | wall per event on / off |",
        "|---|---|---|---|---|---|---|---|",
    ]
    names = {"memory": "memory", "sqlite": "SQLite", "dynamodb_local": "DynamoDB Local"}
    for row in j["results"]:
        name = names.get(row["backend"], row["backend"])
        if "error" in row:
            lines.append(f"| {name} | error: {row['error'][:100]} |||||||")
            continue
        lines.append(
            f"| {name} | {row['mode']} | {row['writes_per_response']} | {_f(row.get('wru_per_response'), 0)}"
            f" | {_f(row.get('bytes_stored_per_token'), 2)} | {_f(row.get('sse_bytes_per_token'), 1)} | "
            f"{_f(row['cpu_us_per_event_journal_on'])} / {_f(row['cpu_us_per_event_journal_off'])} µs "
            f"({_f(row['cpu_us_per_event_added'], 1, True)}) | {_f(row['wall_us_per_event_journal_on'])} / "
            f"{_f(row['wall_us_per_event_journal_off'])} µs |")
    return [*lines, ""]


def first_token_table(r: dict[str, Any]) -> list[str]:
    """`benchmarks/first_token.py`'s figures (what durability costs the first token), if the run has them."""
    ft = r.get("first_token")
    if not isinstance(ft, dict) or not isinstance(ft.get("summary"), dict):
        return []
    from benchmarks.first_token import goals

    s = ft["summary"]
    up = s.get("upstream", {})
    lines = [
        f"**What durability costs the first token** (`{ft['command']}`, {ft['date']}: {ft['tokens']} tokens at "
        f"{ft['tps']:g} tokens/s, upstream's own first token after {ft.get('upstream_ttft_ms', 0):g} ms; "
        f"{ft['repeat']} blocks of {ft['n']} rounds, each round one stream straight to the upstream and one through "
        "each router, each router's journal-on and journal-off streams half a round apart and either first in turn; "
        + (f"the routers on CPU {', '.join(map(str, ft['routers_on_cpus']))} and the client, the upstream and "
           "DynamoDB Local on the other; " if ft.get("routers_on_cpus") else "")
        + "every figure the median "
        f"of the blocks' figures; `journal_batch_ms` "
        f"{ft['batch_ms']:g}; load average {ft['loadavg_1min_start']} → {ft['loadavg_1min_end']} on this "
        "machine):",
        "",
        "| store | added to first text p50 / p95 | of which the journal (paired with journal off) p50 / p95 "
        "| the journal without the upstream's own time p50 (on the way to it + back) "
        "| one commit: header + first batch after the upstream's wait p50 (back to back p50; append of 5 deltas "
        "p50 / p95) | journal's share in commits "
        "| max gap between tokens p50 / p95 (worst) | writes per stream |",
        "|---|---|---|---|---|---|---|---|",
    ]
    names = {"none": "`--store none`", "sqlite": "SQLite", "sqlite_off": "SQLite router, `store: false`",
             "dynamodb": "DynamoDB Local", "dynamodb_off": "DynamoDB Local router, `store: false`"}
    for key in names:
        row = s.get(key)
        if not isinstance(row, dict):
            continue
        journal = (f"{_f(row['journal_added_ttft_ms_p50'], 2, True)} / {_f(row['journal_added_ttft_ms_p95'], 2, True)}"
                   f" ms" if "journal_added_ttft_ms_p50" in row else NA)
        commit = (f"{_f(row['commit_ms_p50'], 2)} / {_f(row['commit_ms_p95'], 2)} ms" if "commit_ms_p50" in row
                  else NA)
        if "first_commit_hot_ms_p50" in row:
            commit = (f"{_f(row['first_commit_ms_p50'], 2)} ms ({_f(row['first_commit_hot_ms_p50'], 2)} ms; "
                      f"{commit})")
        elif "first_commit_ms_p50" in row:
            commit = f"{_f(row['first_commit_ms_p50'], 2)} ms ({commit})"
        net = (f"{_f(row['journal_added_ttft_net_ms_p50'], 2, True)} ms ({_f(row['journal_added_pre_ms_p50'], 2, True)}"
               f" + {_f(row['journal_added_post_ms_p50'], 2, True)})" if "journal_added_ttft_net_ms_p50" in row
               else NA)
        share = _f(row.get("journal_added_ttft_in_commits"), 2) if "journal_added_ttft_in_commits" in row else NA
        writes = _f(row["writes_per_stream"], 1) if "writes_per_stream" in row else NA
        lines.append(
            f"| {names[key]} | {_f(row['added_ttft_ms_p50'], 2, True)} / {_f(row['added_ttft_ms_p95'], 2, True)} ms "
            f"| {journal} | {net} | {commit} | {share} | {_f(row['max_gap_ms_p50'])} / {_f(row['max_gap_ms_p95'])} "
            f"({_f(row['max_gap_ms_worst'])}) ms | {writes} |")
    lines += ["", f"Upstream straight: first content after {_f(up.get('ttft_ms_p50'), 2)} ms, its own longest gap "
                  f"{_f(up.get('max_gap_ms_p50'))} ms (p50). Goals (`--check`):", ""]
    for store, goal, holds, figures in goals(ft):
        lines.append(f"- {names[store]}: {goal}: **{'holds' if holds else 'does not hold'}** ({figures})")
    return [*lines, ""]


def first_token_block(r: dict[str, Any]) -> list[str]:
    """The first-token table between markers, so that `benchmarks.first_token --write` can replace it alone."""
    table = first_token_table(r)
    return ["<!-- first-token:start -->", *table, "<!-- first-token:end -->", ""] if table else []


def results_md(r: dict[str, Any], img_prefix: str, *, first_token: bool = True) -> str:
    modes = r["modes"]
    lines = [
        f"Measured by `make bench` on {machine_line(r)}.",
        "",
        shared_note(r),
        "",
        "Every gateway streams from the same fake OpenAI-compatible upstream on 127.0.0.1 "
        "(`benchmarks/fake_upstream.py`); the client is httpx with streaming. *unpaced* = "
        f"{modes['unpaced']['tokens']} tokens written as fast as the upstream can; *paced* = "
        f"{modes['paced']['tokens']} tokens {modes['paced']['gap_ms']} ms apart (50 tokens/s). \"Added\" = the row "
        "minus the direct row, same percentile, same run. Gateway CPU = the gateway process's CPU time over its own "
        "streams / streams. unbroken's chat row and its responses rows without a journal are one process.",
        "",
        f"**One stream at a time, unpaced** ({r['unpaced'].get('direct', {}).get('n', '?')} streams per row, in "
        "rounds that rotate over the targets):",
        "",
        *stream_table(r, "unpaced"),
        "",
        f"**Paced, {r['config']['paced_batch']} streams at a time** (started 20 ms apart):",
        "",
        *stream_table(r, "paced"),
        "",
        f"**{r['load']['concurrency']} concurrent streams** ({r['load']['streams']} streams per target and mode; "
        "streams/s = streams / wall time; the client, one Python process, is part of every row, and the direct row "
        "shows its ceiling):",
        "",
        *load_table(r),
        "",
        "**Start and memory** (each gateway started alone):",
        "",
        *start_table(r),
        "",
        f"**1,000-token responses at 50 tokens/s** ({r['long']['streams_per_target']} per target, all targets at "
        "once; what the cost figures below are computed from):",
        "",
        *long_table(r),
        "",
        *journal_table(r),
        *(first_token_block(r) if first_token else []),
    ]
    plots = [p for p in PLOTS if (OUT / p).exists()]
    if plots:
        lines += [" ".join(f"![{p[:-4]}]({img_prefix}{p})" for p in plots), ""]
    return "\n".join(lines)


def plots(r: dict[str, Any]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report: matplotlib is not installed; no plots", file=sys.stderr)
        return []
    made = []
    colors = {"direct": "#888888", "litellm": "#d62728", "unbroken_chat": "#9ecae1", "unbroken_none": "#6baed6",
              "unbroken_sqlite": "#3182bd", "unbroken_dynamodb": "#08519c"}
    note = " (shared machine)" if (r.get("machine_load") or {}).get("shared") else ""

    def bars(ax: Any, keys: list[str], values: list[float], title: str, unit: str) -> None:
        y = range(len(keys))
        ax.barh(list(y), values, color=[colors[k] for k in keys])
        ax.set_yticks(list(y), [SHORT[k] for k in keys], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(unit, fontsize=8)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:,.1f}", va="center", fontsize=7)
        ax.margins(x=0.25)

    # latency: added time to first text delta, p50 and p99, per mode
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5), constrained_layout=True)
    for row, mode in enumerate(("unpaced", "paced")):
        sec = r[mode]
        base = sec["direct"]
        keys = [k for k in _keys(sec) if k != "direct" and "ttft_ms_p50" in sec[k]]
        for col, q in enumerate(("p50", "p99")):
            vals = [sec[k][f"ttft_ms_{q}"] - base[f"ttft_ms_{q}"] for k in keys]
            bars(axes[row][col], keys, vals, f"{mode}: added time to first text delta, {q}", "ms vs direct")
    if note:
        fig.suptitle("measured on a shared machine: compare rows, not runs", fontsize=9)
    fig.savefig(OUT / "latency.png", dpi=110)
    plt.close(fig)
    made.append("latency.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), constrained_layout=True)
    for col, mode in enumerate(("unpaced", "paced")):
        sec = r[mode]
        keys = [k for k in _keys(sec) if k != "direct" and "gateway_cpu_ms_per_stream" in sec[k]]
        tokens = r["modes"][mode]["tokens"]
        bars(axes[col], keys, [sec[k]["gateway_cpu_ms_per_stream"] for k in keys],
             f"gateway CPU per {tokens}-token stream, {mode}", "ms of CPU")
    if note:
        fig.suptitle("measured on a shared machine: compare rows, not runs", fontsize=9)
    fig.savefig(OUT / "cpu.png", dpi=110)
    plt.close(fig)
    made.append("cpu.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), constrained_layout=True)
    for col, mode in enumerate(("unpaced", "paced")):
        sec = r["load"][mode]
        keys = [k for k in _keys(sec) if sec[k].get("streams_per_s")]
        bars(axes[col], keys, [sec[k]["streams_per_s"] for k in keys],
             f"streams/s at {r['load']['concurrency']} concurrent, {mode}", "streams per second")
    if note:
        fig.suptitle("measured on a shared machine: compare rows, not runs", fontsize=9)
    fig.savefig(OUT / "throughput.png", dpi=110)
    plt.close(fig)
    made.append("throughput.png")

    g = r["gateways"]
    keys = [k for k in ("unbroken_none", "unbroken_sqlite", "unbroken_dynamodb", "litellm") if k in g]
    short = {**SHORT, "unbroken_none": "unbroken, no journal", "unbroken_sqlite": "unbroken, SQLite",
             "unbroken_dynamodb": "unbroken, DynamoDB Local", "litellm": "LiteLLM proxy"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.2), constrained_layout=True)
    for ax, field, title, unit in ((axes[0], "start_to_first_answer_s", "process start → first good answer",
                                    "seconds"),
                                   (axes[1], "rss_mib_after_100_requests", "resident memory after 100 requests",
                                    "MiB")):
        vals = [g[k][field] for k in keys]
        y = range(len(keys))
        ax.barh(list(y), vals, color=[colors[k] for k in keys])
        ax.set_yticks(list(y), [short[k] for k in keys], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(unit, fontsize=8)
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:,.1f}", va="center", fontsize=7)
        ax.margins(x=0.25)
    if note:
        fig.suptitle("measured on a shared machine: compare rows, not runs", fontsize=9)
    fig.savefig(OUT / "startup_memory.png", dpi=110)
    plt.close(fig)
    made.append("startup_memory.png")
    return made


def replace_block(text: str, name: str, body: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    block = f"{start}\n{body.rstrip()}\n{end}"
    if pattern.search(text):
        return pattern.sub(lambda _: block, text)
    raise ValueError(f"README has no {start} ... {end} block")


def write(r: dict[str, Any]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    plots(r)
    (OUT / "results.md").write_text(results_md(r, "") + "\n")
    readme = README.read_text()
    # The first-token figures have a block of their own in the README (its durability-cost section), if it has one.
    own_block = "<!-- first-token:start -->" in readme
    readme = replace_block(readme, "bench", results_md(r, "docs/bench/", first_token=not own_block))
    if own_block and first_token_table(r):
        readme = replace_block(readme, "first-token", "\n".join(first_token_table(r)))
    README.write_text(readme)


def main() -> int:
    r = json.loads((OUT / "results.json").read_text())
    write(r)
    print(f"wrote {OUT / 'results.md'} and the README block")
    return 0


if __name__ == "__main__":
    sys.exit(main())
