"""The sixteen classic failover scenarios, each through a real router (uvicorn on 127.0.0.1) in front of a real
simulated upstream, on both client endpoints (`/v1/responses` and `/v1/chat/completions`, streamed).

Every scenario checks what the client got (terminal status, dense sequence numbers and spec-valid events on
/v1/responses, a well-formed chunk stream on chat, the fault-free text wherever continuation applies) and what the
router did upstream (which deployments were asked, in order: the simulated upstream records every request, keyed
by the request's `sim_request`), plus the `router` accounting that opted-in /v1/responses clients get.

Each scenario has its own public model per endpoint, so the circuit breaker of one never steers another."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.integration.endpoints import (
    ENDPOINTS,
    Outcome,
    fault_free_answer,
    new_client,
    reference_text,
    reference_tokens,
    run,
    served_models,
    upstream_requests,
)
from tests.support.server import RouterThread, base_config
from unbroken.config import HealthSettings
from unbroken.ir import CONTINUE_INSTRUCTION
from unbroken.simulator import SimulatedUpstream, SimulatedUpstreamThread

LENGTH = 24
CUT_AFTER = 5
PROMPT = "Tell me what happens when a stream breaks"
REF = reference_text(PROMPT, length=LENGTH)
TOKENS = reference_tokens(PROMPT, length=LENGTH)
# Fast everything: no pacing, and silent upstreams are given up on within a second.
FAST: dict[str, Any] = {"seed": 7, "ttft_ms": 0, "tps": 0, "length": LENGTH, "ttft_timeout_s": 1.0,
                        "stall_timeout_s": 0.5}
ALWAYS = 99  # `fault_attempts`: the deployment fails every time it is asked for this response
PRICES = {"primary": (1.5, 6.0), "fallback": (0.5, 2.5)}

Spec = list[tuple[str, dict[str, Any]]]

# A prompt whose fault-free answer repeats a word right at the cut: "Number and wind patient green| green in. ..."
SEAM_PROMPT = "chaos question 8"
SEAM_LENGTH = 32
# A json_schema answer cut inside a word: `..."ma|ny at forest builds"...` after 9 pieces of 8 characters.
SEAM_JSON_PROMPT = "chaos question 9"
SEAM_JSON_CUT = 9
CARD_SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}},
    "score": {"type": "number", "minimum": 0, "maximum": 1}},
    "required": ["title", "tags", "score"], "additionalProperties": False}


def cut(after: int = CUT_AFTER, kind: str = "cut") -> dict[str, Any]:
    return {"fault": f"{kind}:{after}", "fault_attempts": ALWAYS}


# scenario -> its deployments (name, options), in policy order
SCENARIOS: dict[str, Spec] = {
    "429-ra": [("primary", {"fault": "http:429:1", "fault_attempts": ALWAYS}), ("fallback", {})],
    "429-ra-single": [("primary", {"fault": "http:429:0.2", "fault_attempts": 1})],
    "429-ra-beyond-budget": [("primary", {"fault": "http:429:3600", "fault_attempts": ALWAYS})],
    "429": [("primary", {"fault": "http:429", "fault_attempts": ALWAYS}), ("fallback", {})],
    "429-single": [("primary", {"fault": "http:429", "fault_attempts": 1})],
    "500": [("primary", {"fault": "http:500", "fault_attempts": ALWAYS}), ("fallback", {})],
    "500-single": [("primary", {"fault": "http:500", "fault_attempts": 1})],
    "503": [("primary", {"fault": "http:503", "fault_attempts": ALWAYS}), ("fallback", {})],
    "529": [("primary", {"fault": "http:529", "fault_attempts": ALWAYS}), ("fallback", {})],
    "reset-0": [("primary", cut(0, "reset")), ("fallback", {})],
    "reset-5": [("primary", cut(CUT_AFTER, "reset")), ("fallback", {})],
    "no-response": [("primary", {"fault": "timeout", "fault_attempts": ALWAYS, "ttft_timeout_s": 0.5}),
                    ("fallback", {})],
    "slow-first": [("primary", {"ttft_ms": 5000, "ttft_timeout_s": 0.5}), ("fallback", {})],
    "cut-literal": [("primary", cut()), ("fallback", {})],
    "cut-instruction": [("primary", cut()), ("fallback", {"literal_continuation": False})],
    "stall": [("primary", {**cut(CUT_AFTER, "stall"), "stall_timeout_s": 0.5}), ("fallback", {})],
    "malformed": [("primary", cut(CUT_AFTER, "malformed")), ("fallback", {})],
    "no-done": [("primary", {"fault": "no_done", "fault_attempts": ALWAYS}), ("fallback", {})],
    "ctx": [("small", {"fault": "context_length", "fault_attempts": ALWAYS, "context_window": 8000}),
            ("same", {"context_window": 8000}), ("large", {"context_window": 200_000})],
    "ctx-none-larger": [("small", {"fault": "context_length", "fault_attempts": ALWAYS, "context_window": 8000}),
                        ("same", {"context_window": 8000})],
    "filter-0": [("primary", cut(0, "content_filter")), ("fallback", {})],
    "filter-5": [("primary", cut(CUT_AFTER, "content_filter")), ("fallback", {})],
    "prefill": [("primary", cut()), ("fallback", {"reject_prefill": True, "literal_continuation": True})],
    "accounting": [("primary", cut()), ("fallback", {})],
    # continue-instruction seams (the two tests at the end)
    "seam-exact": [("primary", {**cut(), "length": SEAM_LENGTH}),
                   ("fallback", {"reject_prefill": True, "literal_continuation": True, "length": SEAM_LENGTH})],
    "seam-json-repeats": [("primary", cut(SEAM_JSON_CUT)), ("fallback", {"literal_continuation": False})],
    "seam-json-exact": [("primary", cut(SEAM_JSON_CUT)),
                        ("fallback", {"reject_prefill": True, "literal_continuation": True})],
}


def model_name(scenario: str, endpoint: str) -> str:
    return f"{scenario}-{endpoint}"


def upstream_model(scenario: str, endpoint: str, deployment: str) -> str:
    """Every deployment's upstream model is unique, so the upstream's request log tells which one was asked."""
    return f"{scenario}-{endpoint}.{deployment}"


def public_model(name: str, spec: Spec, base_url: str, scenario: str, endpoint: str) -> dict[str, Any]:
    deployments = []
    for dep, options in spec:
        price = PRICES.get(dep, (1.0, 2.0))
        deployments.append({"name": dep, "provider": "simulated", "model": upstream_model(scenario, endpoint, dep),
                            "base_url": base_url, "price": {"input": price[0], "output": price[1]},
                            "options": {**FAST, **options}})
    return {"name": name, "deployments": deployments}


@pytest.fixture(scope="module")
def upstream() -> Iterator[SimulatedUpstreamThread]:
    with SimulatedUpstream.start_in_thread() as sim:
        yield sim


@pytest.fixture(scope="module")
def router(upstream: SimulatedUpstreamThread) -> Iterator[RouterThread]:
    models = [public_model(model_name(s, ep), spec, upstream.base_url, s, ep)
              for s, spec in SCENARIOS.items() for ep in ENDPOINTS]
    with RouterThread(base_config(*models)) as server:
        yield server


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with new_client() as c:
        yield c


class Scenario:
    """One scenario on one endpoint: send, then look at the client's outcome and the upstream's log."""

    def __init__(self, name: str, endpoint: str, router: RouterThread, upstream: SimulatedUpstreamThread,
                 client: httpx.Client) -> None:
        self.name, self.endpoint = name, endpoint
        self.router, self.upstream, self.client = router, upstream, client

    def send(self, metadata: dict[str, str] | None = None, **extra: Any) -> Outcome:
        return run(self.endpoint, self.client, self.router.base_url, model_name(self.name, self.endpoint), PROMPT,
                   metadata, **extra)

    def asked(self, out: Outcome) -> list[str]:
        """Deployments asked for `out`, in order."""
        prefix = f"{self.name}-{self.endpoint}."
        models = served_models(self.upstream.upstream, out.trace_id)
        assert all(m.startswith(prefix) for m in models), models
        return [m.removeprefix(prefix) for m in models]


@pytest.fixture(params=ENDPOINTS)
def endpoint(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def scenario(name: str, endpoint: str, router: RouterThread, upstream: SimulatedUpstreamThread,
             client: httpx.Client) -> Scenario:
    return Scenario(name, endpoint, router, upstream, client)


def assert_completed(out: Outcome, *, text: str = REF) -> None:
    assert out.http_status == 200, (out.http_status, out.raw_error)
    assert out.status == "completed", (out.status, out.reason, out.error)
    assert out.text == text
    if out.endpoint == "responses":
        assert out.messages == 1, "the client sees one uninterrupted message"
    else:
        assert out.reason == "stop"


def assert_attempts(out: Outcome, expected: list[tuple[str, str]], *,
                    continuation: list[str | None] | None = None) -> None:
    """The `router` accounting (opted-in /v1/responses clients): (deployment, outcome) per attempt."""
    if out.endpoint != "responses":
        return
    assert out.accounting is not None
    attempts = out.accounting["attempts"]
    assert [(a["deployment"], a["outcome"]) for a in attempts] == expected
    assert out.accounting["served_by"] == expected[-1][0]
    if continuation is not None:
        assert [a["continuation"] for a in attempts] == continuation


def assert_recovery_events(out: Outcome, mid_stream: bool) -> None:
    """Only a failure after output is a visible (opted-in) interruption; before output the client notices nothing."""
    if out.endpoint != "responses":
        return
    types = [e["type"] for e in out.recovery_events]
    assert types == (["router:stream.interrupted", "router:stream.resumed"] if mid_stream else [])


# -- 1-4: HTTP errors before the stream ---------------------------------------------------------------------------


def test_429_with_retry_after(endpoint: str, router: RouterThread, upstream: SimulatedUpstreamThread,
                              client: httpx.Client) -> None:
    # Two deployments: the limited one is left at once (no waiting while another can answer).
    s = scenario("429-ra", endpoint, router, upstream, client)
    out = s.send()
    assert_completed(out)
    assert s.asked(out) == ["primary", "fallback"]
    assert_attempts(out, [("primary", "rate_limited"), ("fallback", "ok")])
    assert_recovery_events(out, mid_stream=False)

    # One deployment: the router waits as told and asks the same deployment again.
    s = scenario("429-ra-single", endpoint, router, upstream, client)
    out = s.send()
    assert_completed(out)
    assert s.asked(out) == ["primary", "primary"]
    assert_attempts(out, [("primary", "rate_limited"), ("primary", "ok")])

    # A Retry-After beyond the request's budget is not slept on: an honest 429 that passes the hint on.
    s = scenario("429-ra-beyond-budget", endpoint, router, upstream, client)
    out = s.send()
    assert out.http_status == 429
    assert out.error is not None and out.error["code"] == "rate_limit_exceeded"
    assert out.headers.get("retry-after") == "3600"
    assert s.asked(out) == ["primary"]


def test_429_without_retry_after(endpoint: str, router: RouterThread, upstream: SimulatedUpstreamThread,
                                 client: httpx.Client) -> None:
    # The simulated upstream sends `retry-after: 0` with a bare 429 (as OpenAI does): no hint, so the router uses
    # its own backoff.
    s = scenario("429", endpoint, router, upstream, client)
    out = s.send()
    assert_completed(out)
    assert s.asked(out) == ["primary", "fallback"]
    assert_attempts(out, [("primary", "rate_limited"), ("fallback", "ok")])

    s = scenario("429-single", endpoint, router, upstream, client)
    out = s.send()
    assert_completed(out)
    assert s.asked(out) == ["primary", "primary"]
    assert_attempts(out, [("primary", "rate_limited"), ("primary", "ok")])


def test_500(endpoint: str, router: RouterThread, upstream: SimulatedUpstreamThread, client: httpx.Client) -> None:
    s = scenario("500", endpoint, router, upstream, client)
    out = s.send()
    assert_completed(out)
    assert s.asked(out) == ["primary", "fallback"]
    assert_attempts(out, [("primary", "server_error"), ("fallback", "ok")])
    assert_recovery_events(out, mid_stream=False)

    # A 5xx is worth another try on the same deployment when it is the only one.
    s = scenario("500-single", endpoint, router, upstream, client)
    out = s.send()
    assert_completed(out)
    assert s.asked(out) == ["primary", "primary"]


@pytest.mark.parametrize("status", [503, 529])
def test_503(endpoint: str, status: int, router: RouterThread, upstream: SimulatedUpstreamThread,
             client: httpx.Client) -> None:
    s = scenario(str(status), endpoint, router, upstream, client)
    out = s.send()
    assert_completed(out)
    assert s.asked(out) == ["primary", "fallback"]
    assert_attempts(out, [("primary", "overloaded"), ("fallback", "ok")])
    assert_recovery_events(out, mid_stream=False)


# -- 5-11: the connection and the stream ---------------------------------------------------------------------------


@pytest.mark.parametrize("after", [0, CUT_AFTER])
def test_tcp_reset(endpoint: str, after: int, router: RouterThread, upstream: SimulatedUpstreamThread,
                   client: httpx.Client) -> None:
    """A TCP RST after the first chunk (no text yet) and after five text chunks (continued on the fallback)."""
    s = scenario(f"reset-{after}", endpoint, router, upstream, client)
    out = s.send()
    assert_completed(out)
    assert s.asked(out) == ["primary", "fallback"]
    assert_attempts(out, [("primary", "connection"), ("fallback", "ok")],
                    continuation=[None, "literal" if after else None])
    assert_recovery_events(out, mid_stream=after > 0)


def test_no_response(endpoint: str, router: RouterThread, upstream: SimulatedUpstreamThread,
                     client: httpx.Client) -> None:
    """The upstream accepts the request and never answers: the deployment's ttft timeout moves on."""
    s = scenario("no-response", endpoint, router, upstream, client)
    out = s.send()
    assert_completed(out)
    assert s.asked(out) == ["primary", "fallback"]
    assert_attempts(out, [("primary", "timeout"), ("fallback", "ok")])
    assert_recovery_events(out, mid_stream=False)


