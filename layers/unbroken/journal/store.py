"""The journal store interface: one header per response plus its committed event batches.

Every implementation (memory, SQLite, DynamoDB) passes the same contract suite (tests/contract/test_store_contract.py).
The header carries the fencing state: `owner_epoch` (bumped by a takeover), `lease_expires_at` (renewed by the
producer while it generates) and `last_seq` (the sequence number of the last committed event, -1 before any).

Rules every implementation keeps (the contract suite checks each):
- `append` is atomic: the events and the header update land together or not at all; so is `create` with a first
  batch (the header and its first events, or nothing).
- `prepare` makes nothing visible, and a create of the header it returns is one write whatever the request's size.
- `read_events` returns exactly the dicts that were appended (same keys, values and `sequence_number`s), dense.
- After `take_over` no append with an older epoch succeeds, so nothing a zombie writes becomes visible.
- A terminal status is final: `take_over` refuses a terminal response, and the owner stops after its terminal commit.
- Expired data (`expires_at` in the past) is invisible to every read, even before it is physically removed.

Beside the journal, two small shared facilities every router instance reads and writes (the same rules, the same
contract suite):
- **Counters**: named sets of numeric fields that only ever grow by increments (`add_counters`). Increments commute,
  so instances batch them locally and flush now and then without coordination; spend, rate limits and the routing
  stats are built on them. Each key's increment is atomic; different keys are independent.
- **Records**: small JSON documents by (kind, name) with a version for compare-and-set (`put_record`): API keys,
  budgets, circuit-breaker state.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from unbroken.journal.codec import check_dense, encode_json

# Response states as stored; terminal ones never change again.
TERMINAL_STATUSES = frozenset({"completed", "incomplete", "failed", "cancelled"})
# The events that end a response's stream (the spec's three; a cancel ends with `response.incomplete`). The one
# definition: the journal stops following at them, the protocol layer emits them.
TERMINAL_EVENT_TYPES = frozenset({"response.completed", "response.incomplete", "response.failed"})


class StoreError(Exception):
    """The store could not do what was asked (after its own retries)."""


class Fenced(StoreError):
    """A conditional write lost: another writer owns the response now (epoch moved) or `last_seq` moved."""


class NotFound(Fenced):
    """The response is not there (never created, deleted or expired). A `Fenced` so a writer stops on it too."""


class AlreadyExists(StoreError):
    """`create` of a response id (or an idempotency key) that is already there."""


class StoreUnavailable(StoreError):
    """Throttled or unreachable past the retry bound."""


@dataclass(slots=True)
class ResponseHeader:
    id: str
    tenant: str
    created_at: float  # epoch seconds
    expires_at: float  # epoch seconds; reads filter out expired headers
    status: str = "queued"  # queued | in_progress | completed | incomplete | failed | cancelled
    owner_epoch: int = 0
    lease_expires_at: float = 0.0
    last_seq: int = -1
    # The request as the router resolved it (JSON-able): enough to rebuild context and to continue generation.
    request: dict[str, Any] = field(default_factory=dict)
    # The response object as of the last commit that changed it (terminal commits always set it).
    response: dict[str, Any] | None = None
    idempotency_key: str | None = None
    body_hash: str | None = None
    cancel_requested: bool = False
    background: bool = False
    # What `Store.prepare` did ahead for this header's `create` (store-specific). Never stored, never compared:
    # a header read back has None here.
    prepared: Any = field(default=None, compare=False, repr=False)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


@dataclass(frozen=True, slots=True)
class Prepared:
    """What one store's `prepare` did ahead for a header (`work`, store-specific), and the snapshot objects it did it
    for: its `create` uses the work only for a header that still holds these very objects."""

    by: Store
    request: dict[str, Any]
    response: dict[str, Any] | None
    work: Any


def prepared_work(header: ResponseHeader, store: Store) -> Any:
    """What `store.prepare` did for this header, or None (not prepared, by another store, or other objects since)."""
    p = header.prepared
    if isinstance(p, Prepared) and p.by is store and p.request is header.request and p.response is header.response:
        return p.work
    return None


def snapshot_blobs(header: ResponseHeader, store: Store) -> tuple[bytes, bytes | None]:
    """(request, response) of `header` encoded: as the default `Store.prepare` encoded them, or now."""
    blobs: tuple[bytes, bytes | None] | None = prepared_work(header, store)
    if blobs is not None:
        return blobs
    return encode_json(header.request), encode_json(header.response) if header.response is not None else None


@dataclass(slots=True)
class StoreStats:
    """What a store instance wrote, for benchmarks and for tests that check item sizes. Counted on success only."""

    commits: int = 0  # write requests: transactions / SQL transactions / conditional updates
    items_written: int = 0  # rows or items put or updated
    bytes_written: int = 0  # payload bytes of those items (DynamoDB: the item size as AWS meters it)
    wru: int = 0  # DynamoDB write request units (1 per KB rounded up per item, x2 in a transaction); 0 elsewhere
    max_item_bytes: int = 0  # the largest single item / row written

    def add_item(self, size: int, *, wru_factor: int = 0) -> None:
        self.items_written += 1
        self.bytes_written += size
        self.wru += wru_factor * max(1, -(-size // 1024))
        if size > self.max_item_bytes:
            self.max_item_bytes = size


@dataclass(frozen=True, slots=True)
class Record:
    """A stored document: `version` is 1 after its first put and grows by one with every put."""

    name: str
    data: dict[str, Any]
    version: int


def next_record_version(kind: str, name: str, live: int | None, expected_version: int | None) -> int:
    """The version `put_record` writes over a live record at version `live` (None: none), or the `AlreadyExists` /
    `Fenced` it raises for `expected_version` (the stores that read before writing share this rule)."""
    if expected_version == 0 and live is not None:
        raise AlreadyExists(f"record {kind}/{name} exists")
    current = live or 0
    if expected_version is not None and expected_version > 0 and current != expected_version:
        raise Fenced(f"record {kind}/{name} is at version {current}, not {expected_version}")
    return current + 1


def first_batch_span(header: ResponseHeader, events: Sequence[dict[str, Any]] | None) -> tuple[int, int] | None:
    """(first_seq, last_seq) of the batch `create` writes with `header`, None without one; `ValueError` unless it
    is dense from `header.last_seq + 1` (what every store checks before writing anything)."""
    if not events:
        return None
    span = check_dense(events)
    if span[0] != header.last_seq + 1:
        raise ValueError(f"a first batch starts at {header.last_seq + 1}, not {span[0]}")
    return span


class Store(ABC):
    """All methods are async; implementations on blocking clients run them in a thread."""

    stats: StoreStats  # set by every implementation's __init__

    @abstractmethod
    async def create(self, header: ResponseHeader, events: list[dict[str, Any]] | None = None) -> None:
        """Insert a new header. Raises `AlreadyExists` if the id exists, or if `header.idempotency_key` is set and
        the tenant already has a live response under that key.

        With `events` (dense, from sequence number `header.last_seq + 1`), the header and this first batch are
        one commit: a response whose producer starts before its header exists writes both when its first output
        is there, so its first token waits for one write, not two. The header's `last_seq` becomes the batch's
        last. `ValueError` if the events are not dense from there; nothing is written when the create fails."""

    async def prepare(self, header: ResponseHeader) -> ResponseHeader:
        """The header to `create` instead of `header`, with the work that can be done before the create is due
        done now. A response whose header goes in with its first output prepares it while its upstream call is in
        flight, so that encoding a large request (and on DynamoDB writing its snapshot items) is not on the first
        token's path. Nothing becomes visible: until `create`, every read sees no response; a prepared header that
        is never created leaves at most unreferenced items that expire with it. The header's request and response
        objects must not change after this (a header holding other objects is created as if not prepared).
        Here: the snapshots encoded (`snapshot_blobs`), which is what the stores that keep blobs need."""
        blobs = snapshot_blobs(header, self)
        return dataclasses.replace(header, prepared=Prepared(self, header.request, header.response, blobs))

    @abstractmethod
    async def get(self, response_id: str, *, snapshots: bool = True) -> ResponseHeader | None:
        """The header, or None if absent or expired. With `snapshots=False` the (possibly large) `request` and
        `response` snapshots are not loaded: `request` is {} and `response` None; cheaper for lease/status checks."""

    @abstractmethod
    async def find_by_idempotency_key(self, tenant: str, key: str) -> ResponseHeader | None:
        """The live header the tenant created under this idempotency key, if any."""

    @abstractmethod
    async def append(
        self,
        response_id: str,
        epoch: int,
        events: list[dict[str, Any]],
        *,
        lease_expires_at: float | None = None,
        status: str | None = None,
        response: dict[str, Any] | None = None,
    ) -> bool:
        """Commit a batch atomically: the events (whose `sequence_number`s must continue densely from
        `last_seq + 1`) plus the header update (new `last_seq`, optional lease / status / response snapshot).
        Conditional on `owner_epoch == epoch` and on `last_seq` being what it was; raises `Fenced` otherwise
        (`NotFound` if the response is gone). `events` may be empty (a header-only update such as a lease renewal or
        status change; conditional on the epoch only). Events not dense among themselves raise `ValueError`.
        Returns `cancel_requested` as of this commit, so the owner learns of a cancel at its next commit."""

    @abstractmethod
    async def read_events(self, response_id: str, after_seq: int = -1) -> list[dict[str, Any]]:
        """Committed events with `sequence_number > after_seq`, in order, exactly as they were appended."""

    @abstractmethod
    async def take_over(self, response_id: str, expected_epoch: int, lease_expires_at: float) -> int:
        """Become the owner: bump `owner_epoch` from `expected_epoch` and set the lease. Returns the new epoch.
        Raises `Fenced` if the epoch is no longer `expected_epoch` or the response is terminal (a finished response
        is never continued), `NotFound` if it is gone."""

    @abstractmethod
    async def request_cancel(self, response_id: str) -> bool:
        """Set `cancel_requested`; the owner sees it at its next commit or lease renewal. False if not found."""

    @abstractmethod
    async def delete(self, response_id: str) -> bool:
        """Remove the header and every batch. True if something was deleted."""

    # -- counters and records: shared state beside the journal --------------------------------------------------

    @abstractmethod
    async def add_counters(self, increments: Mapping[str, Mapping[str, float]], *, expires_at: float) -> None:
        """Add each field's delta to the counter `key` ({key: {field: delta}}); absent keys and fields start at 0.
        Each key's update is atomic; keys are updated independently (a failure may leave some applied). Sets the
        key's expiry to `expires_at` (later increments may move it)."""

    @abstractmethod
    async def get_counters(self, keys: Sequence[str]) -> dict[str, dict[str, float]]:
        """The live counters among `keys`, {key: {field: value}}; absent or expired keys are left out."""

    @abstractmethod
    async def get_record(self, kind: str, name: str) -> Record | None:
        """The record, or None if absent or expired."""

    @abstractmethod
    async def put_record(
        self,
        kind: str,
        name: str,
        data: dict[str, Any],
        *,
        expected_version: int | None = None,
        expires_at: float | None = None,
    ) -> int:
        """Write the record and return its new version. `expected_version`: None writes unconditionally; 0 only
        creates (raises `AlreadyExists` if a live record is there); n > 0 replaces version n only (raises `Fenced`
        if the live version differs or the record is absent). `expires_at` None keeps it until deleted."""

    @abstractmethod
    async def list_records(self, kind: str) -> list[Record]:
        """Every live record of a kind, ordered by name."""

    @abstractmethod
    async def delete_record(self, kind: str, name: str) -> bool:
        """Remove the record. True if a live one was there."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
