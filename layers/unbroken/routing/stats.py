"""Live deployment stats as time windows: what one attempt adds to its deployment's current window, and the decayed
estimates a reader combines from the recent windows.

A window is a set of counters (`Store.add_counters`: increments commute, so every instance adds its own attempts
without coordination), keyed `stats#<model>/<deployment>#<window start>`. A reader weighs each window by its age
(half-life) and sums; rates and means are ratios of those sums, quantiles come from the summed TTFT histogram.
Field names are short: they are DynamoDB attribute names, and the item stays under 1 KB (one write unit)."""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

# The TTFT histogram: geometric buckets (25 ms .. about 55 s, ratio 1.5); bucket i counts values up to
# TTFT_BUCKETS[i], the last one everything above.
TTFT_BUCKETS: tuple[float, ...] = tuple(0.025 * 1.5 ** i for i in range(20))
TTFT_FIELDS: tuple[str, ...] = tuple(f"t{i}" for i in range(len(TTFT_BUCKETS) + 1))
# Below this many first tokens in the windows read there is no quantile; below one attempt, no rate.
QUANTILE_MIN_SAMPLES = 5
# Failure kinds (providers.base.ErrorKind values) that count toward the rate-limit rate.
RATE_LIMIT_KINDS = frozenset({"rate_limited", "quota"})
# Failures that say something about the request, not the deployment: in the error rate, never toward the breaker.
REQUEST_FAULTS = frozenset({"bad_request", "context_length", "content_filter", "prefill_rejected"})

ATTEMPTS = "n"  # attempts that ended (ok or failed)
FAILURES = "f"  # of them failed, any kind
DEPLOYMENT_FAULTS = "df"  # of them failed for a reason that is the deployment's (not in REQUEST_FAULTS)
RATE_LIMITED = "rl"  # of them refused with 429 / quota
SUCCESSES = "ok"
OUTPUT_TOKENS = "out"  # output tokens of the successful attempts (mean output tokens)
SIZED = "ni"  # attempts that report input tokens
INPUT_TOKENS = "in"
CACHED_INPUT_TOKENS = "ci"
STREAM_TOKENS = "st"  # output tokens of attempts that streamed for a measured time after their first token ...
STREAM_SECONDS = "ss"  # ... and that time: tokens per second is st / ss


def window_start(t: float, width: float) -> float:
    return math.floor(t / width) * width


def window_key(model: str, deployment: str, start: float) -> str:
    return f"stats#{model}/{deployment}#{int(start)}"


def attempt_fields(*, failure_kind: str | None, ttft: float | None = None, output_tokens: int = 0,
                   output_seconds: float | None = None, input_tokens: int = 0,
                   cached_input_tokens: int = 0) -> dict[str, float]:
    """The increments one finished attempt adds to its window (`failure_kind` None: it succeeded)."""
    fields: dict[str, float] = {ATTEMPTS: 1.0}
    if failure_kind is None:
        fields[SUCCESSES] = 1.0
        fields[OUTPUT_TOKENS] = float(output_tokens)
        if output_seconds is not None and output_seconds > 0 and output_tokens > 0:
            fields[STREAM_TOKENS] = float(output_tokens)
            fields[STREAM_SECONDS] = output_seconds
    else:
        fields[FAILURES] = 1.0
        if failure_kind not in REQUEST_FAULTS:
            fields[DEPLOYMENT_FAULTS] = 1.0
        if failure_kind in RATE_LIMIT_KINDS:
            fields[RATE_LIMITED] = 1.0
    if ttft is not None:
        fields[TTFT_FIELDS[bisect.bisect_left(TTFT_BUCKETS, ttft)]] = 1.0
    if input_tokens > 0:
        fields[SIZED] = 1.0
        fields[INPUT_TOKENS] = float(input_tokens)
        fields[CACHED_INPUT_TOKENS] = float(cached_input_tokens)
    return fields


def merge(into: dict[str, float], fields: Mapping[str, float]) -> None:
    for name, value in fields.items():
        into[name] = into.get(name, 0.0) + value


@dataclass(frozen=True, slots=True)
class Estimates:
    """Decayed figures of one deployment over the windows read. None: not enough observations to say."""

    ttft_p50: float | None
    ttft_p95: float | None
    tokens_per_s: float | None
    error_rate: float | None
    rate_limit_rate: float | None
    cache_hit_rate: float | None
    mean_input_tokens: float | None
    mean_output_tokens: float | None
    samples: float  # decayed attempts
    attempts: float  # attempts in the windows read, not decayed
    failures: float  # failures that are the deployment's (not REQUEST_FAULTS) in the windows read, not decayed
    last_window: float | None  # start of the newest window with an attempt (epoch seconds)


EMPTY = Estimates(None, None, None, None, None, None, None, None, 0.0, 0.0, 0.0, None)


def combine(windows: Iterable[tuple[float, Mapping[str, float]]], *, now: float, width: float,
            half_life: float) -> Estimates:
    """Sum the windows (start, fields), each weighed by 0.5 ** (age / half_life), age measured from the window's
    middle (the current window weighs 1)."""
    decayed: dict[str, float] = {}
    raw: dict[str, float] = {}
    last: float | None = None
    for start, fields in windows:
        if not fields:
            continue
        weight = 0.5 ** (max(0.0, now - start - width / 2) / half_life)
        for name, value in fields.items():
            decayed[name] = decayed.get(name, 0.0) + weight * value
            raw[name] = raw.get(name, 0.0) + value
        if fields.get(ATTEMPTS) and (last is None or start > last):
            last = start
    if not raw.get(ATTEMPTS) and not raw.get(SIZED):
        return EMPTY

    def ratio(num: str, den: str) -> float | None:
        d = decayed.get(den, 0.0)
        return decayed.get(num, 0.0) / d if raw.get(den) and d > 0 else None

    histogram = [decayed.get(name, 0.0) for name in TTFT_FIELDS]
    enough = sum(raw.get(name, 0.0) for name in TTFT_FIELDS) >= QUANTILE_MIN_SAMPLES
    return Estimates(
        ttft_p50=quantile(histogram, 0.5) if enough else None,
        ttft_p95=quantile(histogram, 0.95) if enough else None,
        tokens_per_s=ratio(STREAM_TOKENS, STREAM_SECONDS),
        error_rate=ratio(FAILURES, ATTEMPTS),
        rate_limit_rate=ratio(RATE_LIMITED, ATTEMPTS),
        cache_hit_rate=ratio(CACHED_INPUT_TOKENS, INPUT_TOKENS),
        mean_input_tokens=ratio(INPUT_TOKENS, SIZED),
        mean_output_tokens=ratio(OUTPUT_TOKENS, SUCCESSES),
        samples=decayed.get(ATTEMPTS, 0.0),
        attempts=raw.get(ATTEMPTS, 0.0),
        failures=raw.get(DEPLOYMENT_FAULTS, 0.0),
        last_window=last,
    )


def quantile(weights: Sequence[float], q: float) -> float | None:
    """The q-quantile of a histogram over TTFT_BUCKETS, interpolated within its bucket (the last bucket, open
    above, reads as its lower bound)."""
    total = sum(weights)
    if total <= 0:
        return None
    target = q * total
    cumulative = 0.0
    for i, w in enumerate(weights):
        if w > 0 and cumulative + w >= target:
            if i == len(TTFT_BUCKETS):
                return TTFT_BUCKETS[-1]
            low = TTFT_BUCKETS[i - 1] if i else 0.0
            return low + (target - cumulative) / w * (TTFT_BUCKETS[i] - low)
        cumulative += w
    return TTFT_BUCKETS[-1]
