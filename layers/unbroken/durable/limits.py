"""Admission: may this principal call this model now? Checked before any upstream call, in this order:

1. the key may use the model (a store key's `models`; else a 403 `model_not_allowed`: the caller is who it says,
   the model exists, this key may not use it);
2. the key's and the tenant's budgets (USD per UTC day and month) are not used up: else a 429 `budget_exceeded`,
   Retry-After the seconds to the next UTC day or month;
3. the key's and the tenant's rate limits (requests and tokens per minute) are not reached: else a 429
   `rate_limit_exceeded`, Retry-After the seconds to the next minute.

The counters are read through `runtime.counter_reader` (a cache at most `READ_CACHE_SECONDS` old plus what this
process has not flushed), so what other instances spent is seen within the flush interval plus the cache age; an
admitted request counts at once (`spend.count_request`), its tokens and USD when it ends. How far a budget can be
overshot follows from that (README "How far a budget can be overshot").
"""

from __future__ import annotations

import time
from typing import Literal

from unbroken.durable import spend
from unbroken.durable.keys import Budgets, Limits, Principal
from unbroken.durable.runtime import Runtime
from unbroken.errors import Failure
from unbroken.journal.store import StoreError

Subject = tuple[Literal["key", "tenant"], str, Budgets, Limits]


async def admit(runtime: Runtime, principal: Principal, model: str) -> None:
    """Raise the failure that refuses the request, or count it as admitted."""
    key = principal.key
    if key is not None and not key.allows(model):
        raise Failure("forbidden", f"This API key may not use the model '{model}'.", param="model",
                      code="model_not_allowed")
    counters, reader, accounts = runtime.counters, runtime.counter_reader, runtime.accounts
    if counters is None or reader is None or accounts is None:
        return  # no store: no shared counters, no budgets
    now = time.time()
    tenant = await accounts.tenant(principal.tenant)
    subjects: list[Subject] = [("tenant", principal.tenant, tenant.budgets, tenant.limits)]
    if key is not None:
        subjects.insert(0, ("key", key.id, key.budgets, key.limits))
    wanted: list[str] = []
    for dimension, name, budgets, limits in subjects:
        if budgets.daily_usd is not None:
            wanted.append(spend.spend_key(dimension, name, spend.day_of(now)))
        if budgets.monthly_usd is not None:
            wanted.append(spend.spend_key(dimension, name, spend.month_of(now)))
        if limits.rpm is not None or limits.tpm is not None:
            wanted.append(spend.window_key(dimension, name, spend.minute_of(now)))
    if wanted:
        try:
            seen = await reader.read(wanted)
        except StoreError as exc:
            # Fail closed: a budget that cannot be read is not known to have room.
            raise Failure("unavailable", f"Budgets and limits could not be read ({type(exc).__name__}).",
                          code="store_unavailable") from None
        for subject in subjects:
            _check(subject, seen, now)
    spend.count_request(counters, principal.account, model, now)


def _check(subject: Subject, seen: dict[str, dict[str, float]], now: float) -> None:
    dimension, name, budgets, limits = subject
    who = "API key" if dimension == "key" else "tenant"
    for budget, period, when, until_next, label in (
            (budgets.daily_usd, spend.day_of, "today", spend.seconds_to_next_day, "daily"),
            (budgets.monthly_usd, spend.month_of, "this month", spend.seconds_to_next_month, "monthly")):
        if budget is None:
            continue
        spent = seen.get(spend.spend_key(dimension, name, period(now)), {}).get("usd", 0.0)
        if spent >= budget:
            raise Failure("rate_limited", f"This {who} has used its {label} budget of ${budget:g} "
                          f"(spent ${spent:.6f} {when}, UTC).", code="budget_exceeded",
                          retry_after=until_next(now))
    window = seen.get(spend.window_key(dimension, name, spend.minute_of(now)), {})
    if limits.rpm is not None and window.get("requests", 0.0) >= limits.rpm:
        raise Failure("rate_limited", f"This {who} is limited to {limits.rpm} requests per minute.",
                      code="rate_limit_exceeded", retry_after=spend.seconds_to_next_minute(now))
    if limits.tpm is not None and window.get("tokens", 0.0) >= limits.tpm:
        raise Failure("rate_limited", f"This {who} is limited to {limits.tpm} tokens per minute.",
                      code="rate_limit_exceeded", retry_after=spend.seconds_to_next_minute(now))
