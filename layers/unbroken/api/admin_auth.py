"""Who may use the operator routes (`/admin/v1/...`): an admin key (`auth.admin_keys`) as a bearer token under
`unbroken serve`; on AWS the admin function sits behind an IAM-authorised API Gateway route, and its entry point
sets `app.state.admin_trusted` because API Gateway has already checked the caller's SigV4 signature."""

from __future__ import annotations

from fastapi import Request

from unbroken import logs
from unbroken.api.auth import presented_key
from unbroken.config import Config
from unbroken.errors import Failure


def require_admin(request: Request) -> None:
    """FastAPI dependency: passes for an operator, else a 401 (no admin keys configured: a 401 that says so)."""
    if getattr(request.app.state, "admin_trusted", False):
        logs.bind(tenant="admin:iam")
        return
    config: Config = request.app.state.runtime.config
    if not config.auth.admin_keys:
        raise Failure("unauthorized", "The admin routes are off: configure auth.admin_keys.", code="admin_disabled")
    key = presented_key(request)
    if key is None or not config.auth.is_admin_key(key):
        raise Failure("unauthorized", "Incorrect admin key provided.", code="invalid_admin_key")
    logs.bind(tenant="admin")
