"""Ranking by each routing policy and constraint, on hand-made live views (routing/policy.py, constraints.py,
cost.py): the ranked list is the attempt order, and it says why."""

from __future__ import annotations

from typing import Any

import pytest

from unbroken.config import Deployment, PublicModel, RoutingSettings
from unbroken.errors import Failure
from unbroken.ir import GenerationRequest, ImagePart, Message, TextPart
from unbroken.routing.affinity import AffinityMemory, Predecessor
from unbroken.routing.health import LiveView
from unbroken.routing.policy import Ranking, parse_policy, plan
from unbroken.routing.profile import RequestProfile, needs_of


def view(*, circuit: str = "closed", p50: float | None = None, p95: float | None = None, tps: float | None = None,
         cache: float | None = None, mean_out: float | None = None, samples: float = 0.0,
         errors: float | None = None) -> LiveView:
    return LiveView(circuit=circuit, ttft_p50=p50, ttft_p95=p95, tokens_per_s=tps, error_rate=errors,
                    rate_limit_rate=None, cache_hit_rate=cache, mean_input_tokens=None, mean_output_tokens=mean_out,
                    samples=samples)


class Board:
    """A health board that answers with the views a test gives (unknown for the rest)."""

    def __init__(self, **views: LiveView) -> None:
        self.views = views

    def view(self, model: str, deployment: str) -> LiveView:
        del model
        return self.views.get(deployment, view())


def dep(name: str, price: tuple[float, float] | tuple[float, float, float] | None = (1.0, 2.0), **extra: Any
        ) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "provider": "openai_compatible", "model": name,
                           "base_url": "http://127.0.0.1:9/v1", **extra}
    if price is not None:
        out["price"] = {"input": price[0], "output": price[1], **({"cached_input": price[2]} if len(price) > 2
                                                                   else {})}
    return out


def model(*deps: dict[str, Any], **routing: Any) -> PublicModel:
    return PublicModel.model_validate({"name": "m", "deployments": list(deps), "routing": routing})


def profile(input_tokens: int = 1000, max_output: int | None = None, needs: tuple[Any, ...] = ()) -> RequestProfile:
    return RequestProfile(input_tokens=input_tokens, max_output_tokens=max_output, needs=needs, prefix_key=None)


def ranked(r: Ranking) -> list[str]:
    return [d.name for d in r.candidates]


def rank(m: PublicModel, board: Board | None = None, p: RequestProfile | None = None, **kw: Any) -> Ranking:
    return plan(m, board or Board(), p or profile(), **kw)  # type: ignore[arg-type]


# -- cheapest ---------------------------------------------------------------------------------------------------


def test_cheapest_is_the_expected_cost_of_this_request_not_the_list_price() -> None:
    # `long-in` has the cheaper output, `cheap-in` the cheaper input: which is cheaper depends on the request.
    m = model(dep("cheap-in", (0.5, 4.0)), dep("long-in", (2.0, 1.0)), policy="cheapest", default_output_tokens=100)
    assert ranked(rank(m, p=profile(input_tokens=10_000))) == ["cheap-in", "long-in"]
    assert ranked(rank(m, p=profile(input_tokens=10))) == ["long-in", "cheap-in"]
    r = rank(m, p=profile(input_tokens=10_000))
    first = r.of("cheap-in")
    assert first is not None and first.cost == pytest.approx((10_000 * 0.5 + 100 * 4.0) / 1e6)
    assert r.reason.startswith("cheapest: cheap-in expected $0.005400")


def test_cheapest_expects_the_models_recent_output_capped_by_max_output_tokens() -> None:
    m = model(dep("a", (1.0, 10.0)), dep("b", (2.0, 1.0)), policy="cheapest")
    # recent answers are long (mean 2000 output tokens): the cheap output wins
    board = Board(a=view(mean_out=2000, samples=10), b=view(mean_out=2000, samples=10))
    r = rank(m, board, profile(input_tokens=1000))
    assert r.output_tokens == 2000 and ranked(r) == ["b", "a"]
    # ... unless the request caps its output
    r = rank(m, board, profile(input_tokens=1000, max_output=10))
    assert r.output_tokens == 10 and ranked(r) == ["a", "b"]
    # no recent traffic: the configured default
    assert rank(m, Board(), profile()).output_tokens == 256


