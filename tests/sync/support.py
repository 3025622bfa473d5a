"""Test helpers for the sync engine: its table, built from a test's storage settings."""

from __future__ import annotations

from typing import Any

from mailsync.settings import Settings
from mailsync.storage.connection import table_client
from mailsync.storage.sync_table import SyncStateTable


def sync_table(settings: Settings, *, table_class: type[SyncStateTable] = SyncStateTable,
               **options: Any) -> SyncStateTable:
    """The sync state table of these settings (TABLE_PREFIX + "sync"), created if missing."""
    table = table_class(table_client(settings, "sync"), **options)
    table.ensure_table()
    return table
