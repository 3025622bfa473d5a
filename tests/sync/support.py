"""Test helpers for the sync engine: its table, built from a test's storage settings."""

from __future__ import annotations

from azure.data.tables import TableServiceClient

from mailsync.settings import Settings
from mailsync.storage.cursors import SyncStateTable


def sync_table(settings: Settings, **options: object) -> SyncStateTable:
    """The sync state table of these settings, created if missing."""
    assert settings.storage_connection_string
    service = TableServiceClient.from_connection_string(settings.storage_connection_string)
    table = SyncStateTable(service.get_table_client(f"{settings.table_prefix}sync"), **options)  # type: ignore[arg-type]
    table.ensure_table()
    return table
