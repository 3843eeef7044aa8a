"""The gateway Lambda's entry point (`functions/gateway/run.sh` → uvicorn → `unbroken.app:lambda_app`): the app
built from the environment. Config from UNBROKEN_CONFIG (a file) or UNBROKEN_CONFIG_SSM (a parameter), provider
secrets from UNBROKEN_SECRETS (Secrets Manager ARNs), store from UNBROKEN_STORE, and background responses handed
to the worker Lambda named by UNBROKEN_WORKER_FUNCTION. Two template parameters override the config:
UNBROKEN_CORS_ALLOW_ORIGINS (comma-separated: server.cors.allow_origins) and UNBROKEN_GATEWAY_TENANT_CLAIM
(auth.gateway_tenant_claim, set when the API has a Cognito authorizer); UNBROKEN_METRICS and UNBROKEN_TRACING
("true"/"false") set server.metrics and server.tracing. Logs are JSON lines (`logs.setup_logging`, level from
UNBROKEN_LOG_LEVEL), set up here because uvicorn, not the CLI, starts this app.

On Lambda the request body limit (`server.max_body_bytes`, 10 MiB by default) is capped at `LAMBDA_MAX_BODY_BYTES`:
Lambda refuses an invocation payload over 6 MB (6,291,456 bytes) and the payload is the whole event (headers,
request context, the body as a JSON string, where escaping can grow it), so a larger body would never reach the
router; capped, a body between the two limits gets the router's own 413 instead of a gateway error."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI

from unbroken import aws, logs
from unbroken.api.app import create_app
from unbroken.api.identity import in_lambda
from unbroken.config import Config, load_config, parse_config
from unbroken.durable.runtime import BackgroundLauncher
from unbroken.journal.backends import open_store

log = logging.getLogger("unbroken.app")

# Lambda's 6 MB invocation payload less 512 KiB for the event around the body.
LAMBDA_MAX_BODY_BYTES = 6 * 1024 * 1024 - 512 * 1024


def cap_body_for_lambda(config: Config) -> Config:
    """The config with `server.max_body_bytes` at most `LAMBDA_MAX_BODY_BYTES`."""
    wanted = config.server.max_body_bytes
    if wanted <= LAMBDA_MAX_BODY_BYTES:
        return config
    log.info("server.max_body_bytes capped for Lambda", extra={"configured": wanted, "cap": LAMBDA_MAX_BODY_BYTES})
    server = config.server.model_copy(update={"max_body_bytes": LAMBDA_MAX_BODY_BYTES})
    return config.model_copy(update={"server": server})


def _worker_launcher(function_name: str) -> BackgroundLauncher:
    async def launch(response_id: str, epoch: int) -> None:
        # The worker Lambda outlives this request and hands off to a fresh invocation before its 15 minutes end.
        await asyncio.to_thread(aws.invoke_worker, function_name,
                                {"kind": "background", "response_id": response_id, "epoch": epoch})

    return launch


def config_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    """The part of the config the deployment's environment sets (empty variables set nothing)."""
    out: dict[str, Any] = {}
    origins = [o.strip() for o in env.get("UNBROKEN_CORS_ALLOW_ORIGINS", "").split(",") if o.strip()]
    if origins:
        out["server"] = {"cors": {"allow_origins": origins}}
    claim = env.get("UNBROKEN_GATEWAY_TENANT_CLAIM", "").strip()
    if claim:
        out["auth"] = {"gateway_tenant_claim": claim}
    for name, key in (("UNBROKEN_METRICS", "metrics"), ("UNBROKEN_TRACING", "tracing")):
        value = env.get(name, "").strip().lower()
        if value:
            out.setdefault("server", {})[key] = value in ("1", "true", "yes", "on")
    return out


def app_from_env() -> FastAPI:
    logs.setup_logging(os.environ.get("UNBROKEN_LOG_LEVEL", "INFO"))
    secrets = [a for a in os.environ.get("UNBROKEN_SECRETS", "").split(",") if a.strip()]
    if secrets:
        aws.load_secrets_into_env(secrets)
    ssm_name = os.environ.get("UNBROKEN_CONFIG_SSM")
    overrides = config_overrides(os.environ)
    if ssm_name:
        config = parse_config(aws.read_config_text_from_ssm(ssm_name), f"ssm:{ssm_name}", overrides=overrides)
    else:
        config = load_config(os.environ.get("UNBROKEN_CONFIG", "router.yaml"), overrides=overrides)
    for model_name, deployment, why in config.switched_off:
        log.warning("deployment switched off: %s/%s (%s)", model_name, deployment, why,
                    extra={"model": model_name, "deployment": deployment, "reason": why})
    for model_name, d in config.unpriced:
        log.warning("deployment without a price: %s/%s (%s)", model_name, d.name, d.no_price_reason,
                    extra={"model": model_name, "deployment": d.name})
    lambda_env = in_lambda()
    if lambda_env:
        config = cap_body_for_lambda(config)
    logs.configure(metrics=config.server.metrics, tracing=config.server.tracing)
    store_url = os.environ.get("UNBROKEN_STORE")
    worker = os.environ.get("UNBROKEN_WORKER_FUNCTION")
    return create_app(config, open_store(store_url) if store_url else None,
                      launch_background=_worker_launcher(worker) if worker else None,
                      lambda_env=dict(os.environ) if lambda_env else None)


def admin_app_from_env() -> FastAPI:
    """The admin function's app (functions/admin, through Mangum): the same app, with every caller an operator,
    because its only route is IAM-authorised: API Gateway checked the SigV4 signature before invoking."""
    app = app_from_env()
    app.state.admin_trusted = True
    return app


class _LazyApp:
    """ASGI app built on first use, so importing this module (and uvicorn's readiness) stays cheap."""

    def __init__(self) -> None:
        self._app: FastAPI | None = None
        # Now, not on the first request: uvicorn's own lines (startup, errors) are JSON lines too.
        logs.setup_logging(os.environ.get("UNBROKEN_LOG_LEVEL", "INFO"))

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self._app is None:
            self._app = app_from_env()
        await self._app(scope, receive, send)


lambda_app = _LazyApp()
