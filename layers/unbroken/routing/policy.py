"""Which deployment to try first: the routing policy and the health it reads.

Health is kept per process (an in-memory circuit breaker and latency averages per deployment); a Lambda instance
learns from its own traffic. Ranking: deployments with an open circuit go last; then by the model's `strategy`:
`ordered` (as configured, the default), `cost` (cheapest expected price first) or `latency` (lowest observed time
to first token first)."""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from unbroken.config import Deployment, PublicModel

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

    def record_success(self, model: str, deployment: str, ttft: float | None) -> None:
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

    def record_failure(self, model: str, deployment: str) -> None:
        h = self.of(model, deployment)
        h.consecutive_failures += 1
        if h.consecutive_failures >= FAILURES_TO_OPEN:
            h.open_until = self._now() + OPEN_SECONDS

    def rank(self, model: PublicModel, strategy: str = "ordered") -> list[Deployment]:
        now = self._now()
        candidates = list(model.enabled_deployments)
        if strategy == "cost":
            candidates.sort(key=lambda d: d.price.input + 3 * d.price.output)
        elif strategy == "latency":
            candidates.sort(key=lambda d: self.of(model.name, d.name).ttft_ewma or 0.0)
        # Stable: open circuits move to the back but stay available as a last resort.
        return sorted(candidates, key=lambda d: self.of(model.name, d.name).is_open(now))
