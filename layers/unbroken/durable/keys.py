"""API keys and tenants kept in the store, and the per-process cache every request's key lookup goes through.

A key is a record of kind `apikey` named by the SHA-256 (hex) of its secret: the secret itself is never stored, and
a presented key is found with one read by its digest. A key has a short public id (`key_...`) by which the admin API
and spend name it. A tenant record (kind `tenant`, named by the tenant) holds the tenant's own budgets and limits.

Lookups go through `RecordCache`: found and not-found answers are both kept for at most `auth.key_cache_seconds`
(5 s at most), so a revoked key is refused by every instance within that (plus the read), and a flood of made-up keys
costs one store read per key and per cache period, in bounded memory. Past half of that age an answer is read again
in the background, so a busy process's requests do not wait for the store before their upstream call.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from unbroken.durable.spend import Account
from unbroken.errors import Failure
from unbroken.journal.store import AlreadyExists, Fenced, Record, Store, StoreError

log = logging.getLogger("unbroken.keys")

KEY_KIND = "apikey"
TENANT_KIND = "tenant"
# What a store key's secret starts with: only such keys are looked up in the store (a JWT or a YAML key never is).
SECRET_PREFIX = "sk-ub-"
KEY_ID_PREFIX = "key_"
# Compare-and-set retries of an admin update that raced another one.
_CAS_TRIES = 5

_T = TypeVar("_T")


def secret_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def new_key_id() -> str:
    return KEY_ID_PREFIX + secrets.token_hex(8)


@dataclass(frozen=True, slots=True)
class Budgets:
    """USD a key or tenant may spend per UTC day and month (None: no budget)."""

    daily_usd: float | None = None
    monthly_usd: float | None = None

    def as_dict(self) -> dict[str, float | None]:
        return {"daily_usd": self.daily_usd, "monthly_usd": self.monthly_usd}

    @staticmethod
    def of(data: Any) -> Budgets:
        data = data if isinstance(data, dict) else {}
        return Budgets(_num(data.get("daily_usd")), _num(data.get("monthly_usd")))


@dataclass(frozen=True, slots=True)
class Limits:
    """Requests and tokens (input + output) per minute (None: no limit)."""

    rpm: int | None = None
    tpm: int | None = None

    def as_dict(self) -> dict[str, int | None]:
        return {"rpm": self.rpm, "tpm": self.tpm}

    @staticmethod
    def of(data: Any) -> Limits:
        data = data if isinstance(data, dict) else {}
        rpm, tpm = _num(data.get("rpm")), _num(data.get("tpm"))
        return Limits(None if rpm is None else int(rpm), None if tpm is None else int(tpm))


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    """A key as stored (`digest` is the record's name, never shown by the admin API)."""

    id: str
    digest: str
    tenant: str
    name: str | None = None
    models: tuple[str, ...] | None = None  # None: every model
    budgets: Budgets = field(default_factory=Budgets)
    limits: Limits = field(default_factory=Limits)
    expires_at: float | None = None
    revoked: bool = False
    revoked_at: float | None = None
    created_at: float = 0.0
    version: int = 0

    def data(self) -> dict[str, Any]:
        return {"id": self.id, "tenant": self.tenant, "name": self.name,
                "models": None if self.models is None else list(self.models), "budgets": self.budgets.as_dict(),
                "limits": self.limits.as_dict(), "expires_at": self.expires_at, "revoked": self.revoked,
                "revoked_at": self.revoked_at, "created_at": self.created_at}

    @staticmethod
    def of(record: Record) -> ApiKeyRecord:
        d = record.data
        models = d.get("models")
        return ApiKeyRecord(
            id=str(d.get("id") or ""), digest=record.name, tenant=str(d.get("tenant") or ""), name=d.get("name"),
            models=None if models is None else tuple(str(m) for m in models), budgets=Budgets.of(d.get("budgets")),
            limits=Limits.of(d.get("limits")), expires_at=_num(d.get("expires_at")),
            revoked=bool(d.get("revoked")), revoked_at=_num(d.get("revoked_at")),
            created_at=_num(d.get("created_at")) or 0.0, version=record.version)

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and self.expires_at <= now

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass(frozen=True, slots=True)
class TenantRecord:
    tenant: str
    budgets: Budgets = field(default_factory=Budgets)
    limits: Limits = field(default_factory=Limits)
    version: int = 0

    def data(self) -> dict[str, Any]:
        return {"budgets": self.budgets.as_dict(), "limits": self.limits.as_dict()}

    @staticmethod
    def of(record: Record) -> TenantRecord:
        return TenantRecord(record.name, Budgets.of(record.data.get("budgets")), Limits.of(record.data.get("limits")),
                            record.version)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the tenant, the key's id (a YAML key's or a store key's; None for a token or an anonymous
    caller) and, for a store key, its record (allowed models, budgets, limits)."""

    tenant: str
    key_id: str | None = None
    key: ApiKeyRecord | None = None

    @property
    def account(self) -> Account:
        return Account(self.tenant, self.key_id)


class RecordCache:
    """Records of one kind by name, each answer (a record or None) kept for at most `max_age` seconds. At most
    `max_entries` are kept; past that the oldest go first.

    An answer older than half of `max_age` is still returned at once, and read again behind it (one read per name
    at a time): a process asked for a name more often than every `max_age / 2` never waits for the store on the
    request's path (every request reads its tenant's record before its upstream call). An answer older than
    `max_age` is read before it is returned, as before; a background answer never replaces a newer one, and one
    that was in flight when the name was forgotten (an admin write) is dropped."""

    def __init__(self, store: Store, kind: str, *, max_age: float, max_entries: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.kind = kind
        self.max_age = max_age
        self.max_entries = max_entries
        self._clock = clock
        self._entries: dict[str, tuple[float, Record | None]] = {}
        self._refreshing: dict[str, object] = {}  # name -> the token of its background read in flight
        self._tasks: set[asyncio.Task[None]] = set()
        self.reads = 0  # store reads made, for tests and benchmarks

    async def get(self, name: str) -> Record | None:
        now = self._clock()
        hit = self._entries.get(name)
        if hit is not None and now - hit[0] <= self.max_age:
            if now - hit[0] > self.max_age / 2 and name not in self._refreshing:
                self._refresh(name, now)
            return hit[1]
        record = await self.store.get_record(self.kind, name)
        self.reads += 1
        self._keep(name, now, record)
        return record

    def forget(self, name: str) -> None:
        self._entries.pop(name, None)
        self._refreshing.pop(name, None)  # a read in flight may be from before the write that made us forget

    async def settle(self) -> None:
        """Wait for the background reads in flight (tests; a clean shutdown)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _keep(self, name: str, read_at: float, record: Record | None) -> None:
        current = self._entries.get(name)
        if current is not None and current[0] > read_at:
            return  # a newer answer is in: an older read finishing late must not replace it
        self._entries.pop(name, None)
        while len(self._entries) >= self.max_entries:
            self._entries.pop(next(iter(self._entries)))
        self._entries[name] = (read_at, record)

    def _refresh(self, name: str, now: float) -> None:
        token = self._refreshing[name] = object()

        async def read() -> None:
            try:
                record = await self.store.get_record(self.kind, name)
            except Exception as exc:  # the old answer stays until max_age; the read past it reports the failure
                log.warning("background read of a %s record failed: %s", self.kind, type(exc).__name__)
                return
            finally:
                current = self._refreshing.get(name) is token  # not forgotten since (nor a newer read started)
                if current:
                    del self._refreshing[name]
            self.reads += 1
            if current:
                self._keep(name, now, record)

        task = asyncio.get_running_loop().create_task(read(), name=f"refresh {self.kind} record")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


