"""Who is calling and how long this invocation may run, as far as the Lambda runtime can say.

Under the Lambda Web Adapter (LWA) every proxied request carries two JSON headers that LWA itself sets, replacing
any header of the same name the client sent (`req_headers.insert(...)` in LWA's `src/lib.rs`, `fetch_response`;
documented in its guide, `docs/guide/src/features/request-context.md`):

- `x-amzn-lambda-context`: the Rust runtime's `lambda_runtime::Context` serialised with serde, i.e.
  `{"request_id": str, "deadline": <epoch ms>, "invoked_function_arn": str, "xray_trace_id": str|null,
  "client_context": ..., "identity": ..., "env_config": {...}}` (aws-lambda-rust-runtime `lambda-runtime/src/types.rs`).
- `x-amzn-request-context`: the event's `requestContext` as `aws_lambda_events` serialises it. For API Gateway REST
  (payload v1) that is camelCase: `requestId`, `stage`, `apiId`, `accountId`, `identity.sourceIp`,
  `identity.apiKeyId`, and `authorizer` flattened back to its original keys (`principalId`, `claims`, custom context).
  HTTP APIs / function URLs (v2) put the caller's address in `http.sourceIp` instead.

Outside Lambda nothing rewrites those headers, so a client could forge them: both readers return None unless the
process runs inside Lambda under LWA (`in_lambda`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

LAMBDA_CONTEXT_HEADER = "x-amzn-lambda-context"
REQUEST_CONTEXT_HEADER = "x-amzn-request-context"

# Time kept in hand before the Lambda deadline to write the last journal batch, send the terminal event and
# `data: [DONE]`, and flush logs/metrics.
DEFAULT_SAFETY_MARGIN_SECONDS = 20.0


def _empty() -> Mapping[str, Any]:
    return MappingProxyType({})


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


@dataclass(frozen=True, slots=True)
class GatewayIdentity:
    """The caller as API Gateway saw it. Deliberately without `identity.apiKey` (the key itself is a secret):
    `api_key_id` names the key without revealing it."""

    request_id: str | None = None
    stage: str | None = None
    api_id: str | None = None
    source_ip: str | None = None
    user_agent: str | None = None
    api_key_id: str | None = None
    principal_id: str | None = None  # set by a Lambda (REQUEST/TOKEN) authorizer
    claims: Mapping[str, Any] = field(default_factory=_empty)  # Cognito user pool / JWT authorizer claims
    authorizer: Mapping[str, Any] = field(default_factory=_empty)  # the whole authorizer context (custom keys too)


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


def request_context(headers: Mapping[str, str], env: Mapping[str, str] | None = None) -> GatewayIdentity | None:
    """The caller's identity from LWA's `x-amzn-request-context` header (API Gateway's requestContext)."""
    data = _json_header(headers, REQUEST_CONTEXT_HEADER, env)
    if data is None:
        return None
    identity = data.get("identity") if isinstance(data.get("identity"), dict) else {}
    http = data.get("http") if isinstance(data.get("http"), dict) else {}  # payload v2 (HTTP API, function URL)
    authorizer = data.get("authorizer") if isinstance(data.get("authorizer"), dict) else {}
    claims = authorizer.get("claims")
    if not isinstance(claims, dict):
        jwt = authorizer.get("jwt")  # payload v2 JWT authorizer
        claims = jwt.get("claims") if isinstance(jwt, dict) and isinstance(jwt.get("claims"), dict) else {}
    return GatewayIdentity(
        request_id=_str(data.get("requestId")),
        stage=_str(data.get("stage")),
        api_id=_str(data.get("apiId")),
        source_ip=_str(identity.get("sourceIp")) or _str(http.get("sourceIp")),
        user_agent=_str(identity.get("userAgent")) or _str(http.get("userAgent")),
        api_key_id=_str(identity.get("apiKeyId")),
        principal_id=_str(authorizer.get("principalId")),
        claims=MappingProxyType(dict(claims)),
        authorizer=MappingProxyType(dict(authorizer)),
    )


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
    return now + remaining() / 1000.0
