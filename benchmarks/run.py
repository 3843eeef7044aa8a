"""`make bench`: unbroken side by side with the LiteLLM proxy and with going straight to the upstream, in one run,
every figure a ratio or a difference against a baseline measured in the same run.

1. `benchmarks.compare`: the side-by-side streams (added time to first byte / first text delta, total time p50/p99,
   gateway CPU per stream, streams/s at 50 concurrent, start to first answer, import time, memory after 100
   requests), for the router without a journal, with SQLite and with DynamoDB Local, paced and unpaced;
2. `benchmarks.journal_bench`: the journal alone (writes, WRU, bytes and CPU per event, journal on vs off);
   then `benchmarks.first_token`: what durability costs the first token (added TTFT vs one commit, gaps, writes);
3. `benchmarks.profile`: py-spy on a journaled (SQLite) router → docs/bench/profile.txt;
4. `docs/bench/results.json`, then `benchmarks.report` (results.md, PNG plots, the README block) and
   `benchmarks.cost` (cost.md, the README cost block).

A background sampler records how much CPU other processes took during the run; the output says when the machine
was shared. Set UNBROKEN_BENCH_JOURNAL=0 / UNBROKEN_BENCH_FIRST_TOKEN=0 / UNBROKEN_BENCH_PROFILE=0 to skip the
journal, first-token and profile steps, UNBROKEN_BENCH_SCALE=0.2 for
a quick run of the harness itself (fewer samples: not for publishing).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import compare
from benchmarks.procs import MachineMonitor

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "bench"


def machine() -> dict[str, Any]:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kib = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                   if ln.startswith("MemTotal:"))
    return {"nproc": os.cpu_count(), "cpu_model": model, "memory_gib": round(mem_kib / 1024 / 1024),
            "kernel": platform.release().split("-")[0], "python": platform.python_version()}


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return (out.stdout.strip() or "?") + ("+changes" if dirty else "")


def scrub(text: str) -> str:
    """No path of this machine in what gets committed: temporary directories and the checkout become placeholders."""
    import re
    import tempfile

    text = re.sub(re.escape(tempfile.gettempdir()) + r"/unbroken-[A-Za-z0-9_.-]+", "<tmp>", text)
    return text.replace(str(ROOT), "<repo>")


def main() -> int:
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "commit": _commit(),
        "machine": machine(),
        "modes": compare.MODES,
        "config": {"scale": compare.SCALE, "unpaced_rounds": compare.UNPACED_ROUNDS,
                   "unpaced_block": compare.UNPACED_BLOCK, "paced_rounds": compare.PACED_ROUNDS,
                   "paced_batch": compare.PACED_BATCH, "concurrency": compare.CONCURRENCY,
                   "load_streams": compare.LOAD_STREAMS, "long_streams": compare.LONG_STREAMS},
    }
    with MachineMonitor() as monitor:
        compare.run(report)
        if os.environ.get("UNBROKEN_BENCH_JOURNAL", "1") != "0":
            print("bench: the journal alone (benchmarks.journal_bench)", flush=True)
            from benchmarks import journal_bench

            with compare.Phase(report, "journal_bench"):
                journal_bench.run(report, memory=False)
        if os.environ.get("UNBROKEN_BENCH_FIRST_TOKEN", "1") != "0":
            print("bench: what durability costs the first token (benchmarks.first_token)", flush=True)
            from benchmarks import first_token

            with compare.Phase(report, "first_token"):
                first_token.bench_step(report)
        if os.environ.get("UNBROKEN_BENCH_PROFILE", "1") != "0":
            print("bench: profiling a journaled stream (py-spy)", flush=True)
            from benchmarks import profile

            m = report["machine"]
            with compare.Phase(report, "profile"):
                try:
                    prof = profile.run(OUT / "profile.txt", machine=f"{m['nproc']} x {m['cpu_model']}")
                    report["profile"] = {k: prof[k] for k in ("file", "samples", "buckets", "by_component", "self",
                                                              "workload")}
                except RuntimeError as exc:
                    report["profile"] = {"error": str(exc)[:2000]}
    report["machine_load"] = monitor.summary()
    report["total_seconds"] = round(time.perf_counter() - t0)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(scrub(json.dumps(report, indent=2)) + "\n")

    from benchmarks import cost
    from benchmarks import report as report_md

    report_md.write(report)
    c = cost.write(report)
    print((OUT / "results.md").read_text())
    print((OUT / "cost.md").read_text())
    load = report["machine_load"]
    if load["shared"]:
        print(f"bench: NOTE the machine was shared: other processes used {load['other_processes_share_of_machine']:.0%}"
              f" of its CPU during the run; absolute figures are inflated, compare within the run.")
    print(f"bench: recommended Lambda size {c['recommended_mb']} MB {c['recommended_arch']}; wrote "
          f"docs/bench/results.json, results.md, cost.md, profile.txt, *.png and the README blocks in "
          f"{report['total_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
