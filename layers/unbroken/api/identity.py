"""How long this invocation may run, as far as the Lambda runtime can say.

Under the Lambda Web Adapter (LWA) every proxied request carries two JSON headers that LWA itself sets, replacing
any header of the same name the client sent (`req_headers.insert(...)` in LWA's `src/lib.rs`, `fetch_response`;
documented in its guide, `docs/guide/src/features/request-context.md`):

- `x-amzn-lambda-context`: the Rust runtime's `lambda_runtime::Context` serialised with serde, i.e.
  `{"request_id": str, "deadline": <epoch ms>, "invoked_function_arn": str, "xray_trace_id": str|null,
  "client_context": ..., "identity": ..., "env_config": {...}}` (aws-lambda-rust-runtime `lambda-runtime/src/types.rs`).
- `x-amzn-request-context`: the event's `requestContext` (API Gateway's view of the caller): its `requestId`, and
  `authorizer.claims` when a Cognito user pool authorizer verified the caller's token.

Outside Lambda nothing rewrites those headers, so a client could forge them: `lambda_context` returns None unless
the process runs inside Lambda under LWA (`in_lambda`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

LAMBDA_CONTEXT_HEADER = "x-amzn-lambda-context"
REQUEST_CONTEXT_HEADER = "x-amzn-request-context"

# Time kept in hand before the Lambda deadline to write the last journal batch, send the terminal event and
# `data: [DONE]`, and flush logs/metrics.
DEFAULT_SAFETY_MARGIN_SECONDS = 20.0


@dataclass(frozen=True, slots=True)
class LambdaContextInfo:
    request_id: str
    deadline_ms: int  # epoch milliseconds at which Lambda stops the invocation
    function_arn: str
    xray_trace_id: str | None = None

    @property
    def deadline(self) -> float:
        """The deadline in epoch seconds (comparable with `time.time()`)."""
        return self.deadline_ms / 1000.0


def in_lambda(env: Mapping[str, str] | None = None) -> bool:
    """True when this process is a Lambda function fronted by the Web Adapter, the only setting in which the
    `x-amzn-*-context` headers were written by LWA rather than by whoever sent the request."""
    env = os.environ if env is None else env
    if not env.get("AWS_LAMBDA_FUNCTION_NAME"):
        return False
    # Zip + layer deployments run LWA through the exec wrapper; container images run it as an extension and are
    # recognisable by its AWS_LWA_* settings.
    return env.get("AWS_LAMBDA_EXEC_WRAPPER") == "/opt/bootstrap" or any(k.startswith("AWS_LWA_") for k in env)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None and not hasattr(headers, "getlist"):
        # A plain dict (tests, Mangum-style events) may keep the sender's capitalisation; Starlette's Headers are
        # already case-insensitive.
        lowered = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == lowered), None)
    return value


def _json_header(headers: Mapping[str, str], name: str, env: Mapping[str, str] | None) -> dict[str, Any] | None:
    if not in_lambda(env):
        return None
    raw = _header(headers, name)
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def lambda_context(headers: Mapping[str, str], env: Mapping[str, str] | None = None) -> LambdaContextInfo | None:
    """The invocation's request id, deadline and function ARN from LWA's `x-amzn-lambda-context` header."""
    data = _json_header(headers, LAMBDA_CONTEXT_HEADER, env)
    if data is None:
        return None
    deadline = data.get("deadline")
    request_id = _str(data.get("request_id"))
    if not isinstance(deadline, int) or isinstance(deadline, bool) or deadline <= 0 or request_id is None:
        return None
    return LambdaContextInfo(
        request_id=request_id,
        deadline_ms=deadline,
        function_arn=_str(data.get("invoked_function_arn")) or "",
        xray_trace_id=_str(data.get("xray_trace_id")),
    )


def request_context(headers: Mapping[str, str], env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """API Gateway's `requestContext` for this request, from LWA's `x-amzn-request-context` header."""
    return _json_header(headers, REQUEST_CONTEXT_HEADER, env)


def authorizer_claims(headers: Mapping[str, str], env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The claims of the token API Gateway's Cognito authorizer verified (`requestContext.authorizer.claims`)."""
    ctx = request_context(headers, env)
    authorizer = ctx.get("authorizer") if ctx else None
    claims = authorizer.get("claims") if isinstance(authorizer, dict) else None
    return claims if isinstance(claims, dict) else None


def stream_deadline(
    headers: Mapping[str, str],
    configured_seconds: float | None,
    now: float,
    *,
    margin: float = DEFAULT_SAFETY_MARGIN_SECONDS,
    env: Mapping[str, str] | None = None,
) -> float:
    """When a stream must end with a terminal event (epoch seconds; `now` is `time.time()`): the earlier of the
    configured cap and the Lambda deadline less `margin`, never earlier than `now`. Outside Lambda only the
    configured cap applies (infinite if None)."""
    limit = float("inf") if configured_seconds is None else now + configured_seconds
    ctx = lambda_context(headers, env)
    if ctx is not None:
        limit = min(limit, ctx.deadline - margin)
    return max(now, limit)


def context_deadline(context: object, now: float) -> float | None:
    """The deadline of a plain (non-LWA) Lambda invocation, e.g. the worker's, from its context object."""
    remaining = getattr(context, "get_remaining_time_in_millis", None)
    if not callable(remaining):
        return None
    return now + float(remaining()) / 1000.0
