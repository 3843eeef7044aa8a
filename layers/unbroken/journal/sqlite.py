"""Embedded store: one SQLite file, the default of `unbroken serve`.

WAL mode lets readers run while a writer commits; every conditional write is one `BEGIN IMMEDIATE` transaction
(check the header, write the batch, update the header), which takes the file's write lock first, so fencing holds
between processes sharing the file, not only between threads. `synchronous=NORMAL`: a commit survives a crash of the
process (the case that matters: a killed server), not necessarily a power cut.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from unbroken.journal.codec import check_dense, decode_events, decode_json, encode_events, encode_json
from unbroken.journal.store import (
    TERMINAL_STATUSES,
    AlreadyExists,
    Fenced,
    NotFound,
    Record,
    ResponseHeader,
    Store,
    StoreStats,
    StoreUnavailable,
    first_batch_span,
    next_record_version,
    snapshot_blobs,
)

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    status TEXT NOT NULL,
    owner_epoch INTEGER NOT NULL,
    lease_expires_at REAL NOT NULL,
    last_seq INTEGER NOT NULL,
    request BLOB NOT NULL,
    response BLOB,
    idempotency_key TEXT,
    body_hash TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    background INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS responses_expires_at ON responses (expires_at);
CREATE TABLE IF NOT EXISTS idempotency (
    tenant TEXT NOT NULL,
    key TEXT NOT NULL,
    response_id TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (tenant, key)
);
CREATE TABLE IF NOT EXISTS counters (
    key TEXT NOT NULL,
    field TEXT NOT NULL,
    value REAL NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (key, field)
);
CREATE TABLE IF NOT EXISTS records (
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    data BLOB NOT NULL,
    version INTEGER NOT NULL,
    expires_at REAL,
    PRIMARY KEY (kind, name)
);
CREATE TABLE IF NOT EXISTS batches (
    response_id TEXT NOT NULL,
    last_seq INTEGER NOT NULL,
    first_seq INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (response_id, last_seq)
);
"""

_HEADER_COLUMNS = (
    "id, tenant, created_at, expires_at, status, owner_epoch, lease_expires_at, last_seq, "
    "idempotency_key, body_hash, cancel_requested, background"
)
# Purge expired rows now and then on create, so a long-lived file does not grow without bound.
_PURGE_EVERY = 256


