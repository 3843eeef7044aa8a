"""The SQLite store's journal append on the event loop (`SQLiteStore._run(inline=True)`): it runs there only when it
cannot wait, and otherwise waits for the file's write lock in a worker thread, never on the loop."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

from unbroken.journal.sqlite import SQLiteStore
from unbroken.journal.store import ResponseHeader

BOUND = 10.0


def delta(seq: int) -> dict[str, object]:
    return {"type": "response.output_text.delta", "sequence_number": seq, "item_id": "msg_1", "output_index": 0,
            "content_index": 0, "delta": "tok", "logprobs": []}


async def test_an_append_runs_inline_and_waits_for_another_writer_in_a_thread(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    store = SQLiteStore(path)
    now = time.time()
    await store.create(ResponseHeader(id="resp_1", tenant="t", created_at=now, expires_at=now + 600))
    assert not await store.append("resp_1", 0, [delta(0)])  # inline: the file was free
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        pending = asyncio.create_task(store.append("resp_1", 0, [delta(1)]))
        for _ in range(20):
            await asyncio.sleep(0)  # the loop keeps running: the append waits in a thread, not here
        assert not pending.done()
    finally:
        other.execute("COMMIT")
        other.close()
    assert not await asyncio.wait_for(pending, BOUND)
    assert [e["sequence_number"] for e in await store.read_events("resp_1")] == [0, 1]
    await store.close()
