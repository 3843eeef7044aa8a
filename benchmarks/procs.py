"""Process plumbing for the benchmarks: spawn servers with their output in files, read a process tree's CPU time
and resident memory from /proc, pick free loopback ports, and watch how much of the machine other processes use.

Everything here is Linux-only (/proc), which is what the benchmark machines and Lambda are.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
        except OSError:
            continue
        found += [int(c) for c in text.split()]
    return found


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants (bounded: a process tree here has a handful of members)."""
    out, todo = [], [pid]
    while todo and len(out) < 256:
        p = todo.pop()
        out.append(p)
        todo += _children(p)
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU of one process (all its threads, live and exited)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tree_cpu_seconds(pid: int) -> float:
    return sum(cpu_seconds(p) for p in tree(pid))


def rss_mib(pid: int) -> float:
    """Resident memory of `pid` and its descendants, MiB."""
    total = 0
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            continue
    return total / 1024


class Server:
    """A spawned server process; stdout/stderr go to temporary files (a pipe nobody drains would block it)."""

    def __init__(self, name: str, argv: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None):
        self.name = name
        self.argv = argv
        self.out = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False)
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.out, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, n: int = 2000) -> str:
        try:
            return Path(self.out.name).read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def wait_line(self, prefix: str, timeout: float) -> str:
        """The first output line starting with `prefix`, polled with a bound."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in Path(self.out.name).read_text(errors="replace").splitlines():
                if line.startswith(prefix):
                    return line
            if self.proc.poll() is not None:
                break
            time.sleep(0.01)
        raise RuntimeError(f"{self.name} did not print {prefix!r} within {timeout:g} s:\n{self.log_tail()}")

    def cpu(self) -> float:
        return tree_cpu_seconds(self.pid)

    def rss(self) -> float:
        return rss_mib(self.pid)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)  # its own session: the server and whatever it spawned
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)
        self.out.close()
        try:
            os.unlink(self.out.name)
        except OSError:
            pass


def _busy_jiffies() -> int:
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return user + nice + system + irq + softirq + steal


class MachineMonitor:
    """Samples once a second how much CPU the whole machine used versus this process tree, so the report can say
    whether (and how much) the machine was shared while the figures were taken. Processes that exit between two
    samples are counted as foreign for that second: an overestimate of sharing, never an underestimate."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.me = os.getpid()
        self.foreign = 0.0
        self.total = 0.0
        self.ours = 0.0
        self.started = time.monotonic()
        self.load_start = os.getloadavg()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="machine-monitor", daemon=True)

    def _ours(self) -> dict[int, float]:
        return {p: cpu_seconds(p) for p in tree(self.me)}

    def _run(self) -> None:
        busy, ours = _busy_jiffies(), self._ours()
        while not self._stop.wait(self.interval):
            busy2, ours2 = _busy_jiffies(), self._ours()
            machine = (busy2 - busy) / CLK_TCK
            mine = sum(v - ours.get(p, 0.0) for p, v in ours2.items())
            self.total += machine
            self.ours += mine
            self.foreign += max(0.0, machine - mine)
            busy, ours = busy2, ours2

    def __enter__(self) -> MachineMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def summary(self) -> dict[str, float | bool | int | str]:
        wall = time.monotonic() - self.started
        cpus = os.cpu_count() or 1
        share = self.foreign / (wall * cpus) if wall > 0 else 0.0
        load_end = os.getloadavg()
        return {
            "wall_s": round(wall, 1),
            "cpus": cpus,
            "machine_cpu_s": round(self.total, 1),
            "bench_cpu_s": round(self.ours, 1),
            "other_processes_cpu_s": round(self.foreign, 1),
            "other_processes_share_of_machine": round(share, 3),
            "loadavg_1min_start": round(self.load_start[0], 2),
            "loadavg_1min_end": round(load_end[0], 2),
            # More than 5% of the machine used by processes that are not the benchmark's own: call it shared.
            "shared": share > 0.05,
        }