def test_slow_first_token(endpoint: str, router: RouterThread, upstream: SimulatedUpstreamThread,
                          client: httpx.Client) -> None:
    """Headers at once, first token later than the deployment allows: the fast fallback answers instead."""
    s = scenario("slow-first", endpoint, router, upstream, client)
    out = s.send()
    assert_completed(out)
    assert s.asked(out) == ["primary", "fallback"]
    assert_attempts(out, [("primary", "timeout"), ("fallback", "ok")])


@pytest.mark.parametrize("mode", ["literal", "instruction"])
def test_stream_cut(endpoint: str, mode: str, router: RouterThread, upstream: SimulatedUpstreamThread,
                    client: httpx.Client) -> None:
    """Cut after five chunks; the fallback continues by prefill (literal) or by a continue-instruction whose
    repeated overlap the router strips."""
    s = scenario(f"cut-{mode}", endpoint, router, upstream, client)
    out = s.send()
    assert_completed(out)
    assert s.asked(out) == ["primary", "fallback"]
    assert_attempts(out, [("primary", "connection"), ("fallback", "ok")], continuation=[None, mode])
    assert_recovery_events(out, mid_stream=True)
    partial = "".join(TOKENS[:CUT_AFTER])
    messages = upstream_requests(upstream.upstream, out.trace_id)[1]["messages"]
    if mode == "literal":
        assert messages[-1] == {"role": "assistant", "content": partial}
    else:
        assert messages[-2:] == [{"role": "assistant", "content": partial},
                                 {"role": "user", "content": CONTINUE_INSTRUCTION}]