def test_observed_cache_hit_rate_feeds_cheapest() -> None:
    # `cached` lists dearer input, but half its recent input tokens came from its cache at a tenth of the price
    m = model(dep("plain", (1.0, 1.0)), dep("cached", (1.5, 1.0, 0.15)), policy="cheapest",
              default_output_tokens=10)
    assert ranked(rank(m, Board(), profile(10_000))) == ["plain", "cached"]
    r = rank(m, Board(cached=view(cache=0.5)), profile(10_000))
    assert ranked(r) == ["cached", "plain"]
    scored = r.of("cached")
    assert scored is not None and scored.cache_hit == 0.5
    assert scored.cost == pytest.approx((5000 * 1.5 + 5000 * 0.15 + 10 * 1.0) / 1e6)


def test_a_deployment_without_a_known_price_goes_after_the_priced_ones() -> None:
    m = model(dep("unpriced", None), dep("priced", (5.0, 5.0)), policy="cheapest")
    r = rank(m)
    assert ranked(r) == ["priced", "unpriced"]
    unpriced = r.of("unpriced")
    assert unpriced is not None and unpriced.cost is None


# -- fastest ----------------------------------------------------------------------------------------------------


def test_fastest_is_ttft_plus_the_expected_output_at_the_live_rate() -> None:
    # `quick-start` starts sooner but streams slowly: for a long answer `steady` is done first
    m = model(dep("quick-start"), dep("steady"), policy="fastest", default_output_tokens=1000)
    board = Board(**{"quick-start": view(p50=0.1, tps=20), "steady": view(p50=0.5, tps=200)})
    r = rank(m, board, profile(max_output=1000))
    assert ranked(r) == ["steady", "quick-start"]
    assert r.of("steady").latency == pytest.approx(0.5 + 1000 / 200)  # type: ignore[union-attr]
    assert ranked(rank(m, board, profile(max_output=5))) == ["quick-start", "steady"]


def test_fastest_ranks_unknown_latency_after_known_and_explores_a_share_deterministically() -> None:
    m = model(dep("new"), dep("known"), policy="fastest", explore_share=0.2)
    board = Board(known=view(p50=0.3, tps=50))
    firsts = [ranked(rank(m, board, response_id=f"resp_{i}"))[0] for i in range(500)]
    explored = firsts.count("new")
    assert 60 < explored < 140, explored  # about 20% of response ids, the same ones every time
    assert firsts == [ranked(rank(m, board, response_id=f"resp_{i}"))[0] for i in range(500)]
    never = model(dep("new"), dep("known"), policy="fastest", explore_share=0)
    assert {ranked(rank(never, board, response_id=f"resp_{i}"))[0] for i in range(100)} == {"known"}


# -- balanced, weighted, ordered ---------------------------------------------------------------------------------


def test_balanced_weighs_normalised_cost_against_normalised_latency() -> None:
    deps = (dep("cheap-slow", (0.1, 0.1)), dep("mid", (1.0, 1.0)), dep("dear-fast", (10.0, 10.0)))
    board = Board(**{"cheap-slow": view(p50=5.0), "mid": view(p50=0.6), "dear-fast": view(p50=0.5)})
    cost_only = model(*deps, policy="balanced", balance={"cost": 1, "latency": 0})
    latency_only = model(*deps, policy="balanced", balance={"cost": 0, "latency": 1})
    even = model(*deps, policy="balanced")
    assert ranked(rank(cost_only, board)) == ["cheap-slow", "mid", "dear-fast"]
    assert ranked(rank(latency_only, board)) == ["dear-fast", "mid", "cheap-slow"]
    r = rank(even, board)
    assert ranked(r)[0] == "mid"  # nearly the fastest at a tenth of the price
    assert [s.score for s in r.scored] == sorted(s.score for s in r.scored)  # type: ignore[type-var]


