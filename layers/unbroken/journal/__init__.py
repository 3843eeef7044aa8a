"""The durable stream journal: stores (memory, SQLite, DynamoDB), the group-commit writer and the follower.

Importing this package is cheap: the DynamoDB store (and boto3) load only when a dynamodb:// store is opened.
"""

from unbroken.journal.backends import open_store
from unbroken.journal.feed import LOCAL_FEEDS, LocalFeeds, follow, is_terminal_event
from unbroken.journal.store import (
    TERMINAL_EVENT_TYPES,
    TERMINAL_STATUSES,
    AlreadyExists,
    Fenced,
    NotFound,
    ResponseHeader,
    Store,
    StoreError,
    StoreStats,
    StoreUnavailable,
)
from unbroken.journal.writer import JournalWriter, WriterClosed

__all__ = [
    "LOCAL_FEEDS",
    "TERMINAL_EVENT_TYPES",
    "TERMINAL_STATUSES",
    "AlreadyExists",
    "Fenced",
    "JournalWriter",
    "LocalFeeds",
    "NotFound",
    "ResponseHeader",
    "Store",
    "StoreError",
    "StoreStats",
    "StoreUnavailable",
    "WriterClosed",
    "follow",
    "is_terminal_event",
    "open_store",
]