def test_stream_stall(endpoint: str, router: RouterThread, upstream: SimulatedUpstreamThread,
                      client: httpx.Client) -> None:
    s = scenario("stall", endpoint, router, upstream, client)
    out = s.send()
    assert_completed(out)
    assert s.asked(out) == ["primary", "fallback"]
    assert_attempts(out, [("primary", "timeout"), ("fallback", "ok")], continuation=[None, "literal"])
    assert_recovery_events(out, mid_stream=True)


def test_malformed_chunk(endpoint: str, router: RouterThread, upstream: SimulatedUpstreamThread,
                         client: httpx.Client) -> None:
    s = scenario("malformed", endpoint, router, upstream, client)
    out = s.send()
    assert_completed(out)
    assert s.asked(out) == ["primary", "fallback"]
    assert_attempts(out, [("primary", "malformed"), ("fallback", "ok")], continuation=[None, "literal"])
    assert_recovery_events(out, mid_stream=True)


def test_missing_done(endpoint: str, router: RouterThread, upstream: SimulatedUpstreamThread,
                      client: httpx.Client) -> None:
    """No `data: [DONE]` after the finish reason: the answer was complete, so it is a success, not a retry."""
    s = scenario("no-done", endpoint, router, upstream, client)
    out = s.send()
    assert_completed(out)
    assert s.asked(out) == ["primary"]
    assert_attempts(out, [("primary", "ok")])
    assert_recovery_events(out, mid_stream=False)