def test_weighted_splits_first_attempts_by_share_deterministically_per_response_id() -> None:
    m = model(dep("a"), dep("b"), dep("c"), policy="weighted", weights={"a": 3, "b": 1})
    firsts = [ranked(rank(m, response_id=f"resp_{i}"))[0] for i in range(2000)]
    assert firsts.count("c") == 0  # no weight: never first, still a failover
    assert 1400 < firsts.count("a") < 1600 and 400 < firsts.count("b") < 600
    assert ranked(rank(m, response_id="resp_7")) == ranked(rank(m, response_id="resp_7"))
    r = rank(m, response_id="resp_7")
    assert sorted(ranked(r)) == ["a", "b", "c"]


def test_ordered_is_the_configured_order_and_the_header_overrides_the_policy() -> None:
    m = model(dep("dear", (9.0, 9.0)), dep("cheap", (1.0, 1.0)))
    r = rank(m)
    assert ranked(r) == ["dear", "cheap"] and r.policy == "ordered" and r.source == "config"
    r = rank(m, policy="cheapest")
    assert ranked(r) == ["cheap", "dear"] and r.source == "header"


def test_policy_header_values() -> None:
    assert parse_policy(None) is None and parse_policy(" ") is None
    assert parse_policy("Cheapest") == "cheapest" and parse_policy(" fastest ") == "fastest"
    with pytest.raises(Failure) as err:
        parse_policy("cheap")
    assert err.value.kind == "invalid_request" and err.value.param == "X-Unbroken-Policy"
    assert err.value.code == "unknown_routing_policy" and "cheapest" in err.value.message


# -- constraints ------------------------------------------------------------------------------------------------


def test_max_price_per_request_leaves_out_dear_deployments_and_refuses_when_none_is_left() -> None:
    m = model(dep("dear", (100.0, 100.0)), dep("cheap", (1.0, 1.0)), max_price_per_request_usd=0.01,
              default_output_tokens=100)
    r = rank(m, p=profile(1000))
    assert ranked(r) == ["cheap"] and r.excluded[0][0] == "dear" and "over routing.max_price" in r.excluded[0][1]
    r = rank(m, p=profile(100_000))  # too big for either
    assert r.candidates == () and r.refusal is not None
    assert r.refusal.kind == "invalid_request" and r.refusal.code == "no_deployment_can_serve"
    assert "dear: expected $" in r.refusal.message and "cheap: expected $" in r.refusal.message


def test_capabilities_the_request_needs_are_derived_from_it() -> None:
    image = Message("user", [TextPart("what is this?"), ImagePart("data:image/png;base64,AAAA")])
    assert needs_of(GenerationRequest(model="m", items=[image])) == ("images",)
    text = GenerationRequest(model="m", items=[Message("user", [TextPart("hi")])], reasoning_effort="high")
    assert needs_of(text) == ("reasoning",)


def test_a_deployment_without_a_needed_capability_is_left_out_and_none_left_is_a_400_naming_it() -> None:
    m = model(dep("text-only", capabilities={"images": False}), dep("vision", capabilities={"images": True}),
              dep("unknown"))
    r = rank(m, p=profile(needs=("images",)))
    assert ranked(r) == ["vision", "unknown"]  # unknown capabilities are not refused
    blind = model(dep("a", capabilities={"images": False}), dep("b", capabilities={"images": False, "tools": True}))
    r = rank(blind, p=profile(needs=("images",)))
    assert r.refusal is not None and r.refusal.kind == "invalid_request"
    assert r.refusal.code == "no_capable_deployment" and r.refusal.param == "input"
    assert "it needs images" in r.refusal.message and "a: no images" in r.refusal.message


