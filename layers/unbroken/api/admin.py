"""The admin API under `/admin/v1` (README "Admin API"): API keys in the store, tenants' budgets and limits, spend.

Every route needs an operator (`admin_auth.require_admin`: an admin key under `unbroken serve`, IAM on AWS) and a
store. A key's secret is in the answer that creates it and nowhere else, ever; no answer holds a key's digest.
Every error is the spec's error object.
"""

from __future__ import annotations

import calendar
import time
from dataclasses import replace
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from unbroken.api.admin_auth import require_admin
from unbroken.durable import spend
from unbroken.durable.keys import Accounts, ApiKeyRecord, Budgets, Limits, TenantRecord
from unbroken.durable.runtime import Runtime
from unbroken.errors import Failure, invalid
from unbroken.protocol.body import parse_json, validate

router = APIRouter(prefix="/admin/v1", dependencies=[Depends(require_admin)])

# A spend read covers at most this many days, and at most this many (name, day) counters.
MAX_SPEND_DAYS = 92
MAX_SPEND_CELLS = 20_000

_Settings = TypeVar("_Settings", Budgets, Limits)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BudgetsBody(_Body):
    daily_usd: float | None = Field(default=None, ge=0)
    monthly_usd: float | None = Field(default=None, ge=0)


class LimitsBody(_Body):
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)


class KeySettingsBody(_Body):
    """What a key's owner may change; a field left out stays as it is (inside budgets and limits too), null
    clears it."""

    name: str | None = Field(default=None, max_length=200)
    models: list[Annotated[str, Field(min_length=1)]] | None = None
    budgets: BudgetsBody | None = None
    limits: LimitsBody | None = None
    expires_at: float | None = Field(default=None, gt=0)  # epoch seconds


class CreateKeyBody(KeySettingsBody):
    tenant: str = Field(min_length=1, max_length=200)


class TenantBody(_Body):
    budgets: BudgetsBody | None = None
    limits: LimitsBody | None = None


def _accounts(request: Request) -> tuple[Runtime, Accounts]:
    runtime: Runtime = request.app.state.runtime
    if runtime.accounts is None:
        raise Failure("unavailable", "The admin API needs a store (keys, budgets and spend are kept there).",
                      code="store_required")
    return runtime, runtime.accounts


def _key_view(key: ApiKeyRecord) -> dict[str, Any]:
    """A key as the admin API shows it: never its secret, never its digest."""
    return {"object": "api_key", **key.data()}


def _tenant_view(tenant: TenantRecord) -> dict[str, Any]:
    return {"object": "tenant", "tenant": tenant.tenant, **tenant.data()}


def _check_models(runtime: Runtime, models: list[str] | None) -> None:
    for name in models or ():
        if runtime.config.configured_model(name) is None:
            raise invalid(f"No model '{name}' in this router's configuration.", param="models",
                          code="model_not_found")


def _merged(current: _Settings, body: BudgetsBody | LimitsBody | None) -> _Settings:
    """`current` with the fields the body gave (None: unchanged)."""
    if body is None:
        return current
    return replace(current, **{f: getattr(body, f) for f in body.model_fields_set})


def _budgets_and_limits(body: KeySettingsBody | TenantBody, budgets: Budgets, limits: Limits) -> dict[str, Any]:
    """The budgets and limits a PATCH body changes: a field left out stays, null clears it."""
    given = body.model_fields_set
    changes: dict[str, Any] = {}
    if "budgets" in given:
        changes["budgets"] = _merged(budgets, body.budgets) if body.budgets is not None else Budgets()
    if "limits" in given:
        changes["limits"] = _merged(limits, body.limits) if body.limits is not None else Limits()
    return changes


def _apply(key: ApiKeyRecord, body: KeySettingsBody) -> ApiKeyRecord:
    given = body.model_fields_set
    changes = _budgets_and_limits(body, key.budgets, key.limits)
    if "name" in given:
        changes["name"] = body.name
    if "models" in given:
        changes["models"] = None if body.models is None else tuple(body.models)
    if "expires_at" in given:
        changes["expires_at"] = body.expires_at
    return replace(key, **changes)


# -- keys ---------------------------------------------------------------------------------------------------------


@router.post("/keys", status_code=201, response_model=None)
async def create_key(request: Request) -> JSONResponse:
    """A new key; the answer holds its secret, which is never shown again."""
    runtime, accounts = _accounts(request)
    body = validate(CreateKeyBody, parse_json(await request.body()))
    _check_models(runtime, body.models)
    key, secret = await accounts.create_key(body.tenant, name=body.name, models=body.models,
                                            budgets=_merged(Budgets(), body.budgets),
                                            limits=_merged(Limits(), body.limits), expires_at=body.expires_at)
    return JSONResponse({**_key_view(key), "secret": secret}, status_code=201)


