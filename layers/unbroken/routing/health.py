"""What the router knows of each deployment's live behaviour: circuit breaker, time to first token, throughput, error
and rate-limit rates, cache hits; and each model's hedge budget.

The attempt loop reports every attempt (`record_success`, `record_failure`); routing reads `view()` (a `LiveView`,
the one shape policies and the operator health endpoint see). Kept per process for now."""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# Circuit breaker: this many consecutive failures open the circuit for `OPEN_SECONDS`; then one trial request.
FAILURES_TO_OPEN = 3
OPEN_SECONDS = 30.0
EWMA_WEIGHT = 0.2

# The live TTFT quantile: a decayed histogram over geometric buckets (25 ms .. about 55 s, ratio 1.5). Every
# observation first multiplies the weights by `QUANTILE_DECAY`, so the estimate follows roughly the last 50 first
# tokens; below `QUANTILE_MIN_SAMPLES` observations there is no estimate.
TTFT_BUCKETS: tuple[float, ...] = tuple(0.025 * 1.5 ** i for i in range(20))
QUANTILE_DECAY = 0.98
QUANTILE_MIN_SAMPLES = 5
# The hedge budget of a model decays by this per request: its shares are over roughly the last 100 requests.
HEDGE_DECAY = 0.99


@dataclass(slots=True)
class DecayedQuantile:
    """A quantile of recent observations, O(buckets) per update and per read, no samples kept."""

    weights: list[float] = field(default_factory=lambda: [0.0] * (len(TTFT_BUCKETS) + 1))
    samples: int = 0

    def add(self, value: float) -> None:
        weights = self.weights
        for i, w in enumerate(weights):
            weights[i] = w * QUANTILE_DECAY
        weights[bisect.bisect_left(TTFT_BUCKETS, value)] += 1.0
        self.samples += 1

    def quantile(self, q: float) -> float | None:
        """The q-quantile, interpolated within its bucket (the last bucket reads as its lower bound)."""
        if self.samples < QUANTILE_MIN_SAMPLES:
            return None
        target = q * sum(self.weights)
        cumulative = 0.0
        for i, w in enumerate(self.weights):
            if w > 0 and cumulative + w >= target:
                if i == len(TTFT_BUCKETS):
                    return TTFT_BUCKETS[-1]
                low = TTFT_BUCKETS[i - 1] if i else 0.0
                return low + (target - cumulative) / w * (TTFT_BUCKETS[i] - low)
            cumulative += w
        return TTFT_BUCKETS[-1]


@dataclass(slots=True)
class HedgeBudget:
    """How much of a model's recent traffic was hedged: decayed counts of requests and hedges, and decayed spend
    of all attempts and of the hedges that lost."""

    requests: float = 0.0
    hedged: float = 0.0
    cost: float = 0.0
    hedge_cost: float = 0.0

    def note_request(self) -> None:
        self.requests = self.requests * HEDGE_DECAY + 1.0
        self.hedged *= HEDGE_DECAY
        self.cost *= HEDGE_DECAY
        self.hedge_cost *= HEDGE_DECAY

    def allows(self, max_share: float, max_cost_share: float) -> bool:
        """May the request being served be hedged? (`requests` already counts it.)"""
        if self.hedged >= max_share * self.requests:
            return False
        return self.cost <= 0 or self.hedge_cost < max_cost_share * self.cost


@dataclass(frozen=True, slots=True)
class LiveView:
    """One deployment's live state as routing sees it. None: not enough observations to say."""

    circuit: str  # closed | open | half_open
    ttft_p50: float | None  # seconds
    ttft_p95: float | None
    tokens_per_s: float | None  # output tokens per second after the first token
    error_rate: float | None  # share of recent attempts that failed (any kind)
    rate_limit_rate: float | None  # share of recent attempts refused with 429 / quota
    cache_hit_rate: float | None  # share of recent input tokens read from the provider's prompt cache
    mean_input_tokens: float | None
    mean_output_tokens: float | None
    samples: float  # (decayed) number of attempts behind the figures


@dataclass(slots=True)
class DeploymentHealth:
    consecutive_failures: int = 0
    open_until: float = 0.0
    ttft_ewma: float | None = None
    ttft_quantile: DecayedQuantile = field(default_factory=DecayedQuantile)

    def is_open(self, now: float) -> bool:
        return now < self.open_until


class HealthBoard:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._health: dict[str, DeploymentHealth] = {}
        self._now = clock
        self._hedges: dict[str, HedgeBudget] = {}

    def of(self, model: str, deployment: str) -> DeploymentHealth:
        key = f"{model}/{deployment}"
        health = self._health.get(key)
        if health is None:
            health = self._health[key] = DeploymentHealth()
        return health

    def record_success(
        self,
        model: str,
        deployment: str,
        ttft: float | None,
        *,
        output_tokens: int = 0,
        output_seconds: float | None = None,
        input_tokens: int = 0,
        cached_input_tokens: int = 0,
    ) -> None:
        """An attempt that finished well: its first-token time, and the tokens it streamed in `output_seconds`
        after its first token."""
        h = self.of(model, deployment)
        h.consecutive_failures = 0
        h.open_until = 0.0
        if ttft is not None:
            h.ttft_ewma = ttft if h.ttft_ewma is None else (1 - EWMA_WEIGHT) * h.ttft_ewma + EWMA_WEIGHT * ttft
            h.ttft_quantile.add(ttft)

    def ttft_p95(self, model: str, deployment: str) -> float | None:
        """The deployment's live p95 time to first token (seconds), None until enough first tokens were seen."""
        return self.of(model, deployment).ttft_quantile.quantile(0.95)

    def hedge_budget(self, model: str) -> HedgeBudget:
        budget = self._hedges.get(model)
        if budget is None:
            budget = self._hedges[model] = HedgeBudget()
        return budget

    def record_failure(self, model: str, deployment: str, kind: str = "") -> None:
        """An attempt that failed; `kind` is its ErrorKind value (`rate_limit` counts toward the rate-limit rate)."""
        h = self.of(model, deployment)
        h.consecutive_failures += 1
        if h.consecutive_failures >= FAILURES_TO_OPEN:
            h.open_until = self._now() + OPEN_SECONDS

    def view(self, model: str, deployment: str) -> LiveView:
        h = self.of(model, deployment)
        now = self._now()
        if h.is_open(now):
            circuit = "open"
        else:
            circuit = "half_open" if h.consecutive_failures >= FAILURES_TO_OPEN else "closed"
        return LiveView(
            circuit=circuit,
            ttft_p50=h.ttft_quantile.quantile(0.5),
            ttft_p95=h.ttft_quantile.quantile(0.95),
            tokens_per_s=None,
            error_rate=None,
            rate_limit_rate=None,
            cache_hit_rate=None,
            mean_input_tokens=None,
            mean_output_tokens=None,
            samples=float(h.ttft_quantile.samples),
        )