def test_region_allowlist_leaves_out_other_and_unset_regions() -> None:
    m = model(dep("us", region="us-east-1"), dep("eu", region="eu-west-1"), dep("nowhere"), regions=["eu-west-1"])
    r = rank(m)
    assert ranked(r) == ["eu"]
    assert dict(r.excluded) == {"us": "region us-east-1 is not in routing.regions",
                                "nowhere": "region unset is not in routing.regions"}
    with pytest.raises(ValueError, match="leaves no deployment"):
        model(dep("us", region="us-east-1"), regions=["eu-west-1"])


def test_ttft_objective_puts_deployments_missing_it_after_those_meeting_it() -> None:
    m = model(dep("slow-p95"), dep("ok"), dep("unknown"), ttft_objective_ms=800)
    board = Board(**{"slow-p95": view(p50=0.2, p95=2.0), "ok": view(p50=0.3, p95=0.5)})
    r = rank(m, board)
    assert ranked(r) == ["ok", "unknown", "slow-p95"]
    assert "over the objective 800 ms" in r.scored[-1].notes[-1] and "ttft_objective_ms" in r.reason


def test_open_circuits_go_last_whatever_the_policy() -> None:
    m = model(dep("cheap", (0.1, 0.1)), dep("dear", (9.0, 9.0)), policy="cheapest")
    r = rank(m, Board(cheap=view(circuit="open")))
    assert ranked(r) == ["dear", "cheap"] and "circuit open" in r.scored[-1].notes[-1]


# -- wait or move -----------------------------------------------------------------------------------------------


def deployments(m: PublicModel) -> dict[str, Deployment]:
    return {d.name: d for d in m.deployments}


def test_cheapest_waits_two_seconds_for_a_deployment_five_times_cheaper() -> None:
    m = model(dep("cheap", (1.0, 1.0)), dep("dear", (5.0, 5.0)), policy="cheapest")
    d = deployments(m)
    r = rank(m)
    decision = r.wait_or_move(d["cheap"], 2.0, d["dear"])
    assert decision.wait and "5.0x as much" in decision.reason
    assert not r.wait_or_move(d["cheap"], 2.5, d["dear"]).wait  # over max_wait_s (2 s)
    near = model(dep("cheap", (1.0, 1.0)), dep("dearish", (1.5, 1.5)), policy="cheapest")
    assert not rank(near).wait_or_move(deployments(near)["cheap"], 2.0, deployments(near)["dearish"]).wait


def test_fastest_moves_on_at_once() -> None:
    m = model(dep("cheap", (1.0, 1.0)), dep("dear", (5.0, 5.0)), policy="fastest")
    board = Board(cheap=view(p50=0.2, tps=100), dear=view(p50=0.4, tps=100))
    d = deployments(m)
    decision = rank(m, board).wait_or_move(d["cheap"], 2.0, d["dear"])
    assert not decision.wait and decision.reason == "fastest: moving on at once"
    assert not rank(m).wait_or_move(d["cheap"], 0.01, d["dear"]).wait  # unknown latency: move
    # only a wait shorter than the other's expected extra time is worth it
    slow_other = Board(cheap=view(p50=0.2, tps=100), dear=view(p50=9.0, tps=100))
    assert rank(m, slow_other).wait_or_move(d["cheap"], 0.5, d["dear"]).wait


def test_balanced_waits_when_the_wait_still_scores_better() -> None:
    m = model(dep("cheap", (1.0, 1.0)), dep("dear", (5.0, 5.0)), policy="balanced",
              balance={"cost": 0.8, "latency": 0.2})
    board = Board(cheap=view(p50=0.5), dear=view(p50=0.4))
    d = deployments(m)
    assert rank(m, board).wait_or_move(d["cheap"], 0.05, d["dear"]).wait
    latency_first = model(dep("cheap", (1.0, 1.0)), dep("dear", (5.0, 5.0)), policy="balanced",
                          balance={"cost": 0.1, "latency": 0.9})
    assert not rank(latency_first, board).wait_or_move(deployments(latency_first)["cheap"], 0.5, d["dear"]).wait


def test_ordered_and_weighted_move_on() -> None:
    for policy in ("ordered", "weighted"):
        m = model(dep("a", (1.0, 1.0)), dep("b", (5.0, 5.0)), policy=policy)
        d = deployments(m)
        assert not rank(m).wait_or_move(d["a"], 0.1, d["b"]).wait


