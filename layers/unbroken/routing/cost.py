"""Expected cost and latency of one request on one deployment, from its price, the request's counted input, the
output the model's recent traffic suggests and the deployment's live view (`health.LiveView`)."""

from __future__ import annotations

from collections.abc import Iterable

from unbroken.config import Deployment, RoutingSettings
from unbroken.routing.health import LiveView
from unbroken.routing.profile import RequestProfile


def expected_output_tokens(views: Iterable[LiveView], profile: RequestProfile, routing: RoutingSettings) -> int:
    """The model's recent mean output (over its deployments, weighted by their samples), else the request's
    max_output_tokens, else the configured default; never above the request's max_output_tokens."""
    total = weight = 0.0
    for view in views:
        if view.mean_output_tokens is not None and view.samples > 0:
            total += view.mean_output_tokens * view.samples
            weight += view.samples
    if weight > 0:
        expected = max(1, round(total / weight))
    else:
        expected = profile.max_output_tokens or routing.default_output_tokens
    return min(expected, profile.max_output_tokens) if profile.max_output_tokens else expected


def expected_cost(deployment: Deployment, profile: RequestProfile, output_tokens: int, cache_hit: float) -> float:
    """USD: the uncached share of the input at the input price, the cached share (`cache_hit`, 0..1) at the cached
    price, the expected output at the output price."""
    price = deployment.price
    cached_rate = price.cached_input if price.cached_input is not None else price.input
    n = profile.input_tokens
    return (n * (1.0 - cache_hit) * price.input + n * cache_hit * cached_rate + output_tokens * price.output) / 1e6


def expected_latency(view: LiveView, output_tokens: int) -> float | None:
    """Seconds to the whole answer: the live median time to first token plus the expected output at the live
    output rate (only the first token's time when the rate is unknown). None when the TTFT is unknown."""
    if view.ttft_p50 is None:
        return None
    if view.tokens_per_s is None or view.tokens_per_s <= 0:
        return view.ttft_p50
    return view.ttft_p50 + output_tokens / view.tokens_per_s
