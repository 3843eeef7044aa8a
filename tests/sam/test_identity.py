"""unbroken.api.identity: the caller's identity and the invocation deadline come from the Web Adapter's headers, and
only inside Lambda; the same headers sent by a client anywhere else are ignored."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from starlette.datastructures import Headers

from unbroken.api.identity import (
    DEFAULT_SAFETY_MARGIN_SECONDS,
    context_deadline,
    in_lambda,
    lambda_context,
    stream_deadline,
)

EVENT = Path(__file__).resolve().parents[2] / "events" / "apigw-responses-stream.json"

LAMBDA_ENV = {
    "AWS_LAMBDA_FUNCTION_NAME": "unbroken-GatewayFunction-abc123",
    "AWS_LAMBDA_EXEC_WRAPPER": "/opt/bootstrap",
    "AWS_LWA_INVOKE_MODE": "response_stream",
    "AWS_LWA_PORT": "8000",
}
LAPTOP_ENV = {"HOME": "/home/dev", "PATH": "/usr/bin"}
NOW = 1_795_320_611.0
DEADLINE_MS = int((NOW + 880) * 1000)
FUNCTION_ARN = "arn:aws:lambda:us-east-1:123456789012:function:unbroken-GatewayFunction-abc123"


def _event() -> dict[str, Any]:
    return json.loads(EVENT.read_text(encoding="utf-8"))


def lwa_headers(event: dict[str, Any], deadline_ms: int = DEADLINE_MS) -> Headers:
    """The request LWA sends to uvicorn for this event: the event's headers plus the two context headers, which
    LWA inserts (replacing any the client sent). Shapes as in LWA src/lib.rs and lambda_runtime::Context."""
    raw = {k.lower(): v for k, v in event["headers"].items()}
    raw["x-amzn-request-context"] = json.dumps(event["requestContext"])
    raw["x-amzn-lambda-context"] = json.dumps(
        {
            "request_id": "0c7a3f0e-1111-4222-8333-944445555666",
            "deadline": deadline_ms,
            "invoked_function_arn": FUNCTION_ARN,
            "xray_trace_id": "Root=1-6740f0a1-3c1f2a4b5d6e7f8091a2b3c4",
            "client_context": None,
            "identity": None,
            "tenant_id": None,
            "env_config": {"function_name": "unbroken-GatewayFunction-abc123", "memory": 1024, "version": "$LATEST"},
        }
    )
    return Headers(raw)


def test_sample_event_is_a_streaming_responses_request() -> None:
    event = _event()
    assert event["httpMethod"] == "POST" and event["path"] == "/v1/responses"
    assert json.loads(event["body"])["stream"] is True
    ctx = event["requestContext"]
    assert ctx["requestId"] and ctx["stage"] and ctx["identity"]["sourceIp"] and ctx["authorizer"]["principalId"]


def test_in_lambda_needs_the_function_and_the_adapter() -> None:
    assert in_lambda(LAMBDA_ENV)
    assert not in_lambda(LAPTOP_ENV)
    # A plain Lambda function (no adapter: e.g. a Mangum handler) does not get LWA-written headers.
    assert not in_lambda({"AWS_LAMBDA_FUNCTION_NAME": "f"})
    # The adapter's settings without a Lambda function: a developer's shell copying the template's env.
    assert not in_lambda({"AWS_LWA_PORT": "8000", "AWS_LAMBDA_EXEC_WRAPPER": "/opt/bootstrap"})
    # Container images run LWA as an extension: no exec wrapper, but AWS_LWA_* settings.
    assert in_lambda({"AWS_LAMBDA_FUNCTION_NAME": "f", "AWS_LWA_PORT": "8000"})


def test_client_sent_identity_headers_are_ignored_outside_lambda() -> None:
    headers = lwa_headers(_event())  # exactly what a client would have to forge
    assert lambda_context(headers, env=LAPTOP_ENV) is None
    # ...including a non-LWA Lambda function, where nothing overwrites them either.
    assert lambda_context(headers, env={"AWS_LAMBDA_FUNCTION_NAME": "admin"}) is None


def test_lambda_context_inside_lambda() -> None:
    ctx = lambda_context(lwa_headers(_event()), env=LAMBDA_ENV)
    assert ctx is not None
    assert ctx.request_id == "0c7a3f0e-1111-4222-8333-944445555666"
    assert ctx.deadline_ms == DEADLINE_MS
    assert ctx.deadline == pytest.approx(NOW + 880)
    assert ctx.function_arn == FUNCTION_ARN
    assert ctx.xray_trace_id and ctx.xray_trace_id.startswith("Root=")


def test_plain_dict_headers_any_case_and_bad_values() -> None:
    good = json.dumps({"request_id": "r1", "deadline": DEADLINE_MS})
    ctx = lambda_context({"X-Amzn-Lambda-Context": good}, env=LAMBDA_ENV)
    assert ctx is not None and ctx.request_id == "r1" and ctx.function_arn == ""
    assert lambda_context({}, env=LAMBDA_ENV) is None
    assert lambda_context({"x-amzn-lambda-context": "not json"}, env=LAMBDA_ENV) is None
    assert lambda_context({"x-amzn-lambda-context": '"PassThrough"'}, env=LAMBDA_ENV) is None
    assert lambda_context({"x-amzn-lambda-context": json.dumps({"request_id": "x"})}, env=LAMBDA_ENV) is None
    assert lambda_context({"x-amzn-lambda-context": json.dumps({"deadline": 5})}, env=LAMBDA_ENV) is None


def test_stream_deadline_is_the_earlier_of_config_and_lambda() -> None:
    headers = lwa_headers(_event())  # Lambda deadline: NOW + 880 s
    # Configured cap shorter than the invocation: the cap.
    assert stream_deadline(headers, 300, NOW, env=LAMBDA_ENV) == NOW + 300
    # Configured cap longer: the Lambda deadline minus the safety margin.
    assert stream_deadline(headers, 3600, NOW, env=LAMBDA_ENV) == pytest.approx(
        NOW + 880 - DEFAULT_SAFETY_MARGIN_SECONDS
    )
    assert stream_deadline(headers, None, NOW, env=LAMBDA_ENV) == pytest.approx(NOW + 860)
    assert stream_deadline(headers, 3600, NOW, margin=60, env=LAMBDA_ENV) == pytest.approx(NOW + 820)
    # Outside Lambda a forged deadline cannot shorten (or lengthen) anything.
    assert stream_deadline(lwa_headers(_event(), deadline_ms=int(NOW * 1000)), 3600, NOW, env=LAPTOP_ENV) == NOW + 3600
    assert stream_deadline({}, None, NOW, env=LAPTOP_ENV) == float("inf")
    # Nearly out of time: never in the past.
    late = lwa_headers(_event(), deadline_ms=int((NOW + 5) * 1000))
    assert stream_deadline(late, 3600, NOW, env=LAMBDA_ENV) == NOW


def test_context_deadline_for_plain_invocations() -> None:
    class Ctx:
        def get_remaining_time_in_millis(self) -> int:
            return 90_000

    assert context_deadline(Ctx(), NOW) == pytest.approx(NOW + 90)
    assert context_deadline(object(), NOW) is None
