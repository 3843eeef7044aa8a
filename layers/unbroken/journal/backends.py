"""Which store a URL names: `sqlite:///PATH`, `memory://`, `dynamodb://TABLE?region=R&endpoint_url=U`.

The DynamoDB backend is imported only when its URL is opened: it brings botocore, which a local run with SQLite
should not pay for.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

from unbroken.journal.memory import MemoryStore
from unbroken.journal.sqlite import SQLiteStore
from unbroken.journal.store import Store


def open_store(url: str) -> Store:
    """Open a store from its URL: `sqlite:///PATH`, `memory://`, `dynamodb://TABLE?region=R&endpoint_url=U`."""
    parsed = urlparse(url)
    if parsed.scheme == "memory":
        return MemoryStore()
    if parsed.scheme == "sqlite":
        path = url[len("sqlite:///") :] if url.startswith("sqlite:///") else parsed.path
        if not path:
            raise ValueError("sqlite store URL needs a path: sqlite:///PATH")
        return SQLiteStore(path)
    if parsed.scheme == "dynamodb":
        from unbroken.journal.dynamodb import DynamoDBStore  # brings botocore: only when a DynamoDB URL is opened

        query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        if not parsed.netloc:
            raise ValueError("dynamodb store URL needs a table: dynamodb://TABLE?region=R")
        return DynamoDBStore(parsed.netloc, region=query.get("region"), endpoint_url=query.get("endpoint_url"))
    raise ValueError(f"unknown store URL {url!r}: use sqlite:///PATH, memory:// or dynamodb://TABLE")
