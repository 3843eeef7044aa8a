"""Scripted faults: the `sim_fault` grammar, and which attempt of a logical request (`sim_request`) gets which
fault. What each fault does on the wire is in `completions.py`; the error bodies are in `errors.py`."""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

log = logging.getLogger("unbroken.simulated")

MAX_TRACKED_REQUEST_KEYS = 10_000

# Faults that strike after N content chunks, and faults that take no count.
CHUNK_FAULTS = frozenset({"error", "cut", "reset", "stall", "malformed", "content_filter"})
_PLAIN_FAULTS = frozenset({"no_done", "context_length", "auth", "timeout", "quota", "none"})


@dataclass(frozen=True, slots=True)
class Fault:
    """One scripted failure. `after` is the number of content chunks sent first (chunk faults); `status` and
    `retry_after` belong to `http`."""

    kind: str
    after: int = 0
    status: int | None = None
    retry_after: str | None = None


def parse_faults(spec: str) -> tuple[Fault, ...]:
    """Parse `sim_fault`: comma-separated `http:CODE[:SECONDS]`, `error:N`, `cut:N`, `reset:N`, `stall:N`,
    `malformed:N`, `content_filter:N`, `no_done`, `context_length`, `auth`, `quota`, `timeout`, `none`."""
    faults: list[Fault] = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        name, _, rest = item.partition(":")
        if name == "http":
            code_text, _, retry_after = rest.partition(":")
            status = int(code_text)
            if not 400 <= status <= 599:
                raise ValueError(f"http fault status must be 4xx or 5xx, got {status}")
            if retry_after and not float(retry_after) >= 0:
                raise ValueError("retry-after must be a non-negative number of seconds")
            faults.append(Fault("http", status=status, retry_after=retry_after or None))
        elif name in CHUNK_FAULTS:
            after = int(rest) if rest else 0
            if after < 0:
                raise ValueError(f"{name}: chunk count must be >= 0")
            faults.append(Fault(name, after=after))
        elif name in _PLAIN_FAULTS and not rest:
            faults.append(Fault(name))
        else:
            raise ValueError(f"unknown fault {item!r}")
    return tuple(faults)


class AttemptLog:
    """How many requests carried each `sim_request` key (the most recent MAX_TRACKED_REQUEST_KEYS keys), and so
    which scripted fault each attempt gets."""

    def __init__(self) -> None:
        self._counts: OrderedDict[str, int] = OrderedDict()

    def get(self, request_key: str) -> int:
        return self._counts.get(request_key, 0)

    def clear(self) -> None:
        self._counts.clear()

    def _count(self, key: str) -> int:
        count = self._counts.pop(key, 0) + 1
        self._counts[key] = count
        while len(self._counts) > MAX_TRACKED_REQUEST_KEYS:
            self._counts.popitem(last=False)
        return count

    def fault_for(self, faults: tuple[Fault, ...], fault_attempts: int, request_key: str | None) -> Fault | None:
        """The fault of this attempt: the n-th of a comma list, or the single fault for the first
        `fault_attempts` attempts of a `sim_request` key; without a key, the (first) fault every time."""
        attempt = self._count(request_key) if request_key else None
        if not faults:
            return None
        fault: Fault | None
        if attempt is None:
            fault = faults[0]
        elif len(faults) > 1:
            fault = faults[attempt - 1] if attempt <= len(faults) else None
        else:
            fault = faults[0] if attempt <= fault_attempts else None
        if fault is not None and fault.kind == "none":
            return None
        if fault is not None:
            log.debug("simulated upstream: fault %s (attempt %s)", fault.kind, attempt)
        return fault
