"""Recorded streams of every provider, replayed by its fake upstream over real HTTP, through POST /v1/responses:
every event validates against the Open Responses spec, sequences are dense, and the text and function calls are
what the recording holds (parsed independently of the adapters, in test_chat_completions). Every fixture file is
also replayed adapter-level in tests/providers/."""

from __future__ import annotations

import json

import pytest

from tests.integration.test_chat_completions import PROVIDER_CASES, ProviderCase, _fake_and_deployment
from tests.support.client import post_stream
from tests.support.server import RouterThread, base_config
from tests.support.sse import assert_well_formed


@pytest.mark.parametrize("case", PROVIDER_CASES, ids=[c.id for c in PROVIDER_CASES])
def test_responses_stream_through_each_provider_adapter(case: ProviderCase) -> None:
    fake, deployment, recorded = _fake_and_deployment(case)
    assert recorded.text or recorded.calls, "the recording holds neither text nor tool calls"
    tools = [{"type": "function", "name": name, "parameters": {"type": "object"}}
             for name in dict.fromkeys(name for _, name, _ in recorded.calls)]
    with fake:
        base = fake.base_url + ("/v1" if case.provider == "openai_responses" else "")
        model = {"name": "m", "deployments": [{**deployment, "base_url": base}]}
        with RouterThread(base_config(model)) as server:
            body = {"model": "m", "input": "hi", **({"tools": tools} if tools else {})}
            response, stream = post_stream(server.base_url, body)
    assert response.status_code == 200
    assert_well_formed(stream)  # spec-valid events (validated while parsing), dense, terminal + [DONE]
    assert stream.terminal["type"] == "response.completed"
    assert stream.output_text() == recorded.text and stream.text() == recorded.text
    calls = stream.function_calls()
    assert [(c["name"], json.loads(c["arguments"] or "{}")) for c in calls] == [
        (name, arguments) for _, name, arguments in recorded.calls]
    for got, (call_id, _, _) in zip(calls, recorded.calls, strict=True):
        assert got["call_id"] == call_id if call_id else got["call_id"]
    usage = stream.response["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