@dataclass(slots=True)
class Accounts:
    """The store's keys and tenants as one process sees them: cached lookups for requests, fresh reads and
    compare-and-set writes for the admin API."""

    store: Store
    keys: RecordCache
    tenants: RecordCache

    @staticmethod
    def over(store: Store, *, max_age: float, max_entries: int) -> Accounts:
        return Accounts(store, RecordCache(store, KEY_KIND, max_age=max_age, max_entries=max_entries),
                        RecordCache(store, TENANT_KIND, max_age=max_age, max_entries=max_entries))

    async def settle(self) -> None:
        """Wait for the caches' background reads in flight."""
        await self.keys.settle()
        await self.tenants.settle()

    # -- requests -----------------------------------------------------------------------------------------------

    async def key_for_secret(self, secret: str) -> ApiKeyRecord | None:
        record = await _read(self.keys.get(secret_digest(secret)))
        return ApiKeyRecord.of(record) if record is not None else None

    async def tenant(self, tenant: str) -> TenantRecord:
        record = await _read(self.tenants.get(tenant))
        return TenantRecord.of(record) if record is not None else TenantRecord(tenant)

    # -- admin --------------------------------------------------------------------------------------------------

    async def create_key(self, tenant: str, *, name: str | None, models: list[str] | None, budgets: Budgets,
                         limits: Limits, expires_at: float | None) -> tuple[ApiKeyRecord, str]:
        """A new key and its secret (returned here only: the store keeps its digest)."""
        secret = new_secret()
        key = ApiKeyRecord(id=new_key_id(), digest=secret_digest(secret), tenant=tenant, name=name,
                           models=None if models is None else tuple(models), budgets=budgets, limits=limits,
                           expires_at=expires_at, created_at=time.time())
        try:
            version = await self.store.put_record(KEY_KIND, key.digest, key.data(), expected_version=0)
        except AlreadyExists:  # 256 random bits collided: never in practice
            raise Failure("conflict", "Key creation collided; try again.") from None
        self.keys.forget(key.digest)
        return replace(key, version=version), secret

    async def list_keys(self, tenant: str | None = None) -> list[ApiKeyRecord]:
        records = await _read(self.store.list_records(KEY_KIND))
        keys = [ApiKeyRecord.of(r) for r in records]
        keys = [k for k in keys if tenant is None or k.tenant == tenant]
        return sorted(keys, key=lambda k: (k.created_at, k.id))

    async def key_by_id(self, key_id: str) -> ApiKeyRecord:
        for key in await self.list_keys():
            if key.id == key_id:
                return key
        raise Failure("not_found", f"No API key '{key_id}'.", param="key_id", code="key_not_found")

    async def update_key(self, key_id: str, change: Callable[[ApiKeyRecord], ApiKeyRecord]) -> ApiKeyRecord:
        """Apply `change` to the key with compare-and-set (retried if another update won the race)."""
        for _ in range(_CAS_TRIES):
            key = await self.key_by_id(key_id)
            updated = change(key)
            try:
                version = await self.store.put_record(KEY_KIND, key.digest, updated.data(),
                                                      expected_version=key.version)
            except Fenced:
                continue
            except StoreError as exc:
                raise _unavailable(exc) from None
            self.keys.forget(key.digest)  # this process refuses a revoked key at once
            return replace(updated, version=version)
        raise Failure("conflict", f"API key '{key_id}' is being changed by another request; try again.")

    async def update_tenant(self, tenant: str, change: Callable[[TenantRecord], TenantRecord]) -> TenantRecord:
        for _ in range(_CAS_TRIES):
            record = await _read(self.store.get_record(TENANT_KIND, tenant))
            current = TenantRecord.of(record) if record is not None else TenantRecord(tenant)
            updated = change(current)
            try:
                version = await self.store.put_record(TENANT_KIND, tenant, updated.data(),
                                                      expected_version=current.version)
            except (Fenced, AlreadyExists):
                continue
            except StoreError as exc:
                raise _unavailable(exc) from None
            self.tenants.forget(tenant)
            return replace(updated, version=version)
        raise Failure("conflict", f"Tenant '{tenant}' is being changed by another request; try again.")

    async def list_tenants(self) -> list[TenantRecord]:
        return [TenantRecord.of(r) for r in await _read(self.store.list_records(TENANT_KIND))]


def _unavailable(exc: StoreError) -> Failure:
    return Failure("unavailable", f"The store could not be read or written ({type(exc).__name__}).",
                   code="store_unavailable")


async def _read(pending: Awaitable[_T]) -> _T:
    """Await a store call; a store failure is a 503 of its own (never a 500 that looks like a bug)."""
    try:
        return await pending
    except StoreError as exc:
        raise _unavailable(exc) from None
