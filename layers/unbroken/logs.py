"""Logs and metrics (README "Logs and metrics"): one JSON object per line, and CloudWatch metrics as EMF.

Logs: Powertools' `LambdaPowertoolsFormatter` (level, location, message, ISO-8601 timestamp, service) plus the
`extra` fields of the call and the fields bound to the request being served (`bind`: `correlation_id` = the
response id, `tenant`, `model`), kept in a context variable that an ASGI middleware opens per request
(`request_context`). Callers pass only ids, names, counts, durations and costs: never prompt text, outputs, keys or
upstream secrets; nothing here adds any.

Metrics: `emit_metrics` writes one EMF blob (a JSON line with the `_aws` key on stdout, which CloudWatch turns into
metrics) when `configure(metrics=True)`; otherwise it does nothing and the log lines carry the same numbers.
Namespace and service come from POWERTOOLS_METRICS_NAMESPACE / POWERTOOLS_SERVICE_NAME. Callers emit once per
response or request, never per token. Powertools' metrics and tracer modules are imported only when switched on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from typing import Any

DEFAULT_SERVICE = "unbroken"
DEFAULT_NAMESPACE = "unbroken"

_request: ContextVar[dict[str, Any] | None] = ContextVar("unbroken_log_context", default=None)


class _Switches:
    metrics = False
    namespace = DEFAULT_NAMESPACE
    service = DEFAULT_SERVICE


_switches = _Switches()


# -- request context ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def request_context() -> Iterator[dict[str, Any]]:
    """A fresh set of bound fields for one request (the ASGI middleware). The dict is shared by every task the
    request starts, so fields bound later in a route (the response id once it exists) reach them too."""
    fields: dict[str, Any] = {}
    token = _request.set(fields)
    try:
        yield fields
    finally:
        _request.reset(token)


def bind(**fields: Any) -> None:
    """Fields every log line of the current request carries from now on (`correlation_id`, `tenant`, `model`)."""
    current = _request.get()
    if current is None:
        _request.set(dict(fields))  # no request around (worker, tests): this task's context only
    else:
        current.update(fields)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        fields = _request.get()
        if fields:
            for key, value in fields.items():
                if key not in record.__dict__:
                    setattr(record, key, value)
        response_id = record.__dict__.get("response_id")
        if response_id is not None and "correlation_id" not in record.__dict__:
            setattr(record, "correlation_id", response_id)  # noqa: B010 - a field of the JSON line
        return True


# -- setup -------------------------------------------------------------------------------------------------------


def setup_logging(level: str = "INFO", *, service: str | None = None) -> None:
    """JSON lines on stderr for the whole process (uvicorn's own loggers included)."""
    from aws_lambda_powertools.logging.formatter import LambdaPowertoolsFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LambdaPowertoolsFormatter(
        use_rfc3339=True, utc=True, service=service or os.environ.get("POWERTOOLS_SERVICE_NAME", DEFAULT_SERVICE)))
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        # uvicorn's loggers print through the root handler (JSON), not handlers of their own.
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # uvicorn's access log would print every request line with its query string; the access line is our own.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)


def configure(*, metrics: bool = False, tracing: bool = False, env: Mapping[str, str] | None = None) -> None:
    """The process's telemetry switches (config `server.metrics`, `server.tracing`)."""
    environ = os.environ if env is None else env
    _switches.metrics = metrics
    _switches.namespace = environ.get("POWERTOOLS_METRICS_NAMESPACE") or DEFAULT_NAMESPACE
    _switches.service = environ.get("POWERTOOLS_SERVICE_NAME") or DEFAULT_SERVICE
    if metrics:
        import aws_lambda_powertools.metrics  # noqa: F401 - loaded at startup, not on the first response
    if tracing:
        setup_tracing(_switches.service)


def setup_tracing(service: str) -> Any:
    """X-Ray through Powertools' Tracer (patches botocore and httpx); needs the aws-xray-sdk package."""
    try:
        from aws_lambda_powertools import Tracer

        return Tracer(service=service, patch_modules=["botocore", "httpx"])
    except ImportError as exc:
        raise RuntimeError("server.tracing needs the aws-xray-sdk package "
                           "(pip install 'aws-lambda-powertools[tracer]')") from exc


# -- metrics -----------------------------------------------------------------------------------------------------

# name -> unit (CloudWatch's unit names as Powertools spells them)
UNITS = {
    "Requests": "Count",
    "TimeToFirstToken": "Milliseconds",
    "OutputTokensPerSecond": "CountPerSecond",
    "InputTokens": "Count",
    "OutputTokens": "Count",
    "CostUSD": "NoUnit",
    "Failovers": "Count",
    "Continuations": "Count",
    "Takeovers": "Count",
    "Resumes": "Count",
}


def emit_metrics(dimensions: Mapping[str, str], values: Mapping[str, float | None]) -> None:
    """One EMF blob with `values` (names from `UNITS`; None is left out) under `dimensions` (keep them bounded:
    configured model and deployment names, never ids or tenants)."""
    if not _switches.metrics:
        return
    from aws_lambda_powertools.metrics import EphemeralMetrics, MetricUnit

    # Ephemeral: this blob's metrics only, whatever else runs concurrently in the process.
    blob = EphemeralMetrics(namespace=_switches.namespace, service=_switches.service)
    for dimension, label in dimensions.items():
        blob.add_dimension(name=dimension, value=label or "-")
    for name, value in values.items():
        if value is not None:
            blob.add_metric(name=name, unit=getattr(MetricUnit, UNITS[name]), value=float(value))
    try:
        blob.flush_metrics()  # print()s the blob: a JSON line on stdout
        sys.stdout.flush()
    except Exception as exc:  # metrics must never fail a response
        logging.getLogger("unbroken.metrics").warning("metrics not emitted", extra={"error": type(exc).__name__})
