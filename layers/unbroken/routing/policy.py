"""Which deployment to try first: the routing policy and the health it reads.

Health is kept per process (an in-memory circuit breaker and latency averages per deployment); a Lambda instance
learns from its own traffic. Ranking: deployments with an open circuit go last; then by the model's `strategy`:
`ordered` (as configured, the default), `cost` (cheapest expected price first) or `latency` (lowest observed time
to first token first)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from unbroken.config import Deployment, PublicModel

# Circuit breaker: this many consecutive failures open the circuit for `OPEN_SECONDS`; then one trial request.
FAILURES_TO_OPEN = 3
OPEN_SECONDS = 30.0
EWMA_WEIGHT = 0.2


@dataclass(slots=True)
class DeploymentHealth:
    consecutive_failures: int = 0
    open_until: float = 0.0
    ttft_ewma: float | None = None

    def is_open(self, now: float) -> bool:
        return now < self.open_until


class HealthBoard:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._health: dict[str, DeploymentHealth] = {}
        self._now = clock

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
