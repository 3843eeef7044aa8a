"""Usage against the simulated upstream's own counts: a cut attempt (the simulator reports nothing) counts the
documented estimate of what it streamed, the attempt that continued counts what the simulator reported, and the
response's `usage` and `router` field are their sum. Non-streamed answers carry the cost and deployment headers."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.support.client import TIMEOUT, headers, post_stream
from tests.support.server import RouterThread, base_config, sim_model
from unbroken.routing.tokens import estimate_output_tokens
from unbroken.simulator import input_key_of, simulated_tokens

PROMPT = "Tell me about accounting"
TOKENS = simulated_tokens("7", input_key_of([{"role": "user", "content": PROMPT}]), 40)
PROMPT_TOKENS = 3 + 4 + len(PROMPT) // 4  # the simulator's count (conversation.count_prompt_tokens)


@pytest.fixture(scope="module")
def router() -> Iterator[RouterThread]:
    with RouterThread(base_config(sim_model("demo"), sim_model("instr", literal_continuation=False))) as server:
        yield server


@pytest.mark.parametrize("model", ["demo", "instr"])
def test_a_cut_and_its_continuation_add_up_to_what_the_simulator_sent(router: RouterThread, model: str) -> None:
    body = {"model": model, "input": PROMPT, "metadata": {"sim_fault": "cut:7"}}
    _, stream = post_stream(router.base_url, body)
    assert stream.terminal["type"] == "response.completed"
    router_field = stream.response["router"]
    cut, cont = router_field["attempts"]
    # the cut attempt: 7 simulated tokens streamed, no usage chunk, so the documented estimate
    assert cut["usage_estimated"] is True
    assert cut["output_tokens"] == estimate_output_tokens(len("".join(TOKENS[:7])))
    assert cut["input_tokens"] == PROMPT_TOKENS
    # the continuation reported the simulator's own count
    assert cont["usage_estimated"] is False and cont["continuation"] == ("literal" if model == "demo"
                                                                         else "instruction")
    if model == "demo":
        assert cont["output_tokens"] == len(TOKENS) - 7  # exactly the missing tokens
    else:
        assert cont["output_tokens"] > len(TOKENS) - 7  # the simulator repeats a little overlap: billed too
    usage = stream.response["usage"]
    assert usage["output_tokens"] == cut["output_tokens"] + cont["output_tokens"]
    assert usage["input_tokens"] == cut["input_tokens"] + cont["input_tokens"]
    assert router_field["cost_usd"] == pytest.approx(cut["cost_usd"] + cont["cost_usd"])
    # price 1.0 in / 2.0 out per 1M tokens (sim_model)
    assert cut["cost_usd"] == pytest.approx((cut["input_tokens"] * 1.0 + cut["output_tokens"] * 2.0) / 1e6)


def test_failover_before_output_counts_only_the_answer(router: RouterThread) -> None:
    body = {"model": "demo", "input": PROMPT, "metadata": {"sim_fault": "http:503"}}
    _, stream = post_stream(router.base_url, body)
    failed, ok = stream.response["router"]["attempts"]
    assert (failed["input_tokens"], failed["output_tokens"]) == (0, 0)
    assert (ok["input_tokens"], ok["output_tokens"]) == (PROMPT_TOKENS, len(TOKENS))
    assert stream.response["usage"]["output_tokens"] == len(TOKENS)
    assert stream.response["router"]["usage_estimated"] is False


@pytest.mark.parametrize("path", ["/responses", "/chat/completions"])
def test_non_streamed_answers_carry_cost_and_deployment_headers(router: RouterThread, path: str) -> None:
    body = ({"model": "demo", "input": PROMPT, "store": False} if path == "/responses"
            else {"model": "demo", "messages": [{"role": "user", "content": PROMPT}]})
    with httpx.Client(timeout=TIMEOUT) as client:
        r = client.post(f"{router.base_url}{path}", json=body, headers=headers())
    assert r.status_code == 200, r.text
    expected = (PROMPT_TOKENS * 1.0 + len(TOKENS) * 2.0) / 1e6
    assert float(r.headers["x-unbroken-cost-usd"]) == pytest.approx(expected)
    assert r.headers["x-unbroken-deployment"] in ("sim-0", "sim-1")
