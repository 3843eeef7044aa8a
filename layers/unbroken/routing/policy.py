"""Which deployment to try first: the ranked list of a model's deployments is the attempt order.

Ranking reads the configuration and the live health (`routing/health.py`); it never calls a provider. Deployments
with an open circuit go last (still a last resort); then by `strategy`: `ordered` (as configured, the default),
`cost` (cheapest list price first) or `latency` (lowest observed time to first token first)."""

from __future__ import annotations

from unbroken.config import Deployment, PublicModel
from unbroken.routing.health import HealthBoard


def rank(model: PublicModel, board: HealthBoard, strategy: str = "ordered") -> list[Deployment]:
    candidates = list(model.enabled_deployments)
    if strategy == "cost":
        candidates.sort(key=lambda d: d.price.input + 3 * d.price.output)
    elif strategy == "latency":
        candidates.sort(key=lambda d: board.of(model.name, d.name).ttft_ewma or 0.0)
    # Stable: open circuits move to the back but stay available as a last resort.
    return sorted(candidates, key=lambda d: board.view(model.name, d.name).circuit == "open")
