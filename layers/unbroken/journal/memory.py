"""Process-local store for tests and `memory://`.

Each method body runs without awaiting, so on one event loop it is atomic: no locks needed. Batches and snapshots go
through the storage codec like in the durable stores, so the contract suite checks the codec on the fast path too.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from unbroken.journal.codec import check_dense, decode_events, decode_json, encode_events, encode_json
from unbroken.journal.store import (
    AlreadyExists,
    Fenced,
    NotFound,
    Record,
    ResponseHeader,
    Store,
    StoreStats,
    first_batch_span,
    next_record_version,
    snapshot_blobs,
)


@dataclasses.dataclass(slots=True)
class _Entry:
    header: ResponseHeader  # request/response kept encoded below, not in here
    request: bytes
    response: bytes | None
    batches: list[tuple[int, int, bytes]]  # (first_seq, last_seq, blob)


class MemoryStore(Store):
    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self.stats = StoreStats()
        self._clock = clock  # epoch seconds; tests move it forward to check expiry
        self._entries: dict[str, _Entry] = {}
        self._idem: dict[tuple[str, str], tuple[str, float]] = {}  # (tenant, key) -> (response_id, expires_at)
        self._counters: dict[str, tuple[dict[str, float], float]] = {}  # key -> (fields, expires_at)
        self._records: dict[tuple[str, str], tuple[bytes, int, float | None]] = {}  # -> (data, version, expires_at)

    def _live(self, response_id: str) -> _Entry | None:
        entry = self._entries.get(response_id)
        if entry is None or entry.header.expires_at <= self._clock():
            return None
        return entry

    def _count(self, *sizes: int) -> None:
        self.stats.commits += 1
        for size in sizes:
            self.stats.add_item(size)

    async def create(self, header: ResponseHeader, events: list[dict[str, Any]] | None = None) -> None:
        span = first_batch_span(header, events)
        now = self._clock()
        if header.id in self._entries:
            raise AlreadyExists(f"response {header.id} exists")
        idem_key = (header.tenant, header.idempotency_key) if header.idempotency_key is not None else None
        if idem_key is not None:
            held = self._idem.get(idem_key)
            if held is not None and held[1] > now:
                raise AlreadyExists(f"idempotency key already used by {held[0]}")
        request, response = snapshot_blobs(header, self)
        blob = encode_events(events) if span is not None and events else b""
        stored = dataclasses.replace(header, request={}, response=None, prepared=None)
        batches = []
        if span is not None:
            batches.append((span[0], span[1], blob))
            stored.last_seq = span[1]
        self._entries[header.id] = _Entry(stored, request, response, batches)
        if idem_key is not None:
            self._idem[idem_key] = (header.id, header.expires_at)
        self._count(len(request) + len(response or b"") + len(blob))

    async def get(self, response_id: str, *, snapshots: bool = True) -> ResponseHeader | None:
        entry = self._live(response_id)
        if entry is None:
            return None
        if not snapshots:
            return dataclasses.replace(entry.header, request={}, response=None)
        response = decode_json(entry.response) if entry.response is not None else None
        return dataclasses.replace(entry.header, request=decode_json(entry.request), response=response)

    async def find_by_idempotency_key(self, tenant: str, key: str) -> ResponseHeader | None:
        held = self._idem.get((tenant, key))
        if held is None or held[1] <= self._clock():
            return None
        header = await self.get(held[0])
        if header is None or header.tenant != tenant or header.idempotency_key != key:
            return None
        return header

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
        span = check_dense(events) if events else None
        entry = self._live(response_id)
        if entry is None:
            raise NotFound(f"response {response_id} not found")
        header = entry.header
        if header.owner_epoch != epoch:
            raise Fenced(f"epoch {epoch} fenced by {header.owner_epoch}")
        if span is not None and span[0] != header.last_seq + 1:
            raise Fenced(f"batch starts at {span[0]} but last_seq is {header.last_seq}")
        # Encode everything before changing anything, so a bad value leaves the entry untouched.
        blob = encode_events(events) if span is not None else b""
        snap = encode_json(response) if response is not None else None
        if span is not None:
            entry.batches.append((span[0], span[1], blob))
            header.last_seq = span[1]
        if lease_expires_at is not None:
            header.lease_expires_at = lease_expires_at
        if status is not None:
            header.status = status
        if snap is not None:
            entry.response = snap
        self._count(len(blob) + len(snap or b""))
        return header.cancel_requested

    async def read_events(self, response_id: str, after_seq: int = -1) -> list[dict[str, Any]]:
        entry = self._live(response_id)
        if entry is None:
            return []
        out: list[dict[str, Any]] = []
        for _first, last, blob in entry.batches:
            if last > after_seq:
                out.extend(e for e in decode_events(blob) if e["sequence_number"] > after_seq)
        return out

    async def take_over(self, response_id: str, expected_epoch: int, lease_expires_at: float) -> int:
        entry = self._live(response_id)
        if entry is None:
            raise NotFound(f"response {response_id} not found")
        header = entry.header
        if header.owner_epoch != expected_epoch:
            raise Fenced(f"epoch is {header.owner_epoch}, not {expected_epoch}")
        if header.terminal:
            raise Fenced(f"response {response_id} is {header.status}")
        header.owner_epoch += 1
        header.lease_expires_at = lease_expires_at
        self._count(0)
        return header.owner_epoch

    async def request_cancel(self, response_id: str) -> bool:
        entry = self._live(response_id)
        if entry is None:
            return False
        entry.header.cancel_requested = True
        self._count(0)
        return True

    async def delete(self, response_id: str) -> bool:
        entry = self._entries.pop(response_id, None)
        if entry is None:
            return False
        key = entry.header.idempotency_key
        if key is not None and self._idem.get((entry.header.tenant, key), ("",))[0] == response_id:
            del self._idem[(entry.header.tenant, key)]
        return True

    # -- counters and records ----------------------------------------------------------------------------------------

    async def add_counters(self, increments: Mapping[str, Mapping[str, float]], *, expires_at: float) -> None:
        now = self._clock()
        for key, deltas in increments.items():
            held = self._counters.get(key)
            fields = dict(held[0]) if held is not None and held[1] > now else {}
            for name, delta in deltas.items():
                fields[name] = fields.get(name, 0.0) + float(delta)
            self._counters[key] = (fields, expires_at)
            self._count(16 * len(fields))

    async def get_counters(self, keys: Sequence[str]) -> dict[str, dict[str, float]]:
        now = self._clock()
        found: dict[str, dict[str, float]] = {}
        for key in keys:
            held = self._counters.get(key)
            if held is not None and held[1] > now:
                found[key] = dict(held[0])
        return found

    def _live_record(self, kind: str, name: str) -> tuple[bytes, int, float | None] | None:
        held = self._records.get((kind, name))
        if held is None or (held[2] is not None and held[2] <= self._clock()):
            return None
        return held

    async def get_record(self, kind: str, name: str) -> Record | None:
        held = self._live_record(kind, name)
        return Record(name, decode_json(held[0]), held[1]) if held is not None else None

    async def put_record(
        self,
        kind: str,
        name: str,
        data: dict[str, Any],
        *,
        expected_version: int | None = None,
        expires_at: float | None = None,
    ) -> int:
        held = self._live_record(kind, name)
        version = next_record_version(kind, name, held[1] if held is not None else None, expected_version)
        blob = encode_json(data)
        self._records[(kind, name)] = (blob, version, expires_at)
        self._count(len(blob))
        return version

    async def list_records(self, kind: str) -> list[Record]:
        names = sorted(name for (k, name) in self._records if k == kind)
        found = [await self.get_record(kind, name) for name in names]
        return [record for record in found if record is not None]

    async def delete_record(self, kind: str, name: str) -> bool:
        held = self._live_record(kind, name)
        self._records.pop((kind, name), None)
        return held is not None
