"""The constraints of a model's routing on one request: a region allowlist, the capabilities the request needs, a
maximum expected price. A deployment that fails one is not tried; when none is left, the request gets an error
that says why (a 400 for what the request asks, a 503 when only the configuration's regions are left off)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from unbroken.config import CapabilityName, Deployment, RoutingSettings
from unbroken.errors import Failure, invalid
from unbroken.routing.profile import NEED_PARAMS, RequestProfile


class _Costed(Protocol):
    @property
    def deployment(self) -> Deployment: ...

    @property
    def cost(self) -> float | None: ...


def why_not(item: _Costed, profile: RequestProfile, routing: RoutingSettings) -> str | None:
    """Why this deployment may not serve the request (None: it may)."""
    d = item.deployment
    if routing.regions is not None and d.region not in routing.regions:
        return f"region {d.region or 'unset'} is not in routing.regions"
    lacking = [need for need in profile.needs if d.capabilities.lacks(need)]
    if lacking:
        return "no " + ", no ".join(lacking)
    cap = routing.max_price_per_request_usd
    if cap is not None:
        if item.cost is None:
            return "no known price, and routing.max_price_per_request_usd is set"
        if item.cost > cap:
            return f"expected ${item.cost:.6f}, over routing.max_price_per_request_usd ${cap:g}"
    return None


def refusal(model: str, excluded: Sequence[tuple[str, str]], profile: RequestProfile,
            routing: RoutingSettings) -> Failure:
    """The error for a request every deployment was left out for."""
    detail = "; ".join(f"{name}: {why}" for name, why in excluded)
    if all(why.startswith("region ") for _, why in excluded):
        return Failure("unavailable", f"No deployment of model '{model}' in the allowed regions "
                       f"({', '.join(routing.regions or [])}) is on ({detail}).", code="no_deployment_in_region")
    needs: list[CapabilityName] = [n for n in profile.needs if any(f"no {n}" in why for _, why in excluded)]
    if needs and all(why.startswith("no ") and not why.startswith("no known") for _, why in excluded):
        return invalid(f"No deployment of model '{model}' can serve this request: it needs {', '.join(needs)} "
                       f"({detail}).", param=NEED_PARAMS[needs[0]], code="no_capable_deployment")
    return invalid(f"No deployment of model '{model}' can serve this request ({detail}).",
                   code="no_deployment_can_serve")