class SQLiteStore(Store):
    def __init__(self, path: str | Path, *, busy_timeout: float = 5.0, clock: Callable[[], float] = time.time) -> None:
        self.stats = StoreStats()
        self._clock = clock  # epoch seconds; tests move it forward to check expiry
        self.path = str(path)
        self._busy_timeout = busy_timeout
        self._conn: sqlite3.Connection | None = None
        # One connection per store, used from worker threads one call at a time.
        self._lock = threading.Lock()
        self._creates = 0

    # -- plumbing ---------------------------------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False)
            self._enable_wal(conn)
            conn.execute("PRAGMA synchronous=NORMAL")
            # Schema creation under the write lock: two processes opening a new file at once do not trip over it.
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("COMMIT")
            self._conn = conn
        return self._conn

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        """Switch the file to WAL. The switch needs the file to itself, and SQLite answers "database is locked" at
        once (no busy handler) while another process opens it or writes: retried until the busy timeout."""
        deadline = time.monotonic() + self._busy_timeout
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                busy = exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
                if not busy or time.monotonic() >= deadline:
                    conn.close()
                    raise
            time.sleep(0.005)  # in a worker thread: a first open never runs on the event loop

    @staticmethod
    def _commit(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
        """`fn` inside the transaction just begun on `conn`: committed if it returns, rolled back if it raises."""
        try:
            result = fn(conn)
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    def _call(self, fn: Callable[[sqlite3.Connection], T], *, write: bool) -> T:
        with self._lock:
            try:
                conn = self._connection()
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                return self._commit(conn, fn)
            except sqlite3.OperationalError as exc:
                # "database is locked" after the busy timeout, disk I/O errors: the store is not usable now.
                raise StoreUnavailable(f"sqlite: {exc}") from exc

    async def _run(self, fn: Callable[[sqlite3.Connection], T], *, write: bool, inline: bool = False) -> T:
        """`fn` in one transaction, in a worker thread; with `inline`, first tried on the event loop itself when
        that cannot block: the connection is free and the file's write lock is free at once. A journal append or a
        header is a WAL commit of a few KB, tens of microseconds, while the thread hop costs more than that and,
        under load, the worker waits for the GIL at each SQLite call (milliseconds on the first token's path)."""
        if inline:
            done, result = self._try_inline(fn)
            if done:
                return result  # type: ignore[return-value]
        return await asyncio.to_thread(self._call, fn, write=write)

    def _try_inline(self, fn: Callable[[sqlite3.Connection], T]) -> tuple[bool, T | None]:
        """(True, result) if `fn` ran in a write transaction without waiting; (False, None) if the connection or
        the file's write lock was busy (the caller then waits for them in a thread)."""
        if self._conn is None or not self._lock.acquire(blocking=False):
            return False, None  # the first open may wait for other processes: in a thread
        try:
            conn = self._connection()
            conn.execute("PRAGMA busy_timeout = 0")
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                    return False, None  # another process holds the write lock: wait for it in a thread
                raise  # made StoreUnavailable below, as _call does
            finally:
                conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            return True, self._commit(conn, fn)
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"sqlite: {exc}") from exc
        finally:
            self._lock.release()

    @staticmethod
    def _header(row: tuple[Any, ...], request: dict[str, Any], response: dict[str, Any] | None) -> ResponseHeader:
        return ResponseHeader(
            id=row[0],
            tenant=row[1],
            created_at=row[2],
            expires_at=row[3],
            status=row[4],
            owner_epoch=row[5],
            lease_expires_at=row[6],
            last_seq=row[7],
            request=request,
            response=response,
            idempotency_key=row[8],
            body_hash=row[9],
            cancel_requested=bool(row[10]),
            background=bool(row[11]),
        )

    def _count(self, *sizes: int) -> None:
        self.stats.commits += 1
        for size in sizes:
            self.stats.add_item(size)

    # -- Store ------------------------------------------------------------------------------------------------------

    async def create(self, header: ResponseHeader, events: list[dict[str, Any]] | None = None) -> None:
        span = first_batch_span(header, events)
        request, response = snapshot_blobs(header, self)
        blob = encode_events(events) if span is not None and events else None
        self._creates += 1
        purge = self._creates % _PURGE_EVERY == 0

        def run(conn: sqlite3.Connection) -> None:
            now = self._clock()
            if purge:
                _purge(conn, now)
            if conn.execute("SELECT 1 FROM responses WHERE id = ?", (header.id,)).fetchone():
                raise AlreadyExists(f"response {header.id} exists")
            if header.idempotency_key is not None:
                held = conn.execute(
                    "SELECT response_id FROM idempotency WHERE tenant = ? AND key = ? AND expires_at > ?",
                    (header.tenant, header.idempotency_key, now),
                ).fetchone()
                if held:
                    raise AlreadyExists(f"idempotency key already used by {held[0]}")
                conn.execute(
                    "INSERT OR REPLACE INTO idempotency (tenant, key, response_id, expires_at) VALUES (?, ?, ?, ?)",
                    (header.tenant, header.idempotency_key, header.id, header.expires_at),
                )
            conn.execute(
                "INSERT INTO responses (id, tenant, created_at, expires_at, status, owner_epoch, lease_expires_at,"
                " last_seq, request, response, idempotency_key, body_hash, cancel_requested, background)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    header.id,
                    header.tenant,
                    header.created_at,
                    header.expires_at,
                    header.status,
                    header.owner_epoch,
                    header.lease_expires_at,
                    header.last_seq if span is None else span[1],
                    request,
                    response,
                    header.idempotency_key,
                    header.body_hash,
                    int(header.cancel_requested),
                    int(header.background),
                ),
            )
            if span is not None:
                conn.execute(
                    "INSERT INTO batches (response_id, last_seq, first_seq, data) VALUES (?, ?, ?, ?)",
                    (header.id, span[1], span[0], blob),
                )

        await self._run(run, write=True, inline=not purge)  # a header is as small as a batch; a purge is not
        self._count(len(request) + len(response or b"") + len(blob or b""))

    async def get(self, response_id: str, *, snapshots: bool = True) -> ResponseHeader | None:
        columns = _HEADER_COLUMNS + (", request, response" if snapshots else "")

        def run(conn: sqlite3.Connection) -> tuple[Any, ...] | None:
            row: tuple[Any, ...] | None = conn.execute(
                f"SELECT {columns} FROM responses WHERE id = ? AND expires_at > ?", (response_id, self._clock())
            ).fetchone()
            return row

        row = await self._run(run, write=False)
        if row is None:
            return None
        if not snapshots:
            return self._header(row, {}, None)
        response = decode_json(row[13]) if row[13] is not None else None
        return self._header(row, decode_json(row[12]), response)

    async def find_by_idempotency_key(self, tenant: str, key: str) -> ResponseHeader | None:
        def run(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "SELECT response_id FROM idempotency WHERE tenant = ? AND key = ? AND expires_at > ?",
                (tenant, key, self._clock()),
            ).fetchone()
            return row[0] if row else None

        response_id = await self._run(run, write=False)
        if response_id is None:
            return None
        header = await self.get(response_id)
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
        # Encode outside the lock: CPU work should not hold the file's write lock.
        blob = encode_events(events) if span is not None else None
        snap = encode_json(response) if response is not None else None

        def run(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT owner_epoch, last_seq, cancel_requested FROM responses WHERE id = ? AND expires_at > ?",
                (response_id, self._clock()),
            ).fetchone()
            if row is None:
                raise NotFound(f"response {response_id} not found")
            if row[0] != epoch:
                raise Fenced(f"epoch {epoch} fenced by {row[0]}")
            sets: list[str] = []
            params: list[Any] = []
            if span is not None:
                if span[0] != row[1] + 1:
                    raise Fenced(f"batch starts at {span[0]} but last_seq is {row[1]}")
                conn.execute(
                    "INSERT INTO batches (response_id, last_seq, first_seq, data) VALUES (?, ?, ?, ?)",
                    (response_id, span[1], span[0], blob),
                )
                sets.append("last_seq = ?")
                params.append(span[1])
            if lease_expires_at is not None:
                sets.append("lease_expires_at = ?")
                params.append(lease_expires_at)
            if status is not None:
                sets.append("status = ?")
                params.append(status)
            if snap is not None:
                sets.append("response = ?")
                params.append(snap)
            if sets:
                conn.execute(f"UPDATE responses SET {', '.join(sets)} WHERE id = ?", (*params, response_id))
            return bool(row[2])

        cancel = await self._run(run, write=True, inline=True)
        self._count(len(blob or b"") + len(snap or b""))
        return cancel

    async def read_events(self, response_id: str, after_seq: int = -1) -> list[dict[str, Any]]:
        def run(conn: sqlite3.Connection) -> list[bytes]:
            if not conn.execute(
                "SELECT 1 FROM responses WHERE id = ? AND expires_at > ?", (response_id, self._clock())
            ).fetchone():
                return []
            rows = conn.execute(
                "SELECT data FROM batches WHERE response_id = ? AND last_seq > ? ORDER BY last_seq",
                (response_id, after_seq),
            ).fetchall()
            return [r[0] for r in rows]

        out: list[dict[str, Any]] = []
        for blob in await self._run(run, write=False):
            out.extend(e for e in decode_events(blob) if e["sequence_number"] > after_seq)
        return out

    async def take_over(self, response_id: str, expected_epoch: int, lease_expires_at: float) -> int:
        def run(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT owner_epoch, status FROM responses WHERE id = ? AND expires_at > ?",
                (response_id, self._clock()),
            ).fetchone()
            if row is None:
                raise NotFound(f"response {response_id} not found")
            if row[0] != expected_epoch:
                raise Fenced(f"epoch is {row[0]}, not {expected_epoch}")
            if row[1] in TERMINAL_STATUSES:
                raise Fenced(f"response {response_id} is {row[1]}")
            conn.execute(
                "UPDATE responses SET owner_epoch = ?, lease_expires_at = ? WHERE id = ?",
                (expected_epoch + 1, lease_expires_at, response_id),
            )
            return expected_epoch + 1

        epoch = await self._run(run, write=True)
        self._count(0)
        return epoch

    async def request_cancel(self, response_id: str) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE responses SET cancel_requested = 1 WHERE id = ? AND expires_at > ?",
                (response_id, self._clock()),
            )
            return cur.rowcount > 0

        found = await self._run(run, write=True)
        if found:
            self._count(0)
        return found

    async def delete(self, response_id: str) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            cur = conn.execute("DELETE FROM responses WHERE id = ?", (response_id,))
            conn.execute("DELETE FROM batches WHERE response_id = ?", (response_id,))
            conn.execute("DELETE FROM idempotency WHERE response_id = ?", (response_id,))
            return cur.rowcount > 0

        return await self._run(run, write=True)

    # -- counters and records ----------------------------------------------------------------------------------------

    async def add_counters(self, increments: Mapping[str, Mapping[str, float]], *, expires_at: float) -> None:
        rows = [
            (key, name, float(delta), expires_at)
            for key, deltas in increments.items()
            for name, delta in deltas.items()
        ]
        if not rows:
            return

        def run(conn: sqlite3.Connection) -> None:
            now = self._clock()
            keys = list(increments)
            # An expired counter starts again from zero, as if it had been removed.
            conn.executemany("DELETE FROM counters WHERE key = ? AND expires_at <= ?", [(k, now) for k in keys])
            conn.executemany(
                "INSERT INTO counters (key, field, value, expires_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (key, field) DO UPDATE SET value = value + excluded.value, "
                "expires_at = excluded.expires_at",
                rows,
            )
            conn.executemany("UPDATE counters SET expires_at = ? WHERE key = ?", [(expires_at, k) for k in keys])

        await self._run(run, write=True)
        self._count(*(16 for _ in rows))

    async def get_counters(self, keys: Sequence[str]) -> dict[str, dict[str, float]]:
        if not keys:
            return {}
        wanted = list(dict.fromkeys(keys))

        def run(conn: sqlite3.Connection) -> list[tuple[str, str, float]]:
            now = self._clock()
            found: list[tuple[str, str, float]] = []
            for start in range(0, len(wanted), 500):  # below SQLite's bound on host parameters
                chunk = wanted[start : start + 500]
                marks = ",".join("?" * len(chunk))
                found += conn.execute(
                    f"SELECT key, field, value FROM counters WHERE key IN ({marks}) AND expires_at > ?", (*chunk, now)
                ).fetchall()
            return found

        result: dict[str, dict[str, float]] = {}
        for key, name, value in await self._run(run, write=False):
            result.setdefault(key, {})[name] = value
        return result

    async def get_record(self, kind: str, name: str) -> Record | None:
        def run(conn: sqlite3.Connection) -> tuple[bytes, int] | None:
            row = conn.execute(
                "SELECT data, version FROM records "
                "WHERE kind = ? AND name = ? AND (expires_at IS NULL OR expires_at > ?)",
                (kind, name, self._clock()),
            ).fetchone()
            return (bytes(row[0]), int(row[1])) if row else None

        found = await self._run(run, write=False)
        return Record(name, decode_json(found[0]), found[1]) if found is not None else None

    async def put_record(
        self,
        kind: str,
        name: str,
        data: dict[str, Any],
        *,
        expected_version: int | None = None,
        expires_at: float | None = None,
    ) -> int:
        blob = encode_json(data)

        def run(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT version FROM records WHERE kind = ? AND name = ? AND (expires_at IS NULL OR expires_at > ?)",
                (kind, name, self._clock()),
            ).fetchone()
            version = next_record_version(kind, name, int(row[0]) if row else None, expected_version)
            conn.execute(
                "INSERT OR REPLACE INTO records (kind, name, data, version, expires_at) VALUES (?, ?, ?, ?, ?)",
                (kind, name, blob, version, expires_at),
            )
            return version

        version = await self._run(run, write=True)
        self._count(len(blob))
        return version

    async def list_records(self, kind: str) -> list[Record]:
        def run(conn: sqlite3.Connection) -> list[tuple[str, bytes, int]]:
            return conn.execute(
                "SELECT name, data, version FROM records WHERE kind = ? AND (expires_at IS NULL OR expires_at > ?) "
                "ORDER BY name",
                (kind, self._clock()),
            ).fetchall()

        rows = await self._run(run, write=False)
        return [Record(name, decode_json(bytes(blob)), int(version)) for name, blob, version in rows]

    async def delete_record(self, kind: str, name: str) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            live = conn.execute(
                "SELECT 1 FROM records WHERE kind = ? AND name = ? AND (expires_at IS NULL OR expires_at > ?)",
                (kind, name, self._clock()),
            ).fetchone()
            conn.execute("DELETE FROM records WHERE kind = ? AND name = ?", (kind, name))
            return live is not None

        return await self._run(run, write=True)

    async def close(self) -> None:
        def run() -> None:
            with self._lock:
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None

        await asyncio.to_thread(run)


def _purge(conn: sqlite3.Connection, now: float) -> None:
    conn.execute("DELETE FROM batches WHERE response_id IN (SELECT id FROM responses WHERE expires_at <= ?)", (now,))
    conn.execute("DELETE FROM responses WHERE expires_at <= ?", (now,))
    conn.execute("DELETE FROM idempotency WHERE expires_at <= ?", (now,))
    conn.execute("DELETE FROM counters WHERE expires_at <= ?", (now,))
    conn.execute("DELETE FROM records WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,))
