"""The sync table's fixtures: a table on Azurite with short leases and slots, on a clock the test moves."""

from __future__ import annotations

import pytest

from mailsync.settings import Settings
from mailsync.storage.sync_table import SyncStateTable
from tests.storage.sync_table_support import Clock
from tests.sync.support import sync_table


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def table(storage_settings: Settings, clock: Clock) -> SyncStateTable:
    return sync_table(storage_settings, lease_s=60.0, slot_ttl_s=120.0, clock=clock)
