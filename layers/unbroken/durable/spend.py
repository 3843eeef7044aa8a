"""Spend and rate windows as shared counters (`runtime.counters`, batched; README "Keys, budgets and spend").

Counted per key, tenant, model and deployment (`<model>/<deployment>`), per UTC day and month: `usd`, `requests`,
`input_tokens`, `output_tokens` (and `attempts` per deployment). Per key and tenant also per UTC minute
(`requests`, `tokens`) for the rate limits. A request counts when it is admitted (so concurrent requests see each
other at once within a process); its tokens and USD when each owner of the response has finished its attempts
(`Generation._charge`: before the terminal event, so a client that has seen it finds its spend counted), each
attempt at its own deployment. What one owner of a response records is its own
attempts, so the owners of a response taken over or handed on add up to the response's `router.cost_usd`.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from unbroken.journal.counters import CounterBatcher
from unbroken.journal.store import Store
from unbroken.resilience.attempts import Attempt

Dimension = Literal["key", "tenant", "model", "deployment"]
SPEND_FIELDS = ("usd", "requests", "input_tokens", "output_tokens")
# A deployment counts attempts (a request may make several, on several deployments), not requests.
DEPLOYMENT_FIELDS = ("usd", "attempts", "input_tokens", "output_tokens")
# How long the counters live: a year of days, two of months, and a rate window a little past its minute.
DAY_RETENTION_SECONDS = 400 * 86400
MONTH_RETENTION_SECONDS = 800 * 86400
WINDOW_RETENTION_SECONDS = 180
# Where a stored response's header keeps the key it is charged to (for a later owner: takeover, the worker).
KEY_ID_FIELD = "_key_id"


@dataclass(frozen=True, slots=True)
class Account:
    """Who a response is charged to: its tenant and, for an API key, the key's id."""

    tenant: str
    key_id: str | None = None


@dataclass(frozen=True, slots=True)
class Charge:
    """What one attempt cost, at its deployment."""

    deployment: str
    usd: float
    input_tokens: int
    output_tokens: int


# -- periods and counter keys -------------------------------------------------------------------------------------


def day_of(t: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(t))


def month_of(t: float) -> str:
    return time.strftime("%Y-%m", time.gmtime(t))