# -- cache affinity ---------------------------------------------------------------------------------------------


def affinity_model(b_input: float, **routing: Any) -> PublicModel:
    # `a` caches prompts at a tenth of its input price; `b` has no cache price (every input token at list price)
    return model(dep("a", (1.0, 1.0, 0.1)), dep("b", (b_input, 1.0)), policy="cheapest", default_output_tokens=50,
                 **routing)


def test_a_continuation_prefers_its_predecessors_deployment_when_the_saving_outweighs_the_difference() -> None:
    m = affinity_model(0.8)
    p = profile(10_000)
    assert ranked(rank(m, p=p)) == ["b", "a"]  # on list price `b` is cheaper
    predecessor = Predecessor("a", shared_tokens=9_000, via="previous_response_id")
    r = rank(m, p=p, predecessor=predecessor)
    assert ranked(r) == ["a", "b"]
    a = r.of("a")
    assert a is not None and a.cache_hit == pytest.approx(0.9) and "prompt cache" in a.notes[0]
    assert "stays first with its prompt cache" in r.reason
    assert r.explain()["affinity"] == {"deployment": "a", "via": "previous_response_id", "shared_tokens": 9000}


def test_affinity_gives_way_when_the_difference_is_larger_or_the_circuit_is_open() -> None:
    predecessor = Predecessor("a", shared_tokens=9_000, via="previous_response_id")
    far_cheaper = affinity_model(0.05)
    r = rank(far_cheaper, p=profile(10_000), predecessor=predecessor)
    assert ranked(r) == ["b", "a"] and "even with its prompt cache b ranks first" in r.reason
    m = affinity_model(0.8)
    r = rank(m, Board(a=view(circuit="open")), profile(10_000), predecessor=predecessor)
    assert ranked(r) == ["b", "a"] and "its circuit is open" in r.reason
    off = affinity_model(0.8, cache_affinity=False)
    assert ranked(rank(off, p=profile(10_000), predecessor=predecessor)) == ["b", "a"]


def test_affinity_counts_the_cache_hit_only_as_likely_as_the_attempt_succeeding() -> None:
    """A failed attempt fails over to a deployment without the cached prefix, so a deployment that fails half its
    attempts is expected to hit its cache half as often: here 80% failing leaves 18% of 90% shared."""
    predecessor = Predecessor("a", shared_tokens=9_000, via="previous_response_id")
    m = affinity_model(0.8)
    steady = rank(m, Board(a=view(errors=0.0)), profile(10_000), predecessor=predecessor)
    assert ranked(steady) == ["a", "b"]
    flaky = rank(m, Board(a=view(errors=0.8)), profile(10_000), predecessor=predecessor)
    a = flaky.of("a")
    assert a is not None and a.cache_hit == pytest.approx(0.18)
    assert ranked(flaky) == ["b", "a"]


def test_affinity_memory_recalls_a_prompt_prefix_within_its_ttl() -> None:
    now = [0.0]
    memory = AffinityMemory(clock=lambda: now[0])
    memory.remember("k", "a", 5000, ttl_s=300)
    assert memory.recall("k", 6000) == Predecessor("a", 5000, "prompt_prefix")
    assert memory.recall("k", 4000) == Predecessor("a", 4000, "prompt_prefix")
    now[0] = 301
    assert memory.recall("k", 6000) is None and memory.recall("other", 10) is None


def test_routing_settings_are_strict() -> None:
    with pytest.raises(ValueError, match="policy"):
        RoutingSettings.model_validate({"policy": "cheap"})
    with pytest.raises(ValueError, match="extra"):
        RoutingSettings.model_validate({"polcy": "cheapest"})
    with pytest.raises(ValueError, match="names no deployment"):
        model(dep("a"), weights={"z": 1})
    with pytest.raises(ValueError, match="both be 0"):
        RoutingSettings.model_validate({"balance": {"cost": 0, "latency": 0}})
