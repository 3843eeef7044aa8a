"""`GET /admin/v1/health`: every deployment's live state for an operator (README "Deployment health"): switched on
or off and why, circuit, TTFT p50/p95, tokens/s, error, rate-limit and cache-hit rates, samples, last updated.
Behind `require_admin` (an admin key locally; IAM on AWS). `/healthz` stays the liveness probe."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from unbroken.api.admin_auth import require_admin
from unbroken.routing.health import STALENESS_BOUND_SECONDS, HealthBoard, LiveView

router = APIRouter(dependencies=[Depends(require_admin)])


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _share(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _live(view: LiveView) -> dict[str, Any]:
    return {
        "circuit": view.circuit,
        "circuit_reason": view.circuit_reason or None,
        "probe_in_flight": view.probe_in_flight,
        "circuit_changed_at": view.circuit_changed_at,
        "ttft_p50_ms": _ms(view.ttft_p50),
        "ttft_p95_ms": _ms(view.ttft_p95),
        "tokens_per_s": None if view.tokens_per_s is None else round(view.tokens_per_s, 1),
        "error_rate": _share(view.error_rate),
        "rate_limit_rate": _share(view.rate_limit_rate),
        "cache_hit_rate": _share(view.cache_hit_rate),
        "mean_input_tokens": None if view.mean_input_tokens is None else round(view.mean_input_tokens, 1),
        "mean_output_tokens": None if view.mean_output_tokens is None else round(view.mean_output_tokens, 1),
        "samples": round(view.samples, 2),
        "last_attempt_window": view.last_attempt_window,
    }


@router.get("/admin/v1/health", response_model=None)
async def deployment_health(request: Request) -> dict[str, Any]:
    runtime = request.app.state.runtime
    board: HealthBoard = runtime.health
    if getattr(request.app.state, "admin_trusted", False):
        # The admin function (Mangum, no lifespan) runs no refresh loop and routes nothing: read the shared figures
        # for this answer instead.
        await board.observe((m.name, d.name) for m in runtime.config.models for d in m.enabled_deployments)
    models = []
    for model in runtime.config.models:
        deployments = []
        for d in model.deployments:
            entry: dict[str, Any] = {"name": d.name, "provider": d.provider, "model": d.model, "region": d.region,
                                     "enabled": d.enabled, "off_reason": d.off_reason}
            if d.enabled:
                entry.update(_live(board.view(model.name, d.name)))
            deployments.append(entry)
        models.append({"name": model.name, "served": bool(model.enabled_deployments), "deployments": deployments})
    return {
        "object": "router.health",
        "shared": board.shared,  # every instance's figures (a store), or this process's only
        "instance": board.instance,
        "updated_at": board.refreshed_at,  # the last refresh from the store (epoch seconds); null without one
        "staleness_bound_seconds": STALENESS_BOUND_SECONDS if board.shared else 0.0,
        "window_seconds": board.settings.window_seconds,
        "half_life_seconds": board.settings.half_life_seconds,
        "models": models,
    }