# -- 12-14: errors that decide where (and whether) to go next -----------------------------------------------------


def test_context_length_exceeded(endpoint: str, router: RouterThread, upstream: SimulatedUpstreamThread,
                                 client: httpx.Client) -> None:
    """Too long for the 8k deployment: never resent to it nor to another 8k one; the 200k one answers."""
    s = scenario("ctx", endpoint, router, upstream, client)
    out = s.send()
    assert_completed(out)
    assert s.asked(out) == ["small", "large"]
    assert_attempts(out, [("small", "context_length"), ("large", "ok")])

    # No larger window left: an honest 400, after one upstream request.
    s = scenario("ctx-none-larger", endpoint, router, upstream, client)
    out = s.send()
    assert out.http_status == 400, out.raw_error
    assert out.error is not None and out.error["code"] == "context_length_exceeded"
    assert s.asked(out) == ["small"]


@pytest.mark.parametrize("after", [0, CUT_AFTER])
def test_content_filter(endpoint: str, after: int, router: RouterThread, upstream: SimulatedUpstreamThread,
                        client: httpx.Client) -> None:
    """A refusal goes back to the client with its reason, with what was said before it; nobody else is asked."""
    s = scenario(f"filter-{after}", endpoint, router, upstream, client)
    out = s.send()
    assert out.http_status == 200
    assert out.status == "incomplete"
    assert out.reason == "content_filter"  # incomplete_details.reason, or the chat finish_reason
    assert out.text == "".join(TOKENS[:after])
    assert s.asked(out) == ["primary"]
    assert_attempts(out, [("primary", "ok")])
    assert_recovery_events(out, mid_stream=False)