@router.get("/keys", response_model=None)
async def list_keys(request: Request, tenant: str | None = None) -> dict[str, Any]:
    _, accounts = _accounts(request)
    return {"object": "list", "data": [_key_view(k) for k in await accounts.list_keys(tenant)]}


@router.get("/keys/{key_id}", response_model=None)
async def get_key(request: Request, key_id: str) -> dict[str, Any]:
    _, accounts = _accounts(request)
    return _key_view(await accounts.key_by_id(key_id))


@router.patch("/keys/{key_id}", response_model=None)
async def update_key(request: Request, key_id: str) -> dict[str, Any]:
    """Change a key's name, models, budgets, limits or expiry (only the fields given)."""
    runtime, accounts = _accounts(request)
    body = validate(KeySettingsBody, parse_json(await request.body()))
    _check_models(runtime, body.models)
    return _key_view(await accounts.update_key(key_id, lambda key: _apply(key, body)))


@router.post("/keys/{key_id}/revoke", response_model=None)
async def revoke_key(request: Request, key_id: str) -> dict[str, Any]:
    """Refused by this instance at once, by every other within `auth.key_cache_seconds`. Revoking twice is the
    same as once."""
    _, accounts = _accounts(request)
    now = time.time()
    return _key_view(await accounts.update_key(
        key_id, lambda key: key if key.revoked else replace(key, revoked=True, revoked_at=now)))


# -- tenants ------------------------------------------------------------------------------------------------------


@router.get("/tenants", response_model=None)
async def list_tenants(request: Request) -> dict[str, Any]:
    _, accounts = _accounts(request)
    return {"object": "list", "data": [_tenant_view(t) for t in await accounts.list_tenants()]}


@router.get("/tenants/{tenant}", response_model=None)
async def get_tenant(request: Request, tenant: str) -> dict[str, Any]:
    _, accounts = _accounts(request)
    return _tenant_view(await accounts.tenant(tenant))


@router.patch("/tenants/{tenant}", response_model=None)
async def update_tenant(request: Request, tenant: str) -> dict[str, Any]:
    """A tenant's budgets and limits: they apply to every caller of the tenant (YAML keys, store keys, tokens)."""
    _, accounts = _accounts(request)
    body = validate(TenantBody, parse_json(await request.body()))

    return _tenant_view(await accounts.update_tenant(
        tenant, lambda current: replace(current, **_budgets_and_limits(body, current.budgets, current.limits))))


# -- spend --------------------------------------------------------------------------------------------------------


def _day(value: str | None, param: str, default: float) -> float:
    if value is None:
        return default
    try:
        return float(calendar.timegm(time.strptime(value, "%Y-%m-%d")))
    except ValueError:
        raise invalid(f"{param} must be a date as YYYY-MM-DD (UTC).", param=param) from None


async def _names(runtime: Runtime, accounts: Accounts, by: spend.Dimension) -> list[str]:
    """Everything of a dimension spend may have been counted for."""
    config = runtime.config
    if by == "model":
        return [m.name for m in config.models]
    if by == "deployment":
        return [f"{m.name}/{d.name}" for m in config.models for d in m.deployments]
    keys = await accounts.list_keys()
    if by == "key":
        return [config.yaml_key_id(i) for i in range(len(config.api_keys))] + [k.id for k in keys]
    tenants = [k.tenant for k in config.api_keys] + [k.tenant for k in keys] + \
        [t.tenant for t in await accounts.list_tenants()]
    return list(dict.fromkeys(tenants))


@router.get("/spend", response_model=None)
async def read_spend(request: Request, by: Literal["key", "tenant", "model", "deployment"] = "key",
                     id: Annotated[str | None, Query(min_length=1)] = None,
                     from_: Annotated[str | None, Query(alias="from")] = None,
                     to: str | None = None) -> dict[str, Any]:
    """Spend per UTC day of one key, tenant, model or deployment (`id`; a deployment as `model/deployment`) or of
    all of them, `from`..`to` (dates, both included, at most `MAX_SPEND_DAYS`; default today)."""
    runtime, accounts = _accounts(request)
    now = time.time()
    last = _day(to, "to", now)
    first = _day(from_, "from", last)
    if first > last:
        raise invalid("from must not be after to.", param="from")
    days = spend.days_between(first, last)
    if len(days) > MAX_SPEND_DAYS:
        raise invalid(f"A spend read covers at most {MAX_SPEND_DAYS} days.", param="from")
    names = [id] if id is not None else await _names(runtime, accounts, by)
    if len(names) * len(days) > MAX_SPEND_CELLS:
        raise invalid(f"Too much at once ({len(names)} x {len(days)} days): name an id or a shorter range.",
                      param="id")
    assert runtime.store is not None
    rows, totals = await spend.report(runtime.store, runtime.counters, by, names, days)
    return {"object": "spend", "by": by, "from": days[0], "to": days[-1], "data": rows, "totals": totals}