def minute_of(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M", time.gmtime(t))


def day_start(t: float) -> float:
    return float(int(t) // 86400 * 86400)


def month_start(t: float) -> float:
    g = time.gmtime(t)
    return float(calendar.timegm((g.tm_year, g.tm_mon, 1, 0, 0, 0)))


def next_month_start(t: float) -> float:
    g = time.gmtime(t)
    year, month = (g.tm_year + 1, 1) if g.tm_mon == 12 else (g.tm_year, g.tm_mon + 1)
    return float(calendar.timegm((year, month, 1, 0, 0, 0)))


def seconds_to_next_minute(t: float) -> float:
    return 60.0 - t % 60.0


def seconds_to_next_day(t: float) -> float:
    return day_start(t) + 86400.0 - t


def seconds_to_next_month(t: float) -> float:
    return next_month_start(t) - t


def spend_key(dimension: Dimension, name: str, period: str) -> str:
    """A day (`2026-12-02`) or month (`2026-12`) of spend. The name goes last: it may hold any character."""
    return f"spend:{dimension}:{period}:{name}"


def window_key(dimension: Literal["key", "tenant"], name: str, minute: str) -> str:
    return f"rate:{dimension}:{minute}:{name}"


def _subjects(account: Account, model: str) -> list[tuple[Dimension, str]]:
    subjects: list[tuple[Dimension, str]] = [("tenant", account.tenant), ("model", model)]
    if account.key_id is not None:
        subjects.append(("key", account.key_id))
    return subjects


def _windows(account: Account) -> list[tuple[Literal["key", "tenant"], str]]:
    out: list[tuple[Literal["key", "tenant"], str]] = [("tenant", account.tenant)]
    if account.key_id is not None:
        out.append(("key", account.key_id))
    return out


def _add_periods(counters: CounterBatcher, dimension: Dimension, name: str, deltas: Mapping[str, float],
                 now: float) -> None:
    # Expiry aligned to the period's start, so the batcher writes a period's keys in one group.
    counters.add(spend_key(dimension, name, day_of(now)), deltas, expires_at=day_start(now) + DAY_RETENTION_SECONDS)
    counters.add(spend_key(dimension, name, month_of(now)), deltas,
                 expires_at=month_start(now) + MONTH_RETENTION_SECONDS)


def _add_window(counters: CounterBatcher, dimension: Literal["key", "tenant"], name: str,
                deltas: Mapping[str, float], now: float) -> None:
    counters.add(window_key(dimension, name, minute_of(now)), deltas,
                 expires_at=now - now % 60 + 60 + WINDOW_RETENTION_SECONDS)


# -- counting -----------------------------------------------------------------------------------------------------


def count_request(counters: CounterBatcher, account: Account, model: str, now: float) -> None:
    """An admitted request: one more in its day, month and minute."""
    for dimension, name in _subjects(account, model):
        _add_periods(counters, dimension, name, {"requests": 1}, now)
    for dimension, name in _windows(account):
        _add_window(counters, dimension, name, {"requests": 1}, now)


def charge(counters: CounterBatcher, account: Account, model: str, charges: Iterable[Charge], now: float) -> None:
    """Attempts that ended: their USD and tokens, to the account, the model and each attempt's deployment."""
    total = {"usd": 0.0, "input_tokens": 0.0, "output_tokens": 0.0}
    for c in charges:
        deltas = {"usd": c.usd, "input_tokens": c.input_tokens, "output_tokens": c.output_tokens}
        _add_periods(counters, "deployment", f"{model}/{c.deployment}", {**deltas, "attempts": 1}, now)
        for name, value in deltas.items():
            total[name] += value
    if not any(total.values()):
        return
    for dimension, name in _subjects(account, model):
        _add_periods(counters, dimension, name, total, now)
    tokens = total["input_tokens"] + total["output_tokens"]
    if tokens:
        for window, name in _windows(account):
            _add_window(counters, window, name, {"tokens": tokens}, now)


def charges_of(attempts: Sequence[Attempt]) -> list[Charge]:
    return [Charge(a.deployment, a.cost, a.usage.input_tokens, a.usage.output_tokens) for a in attempts]


def charge_of(attempt: Mapping[str, Any]) -> Charge:
    """An attempt as the `router` field records it (e.g. the estimate of a dead owner's unrecorded work)."""
    return Charge(str(attempt.get("deployment") or ""), float(attempt.get("cost_usd") or 0.0),
                  int(attempt.get("input_tokens") or 0), int(attempt.get("output_tokens") or 0))


def reporter(counters: CounterBatcher, account: Account, model: str) -> Callable[[Sequence[Attempt]], None]:
    """The `GenerationOptions.on_report` hook: an owner's attempts, charged once it has finished them."""

    def report(attempts: Sequence[Attempt]) -> None:
        charge(counters, account, model, charges_of(attempts), time.time())

    return report


# -- reading ------------------------------------------------------------------------------------------------------


async def read_fresh(store: Store, counters: CounterBatcher | None, keys: Sequence[str]) -> dict[str, dict[str, float]]:
    """Counters as the store has them now plus what this process has not flushed yet (the admin API's reads: no
    cache, unlike admission's)."""
    found: dict[str, dict[str, float]] = {}
    for start in range(0, len(keys), 500):
        found.update(await store.get_counters(keys[start:start + 500]))
    if counters is not None:
        for key in keys:
            fields = counters.with_pending(key, found.get(key))
            if fields:
                found[key] = fields
    return found


def days_between(first: float, last: float) -> list[str]:
    """The UTC days from `first`'s to `last`'s, both included (epoch seconds)."""
    return [day_of(t) for t in range(int(day_start(first)), int(day_start(last)) + 1, 86400)]


async def report(store: Store, counters: CounterBatcher | None, dimension: Dimension, names: Sequence[str],
                 days: Sequence[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Spend of each name on each day: (rows with anything in them, by name then day; totals per name)."""
    wanted = [(name, day, spend_key(dimension, name, day)) for name in names for day in days]
    found = await read_fresh(store, counters, [k for _, _, k in wanted])
    fields = DEPLOYMENT_FIELDS if dimension == "deployment" else SPEND_FIELDS
    rows: list[dict[str, Any]] = []
    totals: dict[str, dict[str, Any]] = {}
    for name, day, key in wanted:
        got = found.get(key)
        if not got:
            continue
        row = {"id": name, "day": day, **{f: _rounded(f, got.get(f, 0.0)) for f in fields}}
        rows.append(row)
        total = totals.setdefault(name, {"id": name, **{f: 0.0 for f in fields}})
        for f in fields:
            total[f] = _rounded(f, total[f] + got.get(f, 0.0))
    return rows, list(totals.values())


def _rounded(name: str, value: float) -> float | int:
    return round(value, 8) if name == "usd" else round(value)
