"""Admin entry point: the `/admin/v1` routes (keys, budgets, spend) behind an IAM-authorised API Gateway route,
through Mangum, buffered. API Gateway has verified the caller's SigV4 signature before this runs."""

from __future__ import annotations

from typing import Any

_handler: Any = None


def handler(event: dict[str, Any], context: object) -> dict[str, Any]:
    global _handler
    if _handler is None:  # built on the first call: config, store and app once per container
        from mangum import Mangum

        from unbroken.app import admin_app_from_env

        _handler = Mangum(admin_app_from_env(), lifespan="off")
    result: dict[str, Any] = _handler(event, context)
    return result
