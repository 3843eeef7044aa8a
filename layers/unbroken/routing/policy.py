"""Which deployment to try first, and whether to wait for a failed one or move on: the routing policies.

`plan()` ranks a model's deployments for one request (docs/routing.md): the constraints leave out what may not serve
it (`constraints.py`), the policy orders the rest (`cheapest` by the request's expected cost, `fastest` by its
expected latency, `balanced` by a weighted score of both, `weighted` by a static split, `ordered` as configured),
deployments whose live p95 time to first token misses the objective go after those that meet it, and open circuits
go last (still a last resort). The ranked list is the attempt order; the `Ranking` also explains itself and answers
the attempt loop's question after a retryable failure (`wait_or_move`).

Ranking reads the configuration and the live view (`health.LiveView`); it never calls a provider."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from unbroken.config import POLICY_NAMES, Deployment, PolicyName, PublicModel, RoutingSettings
from unbroken.errors import Failure, invalid
from unbroken.routing.affinity import Predecessor
from unbroken.routing.constraints import refusal, why_not
from unbroken.routing.cost import expected_cost, expected_latency, expected_output_tokens
from unbroken.routing.health import HealthBoard, LiveView
from unbroken.routing.profile import RequestProfile

POLICY_HEADER = "X-Unbroken-Policy"


def parse_policy(value: str | None) -> PolicyName | None:
    """The policy a request asks for in its header (None: the model's own); an unknown one is a 400."""
    if value is None or not value.strip():
        return None
    name = value.strip().lower()
    for known in POLICY_NAMES:
        if name == known:
            return known
    raise invalid(f"Unknown routing policy {value.strip()!r} in {POLICY_HEADER}; known: {', '.join(POLICY_NAMES)}.",
                  param=POLICY_HEADER, code="unknown_routing_policy")


@dataclass(frozen=True, slots=True)
class Scored:
    """One deployment as the policy sees it for this request."""

    deployment: Deployment
    view: LiveView
    cost: float | None  # expected USD of this request; None: no known price
    latency: float | None  # expected seconds to the whole answer; None: no live TTFT yet
    cache_hit: float  # share of the input expected from the prompt cache
    score: float | None = None  # `balanced`: lower is better; `weighted`: the share
    notes: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.deployment.name

    def noted(self, note: str) -> Scored:
        return replace(self, notes=(*self.notes, note))


@dataclass(frozen=True, slots=True)
class WaitDecision:
    wait: bool
    reason: str


@dataclass(frozen=True, slots=True)
class _Bounds:
    """The ranges `balanced` normalises cost and latency over (min, max of the known values)."""

    cost: tuple[float, float] | None
    latency: tuple[float, float] | None


def _normalised(value: float | None, bounds: tuple[float, float] | None) -> float:
    if value is None:
        return 1.0  # unknown counts as the worst
    if bounds is None or bounds[1] <= bounds[0]:
        return 0.0
    return (value - bounds[0]) / (bounds[1] - bounds[0])


def _balanced(cost: float | None, latency: float | None, bounds: _Bounds, routing: RoutingSettings) -> float:
    w = routing.balance
    return (w.cost * _normalised(cost, bounds.cost) + w.latency * _normalised(latency, bounds.latency)) / (
        w.cost + w.latency)


@dataclass(frozen=True)
class Ranking:
    """The ranked deployments of one request, why, and what was left out."""

    model: str
    policy: PolicyName
    source: Literal["config", "header"]
    scored: tuple[Scored, ...]  # the attempt order
    excluded: tuple[tuple[str, str], ...]
    reason: str
    routing: RoutingSettings
    profile: RequestProfile
    output_tokens: int
    predecessor: Predecessor | None = None
    refusal: Failure | None = None  # set when nothing is left to try
    bounds: _Bounds = field(default_factory=lambda: _Bounds(None, None))

    @property
    def candidates(self) -> tuple[Deployment, ...]:
        return tuple(s.deployment for s in self.scored)

    def of(self, name: str) -> Scored | None:
        return next((s for s in self.scored if s.name == name), None)

    def wait_or_move(self, failed: Deployment, wait_s: float, alternative: Deployment) -> WaitDecision:
        """After a retryable failure with a hint of `wait_s` seconds (Retry-After, or the backoff of a transient
        5xx): retry `failed` after it, or move on to `alternative` (the next ranked one) at once?"""
        a, b = self.of(failed.name), self.of(alternative.name)
        if a is None or b is None:
            return WaitDecision(False, "not ranked for this request")
        if wait_s > self.routing.max_wait_s:
            return WaitDecision(False, f"the wait ({wait_s:.2f} s) is over routing.max_wait_s "
                                       f"({self.routing.max_wait_s:g} s)")
        if self.policy == "cheapest":
            if a.cost is None or b.cost is None:
                return WaitDecision(False, "cheapest: a price is unknown")
            ratio = b.cost / a.cost if a.cost > 0 else (float("inf") if b.cost > 0 else 1.0)
            if ratio >= self.routing.wait_price_ratio:
                return WaitDecision(True, f"cheapest: {b.name} would cost {ratio:.1f}x as much "
                                          f"(>= {self.routing.wait_price_ratio:g}x): waiting {wait_s:.2f} s")
            return WaitDecision(False, f"cheapest: {b.name} costs only {ratio:.1f}x as much "
                                       f"(< {self.routing.wait_price_ratio:g}x)")
        if self.policy == "fastest":
            if a.latency is not None and b.latency is not None and a.latency + wait_s < b.latency:
                return WaitDecision(True, f"fastest: {a.name} after {wait_s:.2f} s is still expected sooner "
                                          f"({(a.latency + wait_s) * 1000:.0f} ms < {b.latency * 1000:.0f} ms)")
            return WaitDecision(False, "fastest: moving on at once")
        if self.policy == "balanced":
            later = None if a.latency is None else a.latency + wait_s
            waited = _balanced(a.cost, later, self.bounds, self.routing)
            moved = _balanced(b.cost, b.latency, self.bounds, self.routing)
            if waited < moved:
                return WaitDecision(True, f"balanced: {a.name} after {wait_s:.2f} s scores {waited:.3f} < "
                                          f"{b.name} {moved:.3f}")
            return WaitDecision(False, f"balanced: {b.name} scores {moved:.3f} <= {a.name} after the wait "
                                       f"{waited:.3f}")
        return WaitDecision(False, f"{self.policy}: moving on in the ranked order")

    def summary(self) -> dict[str, Any]:
        """For the `response attempts` log line: always there, small."""
        return {"policy": self.policy, "source": self.source, "ranked": [s.name for s in self.scored],
                "excluded": [name for name, _ in self.excluded], "reason": self.reason}

    def explain(self) -> dict[str, Any]:
        """The `router.routing` field of a response whose client sent `X-Unbroken-Explain: true`."""
        return {
            "policy": self.policy, "source": self.source, "reason": self.reason,
            "input_tokens": self.profile.input_tokens, "expected_output_tokens": self.output_tokens,
            "needs": list(self.profile.needs),
            "ranked": [{
                "deployment": s.name,
                "expected_cost_usd": None if s.cost is None else round(s.cost, 8),
                "expected_latency_ms": None if s.latency is None else round(s.latency * 1000, 1),
                "ttft_p95_ms": None if s.view.ttft_p95 is None else round(s.view.ttft_p95 * 1000, 1),
                "cache_hit": round(s.cache_hit, 3), "score": None if s.score is None else round(s.score, 4),
                "circuit": s.view.circuit, "notes": list(s.notes)} for s in self.scored],
            "excluded": [{"deployment": name, "why": why} for name, why in self.excluded],
            "affinity": None if self.predecessor is None else {
                "deployment": self.predecessor.deployment, "via": self.predecessor.via,
                "shared_tokens": self.predecessor.shared_tokens},
        }


def _unit(response_id: str, salt: str) -> float:
    """A number in [0, 1) fixed by the response id: the same response always draws the same."""
    return int(hashlib.sha256(f"{salt}:{response_id}".encode()).hexdigest()[:13], 16) / 16 ** 13


def plan(model: PublicModel, board: HealthBoard, profile: RequestProfile, *, policy: PolicyName | None = None,
         response_id: str = "", predecessor: Predecessor | None = None) -> Ranking:
    """Rank the model's deployments for one request."""
    routing = model.routing
    name: PolicyName = policy or routing.policy
    deployments = model.enabled_deployments
    views = {d.name: board.view(model.name, d.name) for d in deployments}
    output_tokens = expected_output_tokens(views.values(), profile, routing)
    if predecessor is not None and (not routing.cache_affinity or predecessor.deployment not in views):
        predecessor = None
    scored: list[Scored] = []
    affinity_notes: list[str] = []
    for d in deployments:
        view = views[d.name]
        hit = view.cache_hit_rate or 0.0
        notes: list[str] = []
        if predecessor is not None and predecessor.deployment == d.name:
            if view.circuit == "open":
                affinity_notes.append(f"affinity: {d.name} served the previous turn, but its circuit is open")
            elif profile.input_tokens > 0:
                # The hit is only as likely as the attempt succeeding there: a failure moves the request to a
                # deployment that has none of the prefix cached.
                shared = min(1.0, predecessor.shared_tokens / profile.input_tokens) * (1.0 - (view.error_rate or 0.0))
                if shared > hit:
                    hit = shared
                    notes.append(f"previous turn here: ~{predecessor.shared_tokens} input tokens expected from "
                                 f"its prompt cache")
        if view.cache_hit_rate:
            notes.append(f"observed cache-hit rate {view.cache_hit_rate:.0%}")
        cost = expected_cost(d, profile, output_tokens, hit) if d.price_known else None
        scored.append(Scored(d, view, cost, expected_latency(view, output_tokens), hit, notes=tuple(notes)))
    kept: list[Scored] = []
    excluded: list[tuple[str, str]] = []
    for s in scored:
        why = why_not(s, profile, routing)
        if why is None:
            kept.append(s)
        else:
            excluded.append((s.name, why))
    source: Literal["config", "header"] = "config" if policy is None else "header"
    if not kept:
        failure = refusal(model.name, excluded, profile, routing)
        return Ranking(model.name, name, source, (), tuple(excluded), failure.message, routing, profile,
                       output_tokens, predecessor, failure)
    bounds = _bounds(kept)
    ordered, reason = _order(name, kept, routing, bounds, response_id)
    ordered, objective_note = _ttft_objective(ordered, routing)
    ordered = [s for s in ordered if s.view.circuit != "open"] + [
        s.noted("circuit open: last resort") for s in ordered if s.view.circuit == "open"]
    reason += objective_note + _affinity_reason(ordered, predecessor, affinity_notes)
    return Ranking(model.name, name, source, tuple(ordered), tuple(excluded), reason, routing, profile,
                   output_tokens, predecessor, bounds=bounds)


def _bounds(kept: Sequence[Scored]) -> _Bounds:
    costs = [s.cost for s in kept if s.cost is not None]
    latencies = [s.latency for s in kept if s.latency is not None]
    return _Bounds((min(costs), max(costs)) if costs else None,
                   (min(latencies), max(latencies)) if latencies else None)


def _order(policy: PolicyName, kept: list[Scored], routing: RoutingSettings, bounds: _Bounds,
           response_id: str) -> tuple[list[Scored], str]:
    """The policy's order (stable: ties keep the configured order) and the sentence that says why."""
    if policy == "cheapest":
        ranked = sorted(kept, key=lambda s: (s.cost is None, s.cost or 0.0))
        first = ranked[0]
        if first.cost is None:
            return ranked, "cheapest: no deployment has a known price; configured order"
        reason = f"cheapest: {first.name} expected ${first.cost:.6f}"
        if len(ranked) > 1 and ranked[1].cost is not None:
            reason += f", then {ranked[1].name} ${ranked[1].cost:.6f}"
        return ranked, reason
    if policy == "fastest":
        ranked = sorted(kept, key=lambda s: (s.latency is None, s.latency or 0.0))
        ranked, explored = _explore(ranked, routing, response_id)
        first = ranked[0]
        if explored:
            return ranked, f"fastest: exploring {first.name}, which has no live latency yet"
        if first.latency is None:
            return ranked, "fastest: no live latency yet; configured order"
        return ranked, f"fastest: {first.name} expected {first.latency * 1000:.0f} ms to the whole answer"
    if policy == "balanced":
        scored = [replace(s, score=_balanced(s.cost, s.latency, bounds, routing)) for s in kept]
        ranked = sorted(scored, key=lambda s: s.score or 0.0)
        ranked, explored = _explore(ranked, routing, response_id)
        first = ranked[0]
        if explored:
            return ranked, f"balanced: exploring {first.name}, which has no live latency yet"
        return ranked, (f"balanced: {first.name} scores {first.score:.3f} (cost weight {routing.balance.cost:g}, "
                        f"latency weight {routing.balance.latency:g}; 0 is best)")
    if policy == "weighted":
        shares = {s.name: (routing.weights.get(s.name, 0.0) if routing.weights else 1.0) for s in kept}
        total = sum(shares.values())
        if total <= 0:
            return kept, "weighted: no deployment left with a weight; configured order"
        draw = _unit(response_id, "weighted") * total
        chosen = kept[-1]
        for s in kept:
            draw -= shares[s.name]
            if draw < 0 and shares[s.name] > 0:
                chosen = s
                break
        ranked = [replace(s, score=shares[s.name] / total) for s in [chosen, *(s for s in kept if s is not chosen)]]
        return ranked, f"weighted: {chosen.name} drawn with a share of {shares[chosen.name] / total:.0%}"
    return kept, "ordered: as configured"


def _explore(ranked: list[Scored], routing: RoutingSettings, response_id: str) -> tuple[list[Scored], bool]:
    """For a share of requests, the first deployment with no live latency yet goes first, so that it gets
    measured (otherwise it would only ever serve as failover)."""
    unknown = [s for s in ranked if s.latency is None and s.view.circuit != "open"]
    if not unknown or len(unknown) == len(ranked) or _unit(response_id, "explore") >= routing.explore_share:
        return ranked, False
    first = unknown[0].noted("exploring: no live latency yet")
    return [first, *(s for s in ranked if s is not unknown[0])], True


def _ttft_objective(ranked: list[Scored], routing: RoutingSettings) -> tuple[list[Scored], str]:
    """Deployments whose live p95 TTFT is above the objective go after those that meet it (unknown meets it)."""
    objective = routing.ttft_objective_ms
    if objective is None:
        return ranked, ""
    limit = objective / 1000.0
    meet: list[Scored] = []
    late: list[Scored] = []
    for s in ranked:
        p95 = s.view.ttft_p95
        if p95 is not None and p95 > limit:
            late.append(s.noted(f"ttft p95 {p95 * 1000:.0f} ms over the objective {objective:g} ms"))
        else:
            meet.append(s)
    if not late:
        return ranked, ""
    return meet + late, f"; after those meeting ttft_objective_ms {objective:g}: {', '.join(s.name for s in late)}"


def _affinity_reason(ranked: list[Scored], predecessor: Predecessor | None, notes: list[str]) -> str:
    if predecessor is None:
        return ""
    if notes:
        return "; " + "; ".join(notes)
    first = ranked[0].name if ranked else None
    if first == predecessor.deployment:
        return f"; affinity: {first} served the previous turn and stays first with its prompt cache"
    return (f"; affinity: {predecessor.deployment} served the previous turn, but even with its prompt cache "
            f"{first} ranks first")