def test_fallback_rejects_prefill(endpoint: str, router: RouterThread, upstream: SimulatedUpstreamThread,
                                  client: httpx.Client) -> None:
    """The fallback claims prefill but rejects it: the router asks it again with a continue-instruction."""
    s = scenario("prefill", endpoint, router, upstream, client)
    out = s.send()
    assert_completed(out)
    assert s.asked(out) == ["primary", "fallback", "fallback"]
    assert_attempts(out, [("primary", "connection"), ("fallback", "prefill_rejected"), ("fallback", "ok")],
                    continuation=[None, "literal", "instruction"])
    partial = "".join(TOKENS[:CUT_AFTER])
    bodies = upstream_requests(upstream.upstream, out.trace_id)
    assert bodies[1]["messages"][-1] == {"role": "assistant", "content": partial}
    assert bodies[2]["messages"][-2:] == [{"role": "assistant", "content": partial},
                                          {"role": "user", "content": CONTINUE_INSTRUCTION}]


# -- 15: the circuit breaker ----------------------------------------------------------------------------------------


class FakeClock:
    """The health board's clock, moved by the test: the open period passes without anybody sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def flapping(upstream: SimulatedUpstreamThread) -> Iterator[tuple[RouterThread, FakeClock]]:
    models = [public_model(f"flap-{ep}", [("primary", {}), ("fallback", {})], upstream.base_url, "flap", ep)
              for ep in ENDPOINTS]
    with RouterThread(base_config(*models)) as server:
        clock = FakeClock()
        server.runtime.health._now = clock
        yield server, clock


def test_flapping_primary(endpoint: str, flapping: tuple[RouterThread, FakeClock], upstream: SimulatedUpstreamThread,
                          client: httpx.Client) -> None:
    router, clock = flapping
    s = scenario("flap", endpoint, router, upstream, client)
    health = router.runtime.health
    primary_fails = {"sim_fault": "http:500,none"}  # this response's first attempt fails, whoever gets it

    for _ in range(HealthSettings().failures_to_open):
        out = s.send(primary_fails)
        assert_completed(out)
        assert s.asked(out) == ["primary", "fallback"]
    assert health.view(f"flap-{endpoint}", "primary").circuit == "open"

    # Open: the primary is not asked at all.
    out = s.send()
    assert_completed(out)
    assert s.asked(out) == ["fallback"]

    # After the open period the primary gets a trial; it fails again, and the circuit opens again at once.
    clock.now += HealthSettings().open_seconds + 1
    out = s.send(primary_fails)
    assert_completed(out)
    assert s.asked(out) == ["primary", "fallback"]
    out = s.send()
    assert s.asked(out) == ["fallback"]

    # Next period: the trial succeeds and closes the circuit; the primary serves from then on.
    clock.now += HealthSettings().open_seconds + 1
    for _ in range(2):
        out = s.send()
        assert_completed(out)
        assert s.asked(out) == ["primary"]
    # Closed means a single failure is only a failover, not a new open period.
    out = s.send(primary_fails)
    assert s.asked(out) == ["primary", "fallback"]
    out = s.send()
    assert s.asked(out) == ["primary"]


# -- 16: accounting ---------------------------------------------------------------------------------------------------


def test_failover_accounting(endpoint: str, router: RouterThread, upstream: SimulatedUpstreamThread,
                             client: httpx.Client) -> None:
    """Cut on the primary after five chunks, continued on the cheaper fallback (another upstream model): which
    deployment served, the attempts, the cost of each at its own price and their sum, the usage, and `model`."""
    s = scenario("accounting", endpoint, router, upstream, client)
    out = s.send()
    assert_completed(out)
    assert s.asked(out) == ["primary", "fallback"]
    generated = LENGTH - CUT_AFTER  # the fallback continued literally: it only produced the rest
    if endpoint == "chat":
        # Chat has no accounting field; the usage chunk adds up every attempt (the cut one estimated from what it
        # streamed), and the chunks name the upstream model that answered.
        assert out.usage["completion_tokens"] > generated
        assert out.usage["total_tokens"] == out.usage["prompt_tokens"] + out.usage["completion_tokens"]
        assert out.model == upstream_model("accounting", endpoint, "fallback")
        return
    accounting = out.accounting
    assert accounting is not None
    assert accounting["served_by"] == "fallback"
    attempts = accounting["attempts"]
    assert [(a["deployment"], a["model"], a["outcome"], a["continuation"]) for a in attempts] == [
        ("primary", upstream_model("accounting", endpoint, "primary"), "connection", None),
        ("fallback", upstream_model("accounting", endpoint, "fallback"), "ok", "literal")]
    # A stream cut before its usage chunk reported nothing: its usage is estimated from what it sent and streamed
    # (issue "spend you can trust"); the fallback reported its own share.
    assert attempts[0]["input_tokens"] > 0 and attempts[0]["output_tokens"] > 0
    assert attempts[0].get("usage_estimated") is True
    assert attempts[1]["output_tokens"] == generated and attempts[1]["input_tokens"] > 0
    expected_costs = []
    for a in attempts:
        price_in, price_out = PRICES[a["deployment"]]
        cost = (a["input_tokens"] * price_in + a["output_tokens"] * price_out) / 1e6
        assert a["cost_usd"] == pytest.approx(cost, abs=1e-8)
        expected_costs.append(cost)
    assert accounting["cost_usd"] == pytest.approx(sum(expected_costs), abs=1e-8)
    assert accounting["cost_usd"] > 0
    # The response's usage is the attempts' usage added up.
    assert out.usage["output_tokens"] == sum(a["output_tokens"] for a in attempts)
    assert out.usage["input_tokens"] == sum(a["input_tokens"] for a in attempts)
    # `model` names the upstream model that actually answered.
    assert out.model == upstream_model("accounting", endpoint, "fallback")


# -- continue-instruction seams (found by the chaos suite) ----------------------------------------------------------


def test_instruction_continuation_keeps_a_word_the_answer_repeats(endpoint: str, router: RouterThread,
                                                                  upstream: SimulatedUpstreamThread,
                                                                  client: httpx.Client) -> None:
    """The fallback rejects prefill, so it is asked with a continue-instruction, and it continues exactly where the
    cut was (no repetition). The fault-free answer has "green green" across the cut: both must stay."""
    tokens = reference_tokens(SEAM_PROMPT, length=SEAM_LENGTH)
    assert tokens[CUT_AFTER - 1] == tokens[CUT_AFTER] == " green"  # the premise of the test
    out = run(endpoint, client, router.base_url, model_name("seam-exact", endpoint), SEAM_PROMPT)
    assert out.status == "completed"
    assert out.text == "".join(tokens)


@pytest.mark.parametrize("fallback", ["repeats", "exact"])
def test_instruction_continuation_does_not_split_a_word(endpoint: str, fallback: str, router: RouterThread,
                                                        upstream: SimulatedUpstreamThread,
                                                        client: httpx.Client) -> None:
    """json_schema output is streamed in 8-character pieces, so the cut falls inside a word. The fallback gets a
    continue-instruction and either repeats the last pieces (which the router strips) or continues exactly (it
    rejected prefill); either way the document must come out unchanged."""
    if endpoint == "responses":
        fields: dict[str, Any] = {"text": {"format": {"type": "json_schema", "name": "card", "schema": CARD_SCHEMA,
                                                      "strict": True}}}
    else:
        fields = {"response_format": {"type": "json_schema", "json_schema": {"name": "card", "schema": CARD_SCHEMA,
                                                                             "strict": True}}}
    document, _ = fault_free_answer(upstream.base_url, SEAM_JSON_PROMPT, length=LENGTH, response_format={
        "type": "json_schema", "json_schema": {"name": "card", "schema": CARD_SCHEMA, "strict": True}})
    model = model_name(f"seam-json-{fallback}", endpoint)
    out = run(endpoint, client, router.base_url, model, SEAM_JSON_PROMPT, **fields)
    assert out.status == "completed"
    assert out.text == document
